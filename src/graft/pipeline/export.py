"""``graft export`` and exported models for every task: the run's task says how it is traced,
described and checked, and the sidecar's task which model class runs an export. Imports no torch
until a run is exported (predicting with an ONNX export needs onnxruntime alone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from graft.errors import GraftError
from graft.exporting.exported import ExportedModel, read_sidecar
from graft.pipeline.registry import task_named



def load_export(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> ExportedModel:
    """The exported model at ``path`` as a classifier or a detector; ``meta``: its sidecar's
    content when the sidecar is not (yet) beside it, as during graft export's parity check."""
    path = Path(path)
    if meta is None:
        meta = read_sidecar(path)
    elif not path.is_file():
        raise GraftError(f"no such exported model: {path}")
    return task_named(meta["task"]).exported_model(path, meta)


def export_run(run_dir: str | os.PathLike, fmt: str = "onnx", *, out: str | os.PathLike | None = None, half: bool = False, opset: int | None = None,
               images: str | os.PathLike | None = None, parity_images: int | None = None, say: Any = None) -> Any:
    """Export the finished run in ``run_dir`` (``graft.exporting.writer.export_model``: the file, its
    sidecar, and the parity check against the run); returns an ``ExportResult``."""
    from graft.exporting.writer import DEFAULT_OPSET, FORMATS, PARITY_IMAGES, export_model
    from graft.errors import ConfigError
    from graft.pipeline.predict import load_run
    from graft.pipeline.registry import task_of

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    run = load_run(run_dir, device="cpu")  # a clear SnapshotError for a folder that is not a finished run
    return export_model(run, run_dir, task_of(run.info).export_spec(), fmt, out=out, half=half, opset=opset or DEFAULT_OPSET,
                        images=images, parity_images=PARITY_IMAGES if parity_images is None else parity_images, say=say)
