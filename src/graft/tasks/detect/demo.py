"""``graft demo --task detect``: a tree detector from real aerial photos, with nothing downloaded
at run time.

The photos and their boxes come from the deepforest wheel that ``make install`` fetched
(``graft.tasks.detect.deepforest``): about 950 trees in four photos, the large ones cut into tiles
that do not overlap. The tiles are split seeded into train, validation and test; the test tiles
are only used for the final figures.
"""

from __future__ import annotations

from pathlib import Path

from graft.configuration import parse_config



def detection_demo_config(data_dir: Path, epochs: int | None = None, fine_tune_epochs: int | None = None):
    return parse_config(
        {
            "task": "detect",
            "data": {"dir": str(data_dir), "img_size": 384, "val_fraction": 0.2, "test_fraction": 0.2},
            "model": {"name": "tf_efficientnet_lite0", "weights": "bundled"},
            "detect": {"head": "fcos"},
            # epochs, batch size and learning rate: graft's detection defaults
            "train": {"strategy": "two-phase", **({"epochs": epochs} if epochs is not None else {}), **({"fine_tune_epochs": fine_tune_epochs} if fine_tune_epochs is not None else {})},
            "solver": {"seed": 0},
        },
        "detection demo",
    )
