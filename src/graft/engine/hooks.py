"""Side concerns of the loop: snapshots, the history file, the TensorBoard log, progress output;
``run_hooks`` is the one place that decides which of them a run gets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from graft.console import plural
from graft.errors import ConfigError
from graft.report.figures import write_history_csv
from graft.engine import checkpoint, distributed
from graft.io import atomic_link_or_copy
from graft.engine.loop import Hook, Trainer


class SnapshotHook(Hook):
    """``snapshots/PREFIX-0001`` every ``solver.snapshot`` epochs, ``snapshots/last`` every epoch
    and on Ctrl-C, ``snapshots/best`` at the best validation figure (``monitor``). ``static``
    (config, classes, data split, preprocessing) goes into each one so a snapshot alone is enough to
    resume. Only the newest ``solver.keep_snapshots`` numbered ones are kept, counted from the
    folder (so a resumed run goes on counting), and an old one is deleted only after the new one
    is written; ``last`` and ``best`` are second names of theirs (hard links), kept apart."""

    key = "snapshots"

    def __init__(self, run_dir: Path, solver: Any, static: dict[str, Any], monitor: str | None = None) -> None:
        self.dir = Path(run_dir) / "snapshots"
        self.interval, self.prefix, self.keep = solver.snapshot, solver.snapshot_prefix, solver.keep_snapshots
        self.static = static
        self.monitor = monitor
        self.best: dict[str, Any] | None = None  # {"epoch", "value"} of the run's best epoch so far

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        value = row.get(self.monitor) if self.monitor else None
        better = value is not None and improves(self.monitor, float(value), None if self.best is None else self.best["value"])
        if better:
            self.best = {"epoch": row["epoch"], "value": float(value)}
        path = self.save(trainer.snapshot_payload())  # every rank gathers the payload; rank 0 writes it
        if better and path is not None:
            atomic_link_or_copy(self.dir / "last", self.dir / "best")  # last is this epoch's (its numbered name may be pruned already)

    def save(self, payload: dict[str, Any]) -> Path | None:
        """Snapshot a loop state (``Trainer.snapshot_payload()``) after its epoch: also one the run
        continues from without having trained it itself (auto's winning trial). Rank 0 writes;
        returns the file written (None on other ranks)."""
        if not distributed.is_main():
            return None
        payload = {**payload, **self.static}
        epoch = payload["loop"]["epoch"]
        last = self.dir / "last"
        if self.interval and epoch % self.interval == 0:
            path = checkpoint.save_snapshot(self.dir / f"{self.prefix}-{epoch:04d}", payload, also_as=last)
        else:
            path = checkpoint.save_snapshot(last, payload)
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` numbered snapshots (``last``/``best`` stay)."""
        numbered = sorted(p for p in self.dir.glob(f"{self.prefix}-*") if p.name[len(self.prefix) + 1 :].isdigit())
        for old in numbered[: max(0, len(numbered) - self.keep)]:
            old.unlink(missing_ok=True)

    def after_train(self, trainer: Trainer) -> None:
        if distributed.is_main():  # a run killed between its last snapshot and that snapshot's pruning, then resumed
            self.prune()

    def on_interrupt(self, trainer: Trainer) -> str:
        payload = trainer.snapshot_payload()
        if distributed.is_main():
            checkpoint.save_snapshot(self.dir / "last", {**payload, **self.static})
        distributed.barrier()  # no rank exits (and has torchrun stop the others) before it is written
        return str(self.dir / "last")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")


class HistoryHook(Hook):
    """Rewrites ``history.csv`` after every epoch, so a long run can be watched."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "history.csv"

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        write_history_csv(trainer.state.history, self.path)


class TensorBoardHook(Hook):
    """The history's numeric columns as TensorBoard scalars (tag = column, step = epoch) in
    ``RUNDIR/tensorboard``. A resumed run first drops events written after its snapshot's epoch."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'graft[tensorboard]' (or tensorboard), or set train.tensorboard: false") from None
        self.make = SummaryWriter
        self.dir = Path(run_dir) / "tensorboard"
        self.writer = None

    def before_epoch(self, trainer: Trainer) -> None:
        if self.writer is None:
            self.writer = self.make(str(self.dir), purge_step=trainer.state.epoch + 1)

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def after_train(self, trainer: Trainer) -> None:
        self.close()

    def on_interrupt(self, trainer: Trainer) -> None:
        self.close()


def run_hooks(run_dir: Path, cfg: Any, static: dict[str, Any], *, quiet: bool, stopping: Hook | None = None, extra: list[Hook] = ()) -> list[Hook]:
    """The hooks every run gets, in order: early stopping (restores the best weights before the
    snapshot sees them), snapshots, history, TensorBoard (``train.tensorboard``), progress, then
    the caller's. With several processes every rank keeps the hooks with state (early stopping,
    snapshots: they take part in collectives); only rank 0 writes the history, the TensorBoard
    log and the progress."""
    main = distributed.is_main()
    return [*([stopping] if stopping else []), SnapshotHook(run_dir, cfg.solver, static, monitor=cfg.train.early_stopping_monitor), *([HistoryHook(run_dir)] if main else []),
            *([TensorBoardHook(run_dir)] if cfg.train.tensorboard and main else []), *([] if quiet or not main else [ProgressHook()]), *extra]


class ProgressHook(Hook):
    """A tqdm bar per epoch on a terminal; one plain line per epoch otherwise (logs, CI)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = None

    def _tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def before_epoch(self, trainer: Trainer) -> None:
        if not self._tty():
            return
        from tqdm import tqdm

        st = trainer.state
        self.bar = tqdm(
            total=len(trainer.sampler),
            initial=st.batch,
            desc=f"epoch {st.epoch + 1} [{trainer.phase.name}]",
            unit="batch",
            file=self.stream,
            leave=True,
            dynamic_ncols=True,
        )

    def after_step(self, trainer: Trainer, loss: float) -> None:
        if self.bar is None:
            return
        rate = self.bar.format_dict.get("rate") or 0.0
        self.bar.set_postfix(**trainer.task.progress(trainer.state.running), img_s=f"{rate * trainer.solver.batch_size:.0f}", refresh=False)
        self.bar.update(1)

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        line = (
            f"epoch {row['epoch']:>3} [{row['phase']}] lr {row['lr']:.2e} {trainer.task.epoch_summary(row)} "
            f"({row['seconds']:.1f}s, {len(trainer.train_data) / max(row['seconds'], 1e-9):.1f} img/s)"
        )
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(line, file=self.stream, flush=True)

    def on_interrupt(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_phase(self, trainer: Trainer) -> None:
        """Say what early stopping did to the phase (it has already restored the best weights)."""
        stopping = next((h for h in trainer.hooks if isinstance(h, EarlyStoppingHook)), None)
        if stopping is None or not stopping.phases or stopping.phases[-1]["phase"] != trainer.phase.name:
            return
        print(stopping.describe(stopping.phases[-1], trainer.phase.epochs), file=self.stream, flush=True)


def improves(monitor: str, value: float, best: float | None) -> bool:
    """Is ``value`` of ``monitor`` better than ``best`` (lower loss, higher anything else)?"""
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


class EarlyStoppingHook(Hook):
    """Keras' ``EarlyStopping(patience, restore_best_weights=True)``, per phase: a phase ends after
    ``patience`` epochs without a better ``monitor`` on the validation split, and at the end of
    every phase (stopped or not) the model goes back to the phase's best epoch, so the next phase
    starts from there. Each history row gets ``best_epoch`` (the phase's best so far); the best
    weights and the counters are in every snapshot, so a resumed run stops where it would have."""

    key = "early_stopping"

    def __init__(self, patience: int, monitor: str = "val_loss") -> None:
        self.patience, self.monitor = patience, monitor
        self.best: dict[str, Any] | None = None  # {"epoch", "value", "phase"} of the current phase
        self.best_state: dict[str, Any] | None = None
        self.waited = 0
        self.phases: list[dict[str, Any]] = []  # what happened in each finished phase

    def _better(self, value: float) -> bool:
        return improves(self.monitor, value, None if self.best is None else self.best["value"])

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        value = row.get(self.monitor)
        if value is None:  # no validation images: nothing to judge by
            return
        if self._better(value):
            self.best = {"epoch": row["epoch"], "value": float(value), "phase": row["phase"]}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}
            self.waited = 0
        else:
            self.waited += 1
            if self.waited >= self.patience and not trainer.phase_done():
                trainer.stop_phase()
        row["best_epoch"] = self.best["epoch"]

    def after_phase(self, trainer: Trainer) -> None:
        st = trainer.state
        record = {"phase": trainer.phase.name, "epochs_run": st.epoch_in_phase, "stopped_early": st.phase_stopped, "best_epoch": None, "best": None}
        if self.best is not None:
            record.update(best_epoch=self.best["epoch"], best=self.best["value"], restored=self.best["epoch"] != st.epoch)
            if self.best["epoch"] != st.epoch:
                trainer.model.load_state_dict(self.best_state)
        self.phases.append(record)
        self.best, self.best_state, self.waited = None, None, 0

    def summary(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "patience": self.patience, "phases": self.phases}

    def describe(self, record: dict[str, Any], planned: int | None = None) -> str:
        """One phase's record in words, for the console and the report."""
        return describe_stop(record, self.monitor, planned)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_state": self.best_state, "waited": self.waited, "phases": self.phases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_state, self.waited, self.phases = state["best"], state["best_state"], state["waited"], state["phases"]


def describe_stop(record: dict[str, Any], monitor: str, planned: int | None = None) -> str:
    ran = f"{record.get('epochs_run')} of {plural(planned, 'epoch')}" if planned else plural(record.get("epochs_run"), "epoch")
    if record.get("best_epoch") is None:
        return f"early stopping, {record.get('phase')}: {ran}, no validation figure to judge by"
    how = "stopped early after" if record.get("stopped_early") else "ran"
    kept = f"restored epoch {record['best_epoch']}" if record.get("restored") else f"kept its last epoch ({record['best_epoch']}), the best"
    return f"early stopping, {record.get('phase')}: {how} {ran}; {kept} ({monitor} {record['best']:.4f})"
