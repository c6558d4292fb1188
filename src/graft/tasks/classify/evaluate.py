"""Running a model over a dataset: logits, losses and the metrics built from them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graft.tasks.classify.metrics import classification_metrics
from graft.engine import distributed
from graft.engine.inference import autocast, in_chunks


@dataclass
class Outputs:
    probs: np.ndarray  # [N, K] softmax probabilities
    labels: np.ndarray  # [N] true labels (-1 where unknown)
    losses: np.ndarray  # [N] cross-entropy per sample (nan where label unknown)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1) if len(self.probs) else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
def collect_outputs(model: nn.Module, batches: Iterable, device: torch.device, *, amp: bool = False) -> Outputs:
    """``batches`` yield ``(images [B,3,S,S], labels [B])``; the model is put in eval mode and back."""
    was_training = model.training
    model.eval()
    probs, labels, losses = [], [], []
    try:
        for images, y in batches:
            images = images.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = in_chunks(model, images)
            logits = logits.float().cpu()
            y = torch.as_tensor(y)
            probs.append(logits.softmax(1))
            labels.append(y)
            known = y >= 0
            loss = torch.full((len(y),), float("nan"))
            if known.any():
                loss[known] = F.cross_entropy(logits[known], y[known], reduction="none")
            losses.append(loss)
    finally:
        model.train(was_training)
    if not probs:
        return Outputs(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Outputs(torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(losses).numpy())


def gathered(out: Outputs) -> Outputs:
    """Every rank's ``Outputs`` over its shard (``distributed.shard``), joined in order: the
    outputs of the whole split, each sample once, on every rank. One process: ``out``."""
    if not distributed.active():
        return out
    parts = [p for p in distributed.all_gather((out.probs, out.labels, out.losses)) if len(p[1])]
    if not parts:
        return out
    return Outputs(*(np.concatenate([p[i] for p in parts]) for i in range(3)))


def metrics_from_outputs(out: Outputs, classes: list[str]) -> dict:
    if len(out.labels) == 0:
        return classification_metrics([], [], classes)
    return classification_metrics(out.labels.tolist(), out.preds.tolist(), classes, losses=out.losses.tolist())
