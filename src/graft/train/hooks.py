"""Side concerns of the loop: snapshots, the history file, progress output."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from graft.report import write_history_csv
from graft.train import checkpoint
from graft.train.loop import Hook, Trainer


class SnapshotHook(Hook):
    """``snapshots/PREFIX-0001`` every ``solver.snapshot`` epochs, ``snapshots/last`` every epoch
    and on Ctrl-C. ``static`` (config, classes, data split, preprocessing) goes into each one so a
    snapshot alone is enough to resume."""

    def __init__(self, run_dir: Path, solver: Any, static: dict[str, Any]) -> None:
        self.dir = Path(run_dir) / "snapshots"
        self.interval, self.prefix = solver.snapshot, solver.snapshot_prefix
        self.static = static

    def _payload(self, trainer: Trainer) -> dict[str, Any]:
        return {**trainer.snapshot_payload(), **self.static}

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        epoch = trainer.state.epoch
        last = self.dir / "last"
        if self.interval and epoch % self.interval == 0:
            checkpoint.save_snapshot(self.dir / f"{self.prefix}-{epoch:04d}", self._payload(trainer), also_as=last)
        else:
            checkpoint.save_snapshot(last, self._payload(trainer))

    def on_interrupt(self, trainer: Trainer) -> str:
        return str(checkpoint.save_snapshot(self.dir / "last", self._payload(trainer)))


class HistoryHook(Hook):
    """Rewrites ``history.csv`` after every epoch, so a long run can be watched."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "history.csv"

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        write_history_csv(trainer.state.history, self.path)


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
        r = trainer.state.running
        seen = max(1.0, r["seen"])
        rate = self.bar.format_dict.get("rate") or 0.0
        self.bar.set_postfix(loss=f"{r['loss'] / seen:.3f}", acc=f"{r['correct'] / seen:.3f}", img_s=f"{rate * trainer.solver.batch_size:.0f}", refresh=False)
        self.bar.update(1)

    def after_epoch(self, trainer: Trainer, row: dict[str, Any]) -> None:
        val = "" if row["val_accuracy"] is None else f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}"
        line = (
            f"epoch {row['epoch']:>3} [{row['phase']}] lr {row['lr']:.2e} train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_accuracy']:.4f}{val} ({row['seconds']:.1f}s, {len(trainer.train_data) / max(row['seconds'], 1e-9):.1f} img/s)"
        )
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(line, file=self.stream, flush=True)

    def on_interrupt(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
