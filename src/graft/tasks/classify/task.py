"""The classifier's ``Task``: cross-entropy (with label smoothing), accuracy, validation by
``collect_outputs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from graft.engine.task import Task
from graft.tasks.classify.evaluate import collect_outputs, gathered

if TYPE_CHECKING:
    from graft.engine.loop import Trainer



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
        cached embeddings or activations the cached part does not run at all. What learns runs
        through ``trainer.parallel`` (DistributedDataParallel with several processes)."""
        if trainer.data.forward is not None:
            return trainer.parallel(trainer.data.forward)(inputs)
        if trainer.phase.backbone_frozen:
            with torch.no_grad():
                features = trainer.model.backbone(inputs)
            return trainer.parallel(trainer.model.head)(features)
        return trainer.parallel(trainer.model)(inputs)

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
        out = gathered(collect_outputs(trainer.data.forward or trainer.model, trainer.val_loader, trainer.device, amp=trainer.amp))
        return {"val_loss": float(out.losses.mean()), "val_accuracy": float((out.preds == out.labels).mean())}
