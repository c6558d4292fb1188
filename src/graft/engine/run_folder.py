"""A run folder's lifecycle, the same for every task: which files make a run, and how
``--overwrite`` replaces one without losing it (the old run is stashed until the new one finishes);
and the checks and result every run shares."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from graft.configuration import GraftConfig, dump_yaml
from graft.errors import ConfigError
from graft.io import atomic_write, fsync_folder, read_json, sweep_temps, temp_owner, write_json, write_text

from graft.engine import distributed
from graft.engine.loop import Phase, phase_param_groups

RUN_MARKERS = ("model.json", "snapshots", "history.csv")
RUN_FILES = RUN_MARKERS + (
    "model.safetensors", "metrics.json", "config.yaml", "splits.json", "weights_report.json",
    "learning_curves.png", "confusion_matrix.png", "predictions.png", "class_stats.safetensors", "expand_metrics.json",
    "detections.png", "per_class_ap.png", "pr_curves.png", "report.html", "export", "tensorboard",
)


def restart_snapshot(out: str | os.PathLike | None) -> Path | None:
    """After torchrun restarted a failed launch (``--max-restarts``), the newest complete snapshot
    of the run in ``out`` (``snapshots/last``, written atomically) *if this launch wrote it* (its
    ``launch`` is torchrun's run id), to continue from; else None: an older run in ``out`` is never
    taken for this one."""
    if out is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    last = Path(out) / "snapshots" / "last"
    if not last.is_file():
        return None
    from graft.engine.checkpoint import load_snapshot

    return last if load_snapshot(last).get("launch") == os.environ.get("TORCHELASTIC_RUN_ID") else None


def holds_run(path: Path) -> bool:
    """A run, or what is left of one: a marker file, a snapshot, or an unfinished --overwrite. A
    ``snapshots/`` folder with only a killed writer's temporary file in it holds nothing."""
    if not path.is_dir():
        return False
    if (path / STAGING).is_dir():
        return True
    snapshots = path / "snapshots"
    return any((path / m).exists() for m in RUN_MARKERS if m != "snapshots") or (snapshots.is_dir() and any(temp_owner(p.name) is None for p in snapshots.iterdir()))


def clear_run(path: Path) -> None:
    """Remove a run's own files (nothing else in the folder), so no stale plot survives."""
    for name in RUN_FILES:
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


REPLACED = ".replaced"  # where --overwrite keeps the previous run until the new one has finished
STAGING = ".replacing"  # the previous run while it is being moved there, file by file


def stash_run(path: Path) -> Path:
    """Move the run in ``path`` aside into ``path/.replaced`` instead of deleting it, so a replacement
    that fails or is interrupted loses nothing. The files move into ``.replacing`` first and that
    folder is renamed at the end, so ``.replaced`` always holds a whole run: a move killed half way
    is finished by the next --overwrite, not mistaken for a stash. A stash left by an earlier failed
    replacement holds the last finished run and is kept; the unfinished files above it are removed."""
    stash, staging = path / REPLACED, path / STAGING
    if stash.is_dir():
        clear_run(path)
        return stash
    staging.mkdir(exist_ok=True)
    for name in RUN_FILES:
        if (path / name).exists():
            os.replace(path / name, staging / name)
    fsync_folder(staging)
    os.replace(staging, stash)
    fsync_folder(path)
    return stash


def drop_stash(path: Path) -> None:
    """The new run in ``path`` has finished: the replaced one can go."""
    shutil.rmtree(path / REPLACED, ignore_errors=True)


@contextmanager
def keeping_replaced_run(path: Path) -> Iterator[None]:
    """Tell the user where the replaced run is when the new one does not finish (rank 0's concern)."""
    if not distributed.is_main():
        yield
        return
    try:
        yield
    except BaseException:
        if (path / REPLACED).is_dir():
            print(f"note: the run that was in {path} before --overwrite is kept in {path / REPLACED}", file=sys.stderr)
        raise
    drop_stash(path)


@contextmanager
def opened_run(run_dir: Path, replace: bool, cache_dir: str | None) -> Iterator[None]:
    """The run folder, once everything is validated: an earlier run in it set aside (``replace``),
    and kept, with a note saying where, if this one does not finish. Rank 0's alone: the other
    ranks of a run never write to its folder."""
    if not distributed.is_main():
        yield
        return
    if replace:
        stash_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tidy(run_dir, cache_dir)
    with keeping_replaced_run(run_dir):
        yield


def tidy(run_dir: Path, cache_dir: str | None) -> None:
    """Before a run writes: a killed run's temporary files go (from this run folder, resumed, and
    from the cache), and the cache is brought under its cap."""
    from graft import cache

    sweep_temps(run_dir)
    cache.tidy(cache.cache_root(cache_dir))


def write_weights_report(run_dir: Path, payload: dict[str, Any] | None, report: Any, source_run: Path | None, say: Any) -> None:
    """``weights_report.json``: what the weights loaded at the start matched; a resumed run written
    to another folder copies its run's."""
    if not distributed.is_main():
        return
    if payload is None:
        write_json(run_dir / "weights_report.json", report.to_dict())
        say(report.summary())
    elif source_run is not None and (source_run / "weights_report.json").is_file() and not (run_dir / "weights_report.json").exists():
        atomic_write(run_dir / "weights_report.json", lambda tmp: shutil.copyfile(source_run / "weights_report.json", tmp))


def record_start(run_dir: Path, cfg: GraftConfig, static: dict[str, Any], payload: dict[str, Any] | None, decision: Any) -> None:
    """What a run's snapshots and folder hold from its start: ``static['decided']`` (what ``auto``
    became, now or when the resumed run started), ``config.yaml`` (resolved) and ``splits.json``."""
    if decision is not None:
        static["decided"] = decision.to_dict()
    elif payload is not None and "decided" in payload:
        static["decided"] = payload["decided"]
    if not distributed.is_main():
        return
    write_text(run_dir / "config.yaml", dump_yaml(cfg))
    write_json(run_dir / "splits.json", static["splits"])


def check_batch_size(cfg: GraftConfig, model: torch.nn.Module, phases: list[Phase]) -> None:
    """BatchNorm in training mode cannot learn from batches of one image: say so before training."""
    if cfg.solver.batch_size >= 2:
        return
    for phase in phases:
        phase_param_groups(model, phase, cfg.solver, cfg.model.freeze, cfg.model.lr_mult)
        model.train()
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
            raise ConfigError(f"solver.batch_size is 1, but the {phase.name} phase trains BatchNorm layers, which need at least 2 images per batch: use --batch-size 2 or more")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass
class ExpandResult(TrainResult):
    expand_metrics: dict[str, Any] = field(default_factory=dict)


def inherit_weights_report(source_dir: Path | None, source_name: str, run_dir: Path) -> None:
    """An expansion's weights are its source's, every tensor, plus the new classes: its weights
    report is the source's (which says where the pretrained weights came from), marked as such."""
    if not distributed.is_main() or source_dir is None or not (source_dir / "weights_report.json").is_file() or (run_dir / "weights_report.json").exists():
        return
    report = read_json(source_dir / "weights_report.json")
    report["inherited_from"] = f"{source_name}: graft expand loaded every tensor of that run and added the new classes; this is how that run's weights were loaded"
    write_json(run_dir / "weights_report.json", report)


def save_model(run_dir: Path, model: nn.Module, info: dict[str, Any]) -> None:
    """``model.safetensors`` (CPU tensors, atomically) and ``model.json``, the run's self-description."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "graft-run/1"}))
    write_json(run_dir / "model.json", info)
