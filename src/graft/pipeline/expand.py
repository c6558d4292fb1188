"""``graft expand`` for every task: a finished run plus data with new classes -> an expanded run.

The source run, the output folder and, for ``--resume``, the snapshot and the unchanged source
model are checked here, before anything is written; then the run's task expands it. The
expanded run is a run like any other, plus ``expand_metrics.json`` (how the old classes fared).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from graft.configuration import GraftConfig, parse_config
from graft.console import warn
from graft.engine import checkpoint, distributed
from graft.engine.device import select_device
from graft.engine.run_folder import ExpandResult, holds_run, restart_snapshot
from graft.errors import ConfigError, SnapshotError
from graft.pipeline.predict import load_run
from graft.pipeline.registry import TASKS, refuse_other_data, resolve_task, task_of
from graft.tasks.interface import ExpansionJob


def load_source(run: str | os.PathLike) -> Any:
    """The run to expand: a finished run folder (made absolute: snapshots record it, and must
    work from any folder), or a model a task knows by name (``coco:MODEL``)."""
    for task in TASKS.values():
        named = task.named_source(str(run))
        if named is not None:
            return named
    run_dir = Path(run).resolve()
    trained = load_run(run_dir, device="cpu")
    return task_of(trained.info).load_source(run_dir, trained)


def expand_config(
    source: Any,
    data_dir: str | os.PathLike | None,
    *,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> GraftConfig:
    """The expansion's config, by the source's task: the source run's, with expansion defaults,
    then the user's file, ``--set`` overrides and flags."""
    task = task_of(source.info)
    refuse_other_data(task, data_dir, source.name, f"give it {task.new_data}")
    asked = (flags or {}).get("task")
    if asked not in (None, "auto", task.name):
        raise ConfigError(f"{source.name} is a {task.model_noun} run; --task {asked} expands {TASKS[asked].model_noun} runs")
    return task.expand_config(source, data_dir, config_file=config_file, overrides=overrides, flags={k: v for k, v in (flags or {}).items() if k != "task"})


def expand(
    cfg: GraftConfig | None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    hooks: list[Any] = (),
) -> ExpandResult:
    """Expand the run ``cfg.expand.source`` with the new classes in ``cfg.data.dir`` into ``out``
    (``cfg`` from ``expand_config``), or continue an expansion from its snapshot ``resume``
    (``data_dir``: where its new data is now, if it moved). With ``overwrite``, a run already in
    ``out`` is kept in ``out/.replaced`` until this one finishes."""
    started = time.perf_counter()
    payload = None
    restarted = restart_snapshot(out) if resume is None else None
    if restarted is not None:  # torchrun restarted this launch: continue it
        resume, cfg = restarted, None
    if resume is not None:
        if cfg is not None:
            raise ConfigError("--resume continues the snapshot's expansion with its saved config; pass no other settings")
        payload = checkpoint.load_snapshot(resume)
        if "expand" not in payload:
            raise SnapshotError(f"{payload['path']} is a training snapshot, not an expansion's: continue it with graft train --resume")
        cfg = parse_config(payload["config"], f"snapshot {payload['path']}")
        source = load_source(cfg.expand.source)
        if source.digest != payload["expand"]["source_sha256"]:
            raise SnapshotError(f"the model in {cfg.expand.source} changed since this expansion started; it cannot be continued (start it again from the run)")
        snapshot_run = checkpoint.snapshot_run_dir(payload["path"])
        run_dir = Path(out) if out else snapshot_run
        replace = run_dir.resolve() != snapshot_run.resolve() and holds_run(run_dir)
    else:
        if cfg is None or cfg.expand.source is None:
            raise ConfigError("expand needs a config made by graft.pipeline.expand.expand_config (or --resume SNAPSHOT)")
        if out is None:
            raise ConfigError("no output folder: pass --out RUNDIR")
        source = load_source(cfg.expand.source)
        run_dir = Path(out)
        replace = holds_run(run_dir)
    task = resolve_task(cfg)
    if source.dir is not None:
        inside, source_dir = run_dir.resolve(), Path(source.dir).resolve()
        if inside == source_dir or source_dir in inside.parents:
            raise ConfigError(f"--out {run_dir} is (inside) the run being expanded, {source.dir}; write the expanded run to a new folder")
    if replace and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run; choose another --out or pass --overwrite to replace it")
    if payload is not None:
        select_device(cfg.train.device)  # under torchrun: joins the process group whose size the note compares
        if note := distributed.resume_note(payload):
            warn(note)
    job = ExpansionJob(cfg, source, run_dir, replace, payload, started)
    return task.expand(job, data_dir=data_dir, quiet=quiet, hooks=list(hooks))
