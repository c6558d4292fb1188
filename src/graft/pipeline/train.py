"""``graft train`` and ``--resume`` for every task: the run folder and the snapshot are settled
here, then the task trains.

``RUNDIR`` holds ``model.safetensors`` + ``model.json`` (the trained model, self-describing),
``snapshots/``, ``history.csv``, ``metrics.json``, ``config.yaml`` (resolved), ``splits.json``,
``weights_report.json``, the plots and ``report.html``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from graft.configuration import GraftConfig, parse_config
from graft.engine import checkpoint
from graft.engine.device import select_device
from graft.console import progress, warn
from graft.engine import distributed
from graft.engine.run_folder import TrainResult, holds_run, restart_snapshot
from graft.errors import ConfigError
from graft.pipeline.registry import resolve_task


def train(
    cfg: GraftConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    hooks: list[Any] = (),
) -> TrainResult:
    """Train a run into ``out``, or continue one from the snapshot ``resume``.

    A resumed run keeps the snapshot's config and data split (``data_dir`` may point to the data's
    new location); passing ``cfg`` with ``resume`` is an error, as in Caffe, where a solver state
    only continues the solver that made it."""
    started = time.perf_counter()
    payload = None
    restarted = restart_snapshot(out) if resume is None else None
    if restarted is not None:  # torchrun restarted this launch: continue it, whatever cfg says
        resume, cfg = restarted, None
        say = progress(quiet or os.environ.get("RANK", "0") != "0")  # before the process group: rank 0 speaks
        say(f"torchrun restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}: continuing from {restarted}")
    if resume is not None:
        if cfg is not None:
            raise ConfigError("--resume continues the snapshot's run with its saved config; to change the solver, start from its weights with --weights SNAPSHOT instead")
        payload = checkpoint.load_snapshot(resume)
        if "expand" in payload:  # an expansion's snapshot continues as an expansion
            from graft.pipeline.expand import expand

            return expand(None, out, resume=resume, data_dir=data_dir, overwrite=overwrite, quiet=quiet, hooks=hooks)
        cfg = parse_config(payload["config"], f"snapshot {payload['path']}")
        source_run = checkpoint.snapshot_run_dir(payload["path"])
        run_dir = Path(out) if out else source_run
        replace = run_dir.resolve() != source_run.resolve() and holds_run(run_dir)
    else:
        if cfg is None:
            raise ConfigError("train needs a config (or --resume SNAPSHOT)")
        if data_dir is not None:
            cfg.data.dir = str(data_dir)
        if not cfg.data.dir:
            raise ConfigError("no data: pass --data DIR (a folder of class folders) or set data.dir in the config")
        if out is None:
            raise ConfigError("no output folder: pass --out RUNDIR")
        run_dir = Path(out)
        replace = holds_run(run_dir)
        source_run = None
    task = resolve_task(cfg)  # a resumed run's config says which: it was resolved when the run started
    device = select_device(cfg.train.device)
    if payload is not None and (note := distributed.resume_note(payload)):
        warn(note)
    if replace and not overwrite:
        snapshot = checkpoint.newest_snapshot(run_dir / "snapshots") if payload is None else None
        hint = f", continue it with --resume {snapshot}," if snapshot is not None else ""
        raise ConfigError(f"{run_dir} already holds a run; choose another --out{hint} or pass --overwrite to replace it")
    return task.train(cfg, run_dir, payload, replace=replace, device=device, source_run=source_run, data_dir=data_dir, started=started, quiet=quiet, hooks=list(hooks))
