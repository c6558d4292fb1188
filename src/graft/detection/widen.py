"""Widening a trained detector from K to K+N classes without touching the old ones (issue: detector
expansion). This module is the surgery; ``graft.detection.expand`` trains the new block.

For the sigmoid heads (FCOS, RetinaNet), a class's score at a location depends on its own logit
alone, so the old classes keep their scores exactly when the old logits do:

- the last classification conv becomes a ``BlockConv2d``: the original conv as the old block, a
  fresh one for the new classes, their outputs interleaved in torchvision's (anchor, class)
  channel layout. The old block computes exactly what the original conv computed (one wider conv
  would not: its blocking depends on its width), so old logits are bit-identical;
- detections are post-processed per class block and merged (``BlockPostprocess``): torchvision
  keeps the top candidates and the top detections over all classes together, where new classes
  could crowd old detections out. Per block, the old block's detections are the original model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from graft.detection.model import GraftDetector

SIGMOID_HEADS = ("fcos", "retinanet")
PRIOR_PROBABILITY = 0.01  # torchvision's initial foreground probability for a classification logit


class BlockConv2d(nn.Module):
    """``blocks[i]`` maps the features to ``anchors * classes[i]`` channels; the output has
    ``anchors * sum(classes)`` channels, class-major within each anchor as torchvision expects."""

    def __init__(self, blocks: Sequence[nn.Conv2d], anchors: int, classes: Sequence[int]) -> None:
        super().__init__()
        if len(blocks) != len(classes) or any(b.out_channels != anchors * k for b, k in zip(blocks, classes)):
            raise ValueError("each block needs anchors x its classes output channels")
        self.blocks = nn.ModuleList(blocks)
        self.anchors, self.classes = anchors, list(classes)

    @property
    def out_channels(self) -> int:
        return self.anchors * sum(self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for block, k in zip(self.blocks, self.classes):
            y = block(x)
            n, _, h, w = y.shape
            outs.append(y.view(n, self.anchors, k, h, w))
        y = torch.cat(outs, 2)
        return y.view(y.shape[0], self.out_channels, y.shape[-2], y.shape[-1])


class BlockPostprocess:
    """The detector's own post-processing, run once per class block and merged, so that no block's
    candidates or detections count against another's caps."""

    def __init__(self, postprocess: Callable[..., list[dict[str, torch.Tensor]]], classes: Sequence[int]) -> None:
        self.postprocess, self.classes = postprocess, list(classes)

    def __call__(self, head_outputs: dict[str, list[torch.Tensor]], anchors: Any, image_shapes: Any) -> list[dict[str, torch.Tensor]]:
        merged: list[list[dict[str, torch.Tensor]]] = []
        start = 0
        for k in self.classes:
            part = {**head_outputs, "cls_logits": [c[..., start : start + k].contiguous() for c in head_outputs["cls_logits"]]}  # contiguous: the layout, hence the arithmetic, of the unwidened head
            dets = self.postprocess(part, anchors, image_shapes)
            for d in dets:
                d["labels"] = d["labels"] + start
            merged.append(dets)
            start += k
        out = []
        for per_block in zip(*merged):
            scores = torch.cat([d["scores"] for d in per_block])
            order = torch.argsort(scores, descending=True, stable=True)
            out.append({key: torch.cat([d[key] for d in per_block])[order] for key in ("boxes", "scores", "labels")})
        return out


def class_blocks(model: GraftDetector) -> list[int]:
    """Classes per block of the classification head (one block for a detector never widened)."""
    head = getattr(model.detector, "head", None)
    conv = getattr(getattr(head, "classification_head", None), "cls_logits", None)
    return list(conv.classes) if isinstance(conv, BlockConv2d) else [model.num_classes]


def widen_detector(model: GraftDetector, new_classes: int, *, seed: int = 0) -> dict[str, int]:
    """Add ``new_classes`` outputs to a sigmoid-head detector, old classes unchanged; returns the
    counts of new parameters. Call it again to add more (each addition is a block of its own)."""
    if model.head_kind not in SIGMOID_HEADS:
        raise ValueError(f"widening a {model.head_kind} head is not built yet: only {', '.join(SIGMOID_HEADS)} (sigmoid scores) keep old scores by construction")
    if new_classes < 1:
        raise ValueError("no new classes to add")
    head = model.detector.head.classification_head
    old = head.cls_logits
    anchors = head.num_anchors
    blocks = list(old.blocks) if isinstance(old, BlockConv2d) else [old]
    classes = class_blocks(model)
    first = blocks[0]
    new = nn.Conv2d(first.in_channels, anchors * new_classes, kernel_size=first.kernel_size, stride=first.stride, padding=first.padding)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(new.weight, std=0.01)  # as torchvision initialises a classification head
    nn.init.constant_(new.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    new.to(device=first.weight.device, dtype=first.weight.dtype)
    head.cls_logits = BlockConv2d([*blocks, new], anchors, [*classes, new_classes])
    head.num_classes = sum(classes) + new_classes
    model.num_classes = head.num_classes
    detector = model.detector
    base = detector.postprocess_detections.postprocess if isinstance(detector.postprocess_detections, BlockPostprocess) else detector.postprocess_detections
    detector.postprocess_detections = BlockPostprocess(base, head.cls_logits.classes)
    return {"new_parameters": sum(p.numel() for p in new.parameters())}


def rebuild_blocks(model: GraftDetector, blocks: Sequence[int] | None) -> GraftDetector:
    """A detector built with ``blocks[0]`` classes, widened block by block to a saved layout
    (``model.json``'s ``detector.class_blocks``), ready for the saved weights."""
    for n in list(blocks or [])[1:]:
        widen_detector(model, int(n))
    return model
