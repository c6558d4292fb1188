"""What ``auto`` became for a run (augmentation, head rate), with the validation trials it was
decided on: saved with the run, so a resumed or expanded run does not decide again. Each task
searches its own way (``tasks/*/autotune.py``) and returns a ``Decision``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from graft.configuration import GraftConfig



@dataclass
class Trial:
    augment: str
    lr: float
    val_accuracy: float
    val_loss: float
    epoch: int  # the epoch scored (the last, or the best one under early stopping)


@dataclass
class Decision:
    """What ``auto`` became, and the validation figures it was decided on."""

    augment: str | None = None  # None: the user set data.augment
    head_lr: float | None = None  # None: the user set train.head_lr (or there is no head phase)
    epochs: int = 0
    trials: list[Trial] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def apply(self, cfg: GraftConfig) -> GraftConfig:
        """The config with the decided values in place of ``auto``: saved as the run's config, so
        a resumed or expanded run uses them without deciding again."""
        out = cfg.model_copy(deep=True)
        if self.augment is not None:
            out.data.augment = self.augment
        if self.head_lr is not None:
            out.train.head_lr = self.head_lr
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"augment": self.augment, "head_lr": self.head_lr, "epochs": self.epochs, "note": self.note, "seconds": round(self.seconds, 2), "trials": [asdict(t) for t in self.trials]}

    def summary(self) -> list[str]:
        """Lines for the console: the choice, then each candidate's best validation figure."""
        if not self.trials:
            return [f"auto: {self.note}"]
        chosen = [f"augmentation {self.augment}" if self.augment else None, f"head lr {self.head_lr:.0e}" if self.head_lr else None]
        lines = [f"auto: {', '.join(c for c in chosen if c)}, chosen on {self.note} ({self.seconds:.1f}s)"]
        for aug in dict.fromkeys(t.augment for t in self.trials):
            row = [t for t in self.trials if t.augment == aug]
            best = _best(row)
            rates = "  ".join(f"{t.lr:.0e}: {100 * t.val_accuracy:.1f}%" for t in row)
            lines.append(f"  augment {aug:<11} best val accuracy {100 * best.val_accuracy:5.1f}% (loss {best.val_loss:.3f})" + (f"   [lr {rates}]" if len(row) > 1 else ""))
        return lines


def wants_decision(cfg: GraftConfig) -> bool:
    return cfg.data.augment == "auto" or cfg.train.head_lr == "auto"


def _best(trials: list[Trial]) -> Trial:
    """Highest validation accuracy; equal accuracy goes to the lower validation loss, then to the
    earlier candidate (less augmentation, lower rate)."""
    return max(trials, key=lambda t: (round(t.val_accuracy, 9), -t.val_loss))  # max keeps the first of equals


def fallback(cfg: GraftConfig, note: str) -> Decision:
    """Without validation images nothing can be compared: no augmentation (it never turns one
    class into another) and ``solver.base_lr``."""
    return Decision(
        augment="none" if cfg.data.augment == "auto" else None,
        head_lr=cfg.solver.base_lr if cfg.train.head_lr == "auto" else None,
        note=note,
    )
