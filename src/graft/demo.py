"""``graft demo``: the main job on the embedded default, with nothing to download. Each task
brings its demo's data and config (``TaskPackage.write_demo_data``, ``demo_config``): the
classifier's are texture patches of scikit-image's photos, the detector's aerial photos of trees
with their boxes from the deepforest wheel. The demo's folder is marked so a demo replaces only
what a demo wrote."""

from __future__ import annotations

import shutil
from pathlib import Path

from graft.engine.run_folder import TrainResult
from graft.errors import DataError
from graft.pipeline.registry import task_named
from graft.pipeline.train import train
DEMO_MARKER = ".graft-demo"


def run_demo(out: Path, *, task: str = "classify", epochs: int | None = None, fine_tune_epochs: int | None = None, quiet: bool = False) -> TrainResult:
    """Write the task's demo data in ``out/data`` and train into ``out`` (see ``demo_folder``)."""
    out = Path(out)
    demo = task_named(task)
    cfg = demo.demo_config(out / "data", epochs, fine_tune_epochs)  # validate before touching anything
    data_dir = demo_folder(out)
    demo.write_demo_data(data_dir)
    return train(cfg, out, overwrite=True, quiet=quiet)


def demo_folder(out: Path) -> Path:
    """Make ``out`` a demo's folder and return its empty ``data/``. ``out`` must be new, empty, or
    an earlier demo's folder (marked by a ``.graft-demo`` file): a demo replaces its own earlier
    run and data there, and nothing else."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; the demo needs a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise DataError(f"{out} is not empty and was not made by `graft demo`; choose a new --out folder (the demo replaces what it wrote before)")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by `graft demo`; the demo may replace this folder's run and data/\n")
    data_dir = out / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    return data_dir
