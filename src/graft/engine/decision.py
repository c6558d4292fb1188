"""What ``auto`` became for a run (augmentation, head rate), with the validation trials it was
decided on: saved with the run, so a resumed or expanded run does not decide again. Each task
searches its own way (``tasks/*/autotune.py``) and returns a ``Decision``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from graft.configuration import GraftConfig


@dataclass
class Decision:
    """What ``auto`` became, and the validation figures it was decided on."""

    augment: str | None = None  # None: the user set data.augment
    head_lr: float | None = None  # None: the user set train.head_lr (or there is no head phase)
    epochs: int = 0
    trials: list[Any] = field(default_factory=list)  # the task's trials (dataclasses), as they were scored
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
