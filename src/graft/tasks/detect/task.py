"""Detection as a task of the shared training loop (``graft.engine.task.Task``).

Batches are ``(images [B, 3, S, S], targets)`` or, in a cached frozen phase, ``(features, targets)``
with one tensor per backbone level. The loss is the sum of the detector's terms; each term is
kept in the history (``train_loss_classification``, ...). Validation is COCO mAP on the
validation split, in the original images' pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.dataset import collate_boxes
from graft.tasks.detect.metrics import Prediction, detection_metrics
from graft.tasks.detect.model import GraftDetector
from graft.engine import distributed
from graft.engine.inference import autocast, in_chunks
from graft.engine.task import Task

if TYPE_CHECKING:
    from graft.engine.loop import Trainer


def _term(name: str) -> str:
    return "loss_" + name.removeprefix("loss_")


def _move_targets(targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def run_detector(model: GraftDetector, inputs: torch.Tensor | Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None, *, forward: Any = None) -> Any:
    """The detector on images, or on cached backbone features (a list, one tensor per level).
    ``forward``: what to call instead of ``model`` (its DistributedDataParallel wrapper)."""
    forward = forward or model
    if isinstance(inputs, torch.Tensor):
        return forward(inputs, targets)
    model.cached_features = [f.float() for f in inputs]
    try:
        placeholder = torch.zeros(1, 3, model.size, model.size, device=inputs[0].device).expand(len(inputs[0]), -1, -1, -1)
        return forward(placeholder, targets)
    finally:
        model.cached_features = None


def collect_detections(model: GraftDetector, batches: Iterable, device: torch.device, samples: Sequence[BoxSample], *, amp: bool = False, gather: bool = False) -> list[Prediction]:
    """Detections for every sample, in its original pixels (clipped to the image). ``gather``:
    ``batches`` cover this rank's shard; every rank's detections are joined by image index (each
    image once) and every rank gets all of them."""
    was_training = model.training
    model.eval()
    out: list[Prediction | None] = [None] * len(samples)
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                inputs = inputs.to(device) if isinstance(inputs, torch.Tensor) else [f.to(device) for f in inputs]
                with autocast(device, amp):
                    dets = in_chunks(model, inputs) if isinstance(inputs, torch.Tensor) else run_detector(model, inputs)
                for det, t in zip(dets, targets):
                    i = int(t["index"])
                    s = samples[i]
                    boxes = det["boxes"].float().cpu().numpy() / float(t["scale"])
                    boxes[:, 0::2] = boxes[:, 0::2].clip(0, s.width)
                    boxes[:, 1::2] = boxes[:, 1::2].clip(0, s.height)
                    out[i] = Prediction(boxes, det["scores"].float().cpu().numpy(), det["labels"].cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if gather and distributed.active():
        for part in distributed.all_gather({i: p for i, p in enumerate(out) if p is not None}):
            for i, p in part.items():
                out[i] = p
    return [p if p is not None else Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)) for p in out]


class DetectionTask(Task):
    collate = staticmethod(collate_boxes)

    def __init__(self, val_samples: Sequence[BoxSample], classes: Sequence[str], conf: float = 0.3) -> None:
        self.val_samples, self.classes, self.conf = list(val_samples), list(classes), conf

    def to_device(self, inputs: Any, targets: list[dict[str, torch.Tensor]], trainer: Trainer) -> tuple[Any, list[dict[str, torch.Tensor]]]:
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(trainer.device, non_blocking=True).contiguous(memory_format=trainer.memory_format)
        else:
            inputs = [f.to(trainer.device, non_blocking=True) for f in inputs]
        return inputs, _move_targets(targets, trainer.device)

    def training_loss(self, trainer: Trainer, inputs: Any, targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        losses = run_detector(trainer.model, inputs, targets, forward=trainer.parallel(trainer.model))
        loss = sum(v.float() for v in losses.values())
        n = len(targets)
        return loss, {_term(k): float(v.detach()) * n for k, v in losses.items()}

    def train_columns(self, running: dict[str, float]) -> dict[str, float]:
        seen = max(1.0, running["seen"])
        terms = {f"train_{k}": v / seen for k, v in running.items() if k.startswith("loss_")}
        return {"train_loss": running["loss"] / seen, **terms}

    def validate(self, trainer: Trainer) -> dict[str, float | None]:
        if trainer.val_loader is None:
            return {"val_map": None, "val_map50": None}
        preds = collect_detections(trainer.model, trainer.val_loader, trainer.device, self.val_samples, amp=trainer.amp, gather=True)
        m = detection_metrics(self.val_samples, preds, self.classes, conf=self.conf).metrics
        return {"val_map": m["map"], "val_map50": m["map50"]}

    def progress(self, running: dict[str, float]) -> dict[str, str]:
        seen = max(1.0, running["seen"])
        return {"loss": f"{running['loss'] / seen:.3f}", **{k.removeprefix("loss_")[:8]: f"{v / seen:.3f}" for k, v in running.items() if k.startswith("loss_")}}

    def epoch_summary(self, row: dict[str, Any]) -> str:
        terms = " ".join(f"{k.removeprefix('train_loss_')} {v:.4f}" for k, v in row.items() if k.startswith("train_loss_"))
        val = "" if row.get("val_map") is None else f" val_map {row['val_map']:.4f} val_map50 {row['val_map50']:.4f}"
        return f"train_loss {row['train_loss']:.4f} ({terms}){val}"
