"""Fine-tune-mode expansion of a detector: the backbone's top adapts to the new classes while
distillation keeps what the original detector sees.

The old detector's neck and heads stay frozen, so its detections change only through the
features it reads. The distillation term therefore compares the old detector's neck outputs (the
FPN maps its heads read) with those of the original model on the same batch: a relative squared
error per pyramid level, ``mean((student - teacher)^2) / mean(teacher^2)``, averaged over levels
and weighted by ``expand.distill_weight``. This is the feature distillation of Faster ILOD (Peng
et al. 2020); for a frozen head it bounds the change of every old output (class scores, boxes,
and for Faster R-CNN the proposals) at once, whatever the head kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.task import DetectionTask, _term, run_detector

if TYPE_CHECKING:
    from graft.engine.loop import Trainer


def neck_maps(model: GraftDetector, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The base detector's FPN maps over backbone ``features``."""
    from collections import OrderedDict

    return list(model.detector.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())


def relative_l2(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    terms = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


class DistillingDetectionTask(DetectionTask):
    """``DetectionTask`` plus, whenever the backbone learns (on images, not cached features), the
    distillation of the old detector's neck maps towards ``teacher``'s (the original, frozen)."""

    def __init__(self, val_samples: Sequence[BoxSample], classes: Sequence[str], conf: float, *, teacher: GraftDetector, weight: float) -> None:
        super().__init__(val_samples, classes, conf)
        self.teacher, self.weight = teacher.eval(), weight
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def training_loss(self, trainer: Trainer, inputs: Any, targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        model: GraftDetector = trainer.model
        if not isinstance(inputs, torch.Tensor) or not any(p.requires_grad for p in model.backbone.parameters()):
            return super().training_loss(trainer, inputs, targets)
        self.teacher.to(inputs.device)
        forward = trainer.parallel(model)  # wrapped before any forward: wrapping syncs the weights in place
        features = model.backbone_features(inputs)  # once, for the new classes' loss and the distillation
        losses = run_detector(model, features, targets, forward=forward)
        with torch.no_grad():
            teacher_maps = neck_maps(self.teacher, self.teacher.backbone_features(inputs))
        losses["distill"] = self.weight * relative_l2(neck_maps(model, features), teacher_maps)
        loss = sum(v.float() for v in losses.values())
        n = len(targets)
        return loss, {_term(k): float(v.detach()) * n for k, v in losses.items()}
