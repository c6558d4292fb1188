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
import torch.nn.functional as F

from graft.tasks.classify.evaluate import collect_outputs

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


class ClassificationTask(Task):
    """Logits, cross-entropy (or the phase's own loss), accuracy."""

    sums = ("correct",)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def to_device(self, inputs: torch.Tensor, targets: torch.Tensor, trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = inputs.to(trainer.device, non_blocking=True)
        if inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=trainer.memory_format)
        return inputs, targets.to(trainer.device, non_blocking=True)

    def training_loss(self, trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(trainer, inputs)
        if trainer.data.loss is not None:
            loss = trainer.data.loss(logits.float(), targets, inputs)
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        return loss, {"correct": float((logits.argmax(1) == targets).sum())}

    @staticmethod
    def logits(trainer: Trainer, inputs: torch.Tensor) -> torch.Tensor:
        """With the backbone frozen it runs without autograd: only the head builds a graph; with
        cached embeddings or activations the cached part does not run at all."""
        if trainer.data.forward is not None:
            return trainer.data.forward(inputs)
        if trainer.phase.backbone_frozen:
            with torch.no_grad():
                features = trainer.model.backbone(inputs)
            return trainer.model.head(features)
        return trainer.model(inputs)

    def train_columns(self, running: dict[str, float]) -> dict[str, float]:
        seen = max(1.0, running["seen"])
        return {"train_loss": running["loss"] / seen, "train_accuracy": running.get("correct", 0.0) / seen}

    def progress(self, running: dict[str, float]) -> dict[str, str]:
        seen = max(1.0, running["seen"])
        return {"loss": f"{running['loss'] / seen:.3f}", "acc": f"{running.get('correct', 0.0) / seen:.3f}"}

    def epoch_summary(self, row: dict[str, Any]) -> str:
        val = "" if row["val_accuracy"] is None else f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}"
        return f"train_loss {row['train_loss']:.4f} train_acc {row['train_accuracy']:.4f}{val}"

    def validate(self, trainer: Trainer) -> dict[str, float | None]:
        if trainer.val_loader is None:
            return {"val_loss": None, "val_accuracy": None}
        out = collect_outputs(trainer.data.forward or trainer.model, trainer.val_loader, trainer.device, amp=trainer.amp)
        return {"val_loss": float(out.losses.mean()), "val_accuracy": float((out.preds == out.labels).mean())}

