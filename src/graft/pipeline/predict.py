"""A finished run of any task as a usable model: ``load_run`` reads its ``model.json``, and its
task builds the model with ``predict`` and ``evaluate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from graft.engine.device import select_device
from graft.errors import SnapshotError
from graft.io import read_json
from graft.pipeline.registry import refuse_other_data, task_of


def load_run(run_dir: str | os.PathLike, device: str = "auto") -> Any:
    """The finished run in ``run_dir`` as its task's model (``TrainedModel`` for a classifier,
    ``TrainedDetector`` for a detector), as its ``model.json`` says."""
    run_dir = Path(run_dir)
    info_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
    if not info_path.is_file() or not weights_path.is_file():
        hint = " (training has not finished; its snapshots are in snapshots/)" if (run_dir / "snapshots").is_dir() else ""
        raise SnapshotError(f"{run_dir} is not a finished graft run: model.json and model.safetensors are needed{hint}")
    try:
        info = read_json(info_path)
        task = task_of(info)
        run = task.load_run(run_dir, info, load_file(str(weights_path)), select_device(device))
    except SnapshotError:
        raise
    except Exception as err:
        raise SnapshotError(f"cannot load the model in {run_dir}: {type(err).__name__}: {str(err)[:200]}") from None
    # evaluate() refuses another task's labels with a message that names the kind this run needs
    run.refuse_data = lambda data_dir: refuse_other_data(task, data_dir, run_dir, f"evaluate it on {task.eval_data}")
    return run
