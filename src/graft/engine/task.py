"""The seam between the shared training loop and a kind of model (classifier, detector).

The loop owns phases, optimizers, schedules, snapshots, hooks and the history. A ``Task`` owns
what differs between kinds of model: moving a batch to the device, the forward pass and its loss,
the per-batch figures the history sums (correct predictions, loss terms), and validation. Phases,
caches, snapshots, hooks, config and CLI stay shared; a new kind of model is a new ``Task``, not a
copy of the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch




if TYPE_CHECKING:
    from graft.engine.loop import Trainer


class Task:
    """What the loop asks of a kind of model. ``sums`` names the per-batch figures that
    ``training_loss`` returns; the loop adds them up over an epoch (and keeps them in snapshots)."""

    sums: tuple[str, ...] = ()
    collate: Callable | None = None  # the loaders' collate_fn; None: PyTorch's default

    def to_device(self, inputs: Any, targets: Any, trainer: Trainer) -> tuple[Any, Any]:
        raise NotImplementedError

    def batch_size(self, targets: Any) -> int:
        return len(targets)

    def training_loss(self, trainer: Trainer, inputs: Any, targets: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss over the batch, per-batch sums named by ``sums``), under autocast."""
        raise NotImplementedError

    def train_columns(self, running: dict[str, float]) -> dict[str, float]:
        """History columns from an epoch's sums (``running['seen']`` samples)."""
        seen = max(1.0, running["seen"])
        return {"train_loss": running["loss"] / seen}

    def validate(self, trainer: Trainer) -> dict[str, float | None]:
        """History columns of the validation pass (``None`` values without validation data)."""
        raise NotImplementedError

    def progress(self, running: dict[str, float]) -> dict[str, str]:
        """The progress bar's figures for the epoch so far."""
        seen = max(1.0, running["seen"])
        return {"loss": f"{running['loss'] / seen:.3f}", **{k: f"{running.get(k, 0.0) / seen:.3f}" for k in self.sums}}

    def epoch_summary(self, row: dict[str, Any]) -> str:
        """An epoch's history row in a line: every train_ and val_ column the task wrote."""
        return " ".join(f"{k} {v:.4f}" for k, v in row.items() if (k.startswith("train_") or k.startswith("val_")) and isinstance(v, float))


