"""Adding classes to a trained detector without touching the old ones (issue: detector expansion).
This module is the surgery; ``graft.tasks.detect.expand`` trains the new block. Two ways:

- ``add_branch``: the new classes get a detector of their own (a copy of the neck and heads, a
  fresh classification layer) over the shared backbone; ``GraftDetector`` merges the detections.
  The original detector is not touched at all. Costs a second neck and head at inference.
- ``widen_detector``: the new classes become new outputs of the last classification layer; only
  that layer's new block learns, on the old neck and towers. No extra inference cost, but the new
  classes must make do with features and box regression trained for the old ones.

For the sigmoid heads (FCOS, RetinaNet), a class's score at a location depends on its own logit
alone, so the old classes keep their scores exactly when the old logits do. When widening:

- the last classification conv becomes a ``BlockConv2d``: the original conv as the old block, a
  fresh one for the new classes, their outputs interleaved in torchvision's (anchor, class)
  channel layout. The old block computes exactly what the original conv computed (one wider conv
  would not: its blocking depends on its width), so old logits are bit-identical;
- detections are post-processed per class block and merged (``BlockPostprocess``): torchvision
  keeps the top candidates and the top detections over all classes together, where new classes
  could crowd old detections out. Per block, the old block's detections are the original model's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from graft.tasks.detect.model import GraftDetector, score_order

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
            order = score_order(scores)
            out.append({key: torch.cat([d[key] for d in per_block])[order] for key in ("boxes", "scores", "labels")})
        return out


def class_blocks(model: GraftDetector) -> list[int]:
    """Classes per block, in label order (one block for a detector never expanded)."""
    return [n for _, n in model.blocks]


def block_kinds(model: GraftDetector) -> list[str]:
    """How each block was added: base, widen (new outputs of the last layer), branch (a detector of its own)."""
    return [kind for kind, _ in model.blocks]


def _new_class_conv(like: nn.Conv2d, outputs: int, seed: int) -> nn.Conv2d:
    """A classification conv as torchvision initialises one: small weights, the prior's bias."""
    conv = nn.Conv2d(like.in_channels, outputs, kernel_size=like.kernel_size, stride=like.stride, padding=like.padding)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    return conv.to(device=like.weight.device, dtype=like.weight.dtype)


def _check_sigmoid(model: GraftDetector, new_classes: int) -> None:
    if model.head_kind not in SIGMOID_HEADS:
        raise ValueError(f"widening the last layer of a {model.head_kind} head would change every old score (softmax): add a branch instead")
    if new_classes < 1:
        raise ValueError("no new classes to add")


def widen_detector(model: GraftDetector, new_classes: int, *, seed: int = 0) -> dict[str, int]:
    """Add ``new_classes`` outputs to a sigmoid-head detector, old classes unchanged; returns the
    counts of new parameters. Call it again to add more (each addition is a block of its own)."""
    _check_sigmoid(model, new_classes)
    head = model.detector.head.classification_head
    old = head.cls_logits
    anchors = head.num_anchors
    blocks = list(old.blocks) if isinstance(old, BlockConv2d) else [old]
    classes = list(old.classes) if isinstance(old, BlockConv2d) else [head.num_classes]
    new = _new_class_conv(blocks[0], anchors * new_classes, seed)
    head.cls_logits = BlockConv2d([*blocks, new], anchors, [*classes, new_classes])
    head.num_classes = sum(classes) + new_classes
    detector = model.detector
    base = detector.postprocess_detections.postprocess if isinstance(detector.postprocess_detections, BlockPostprocess) else detector.postprocess_detections
    detector.postprocess_detections = BlockPostprocess(base, head.cls_logits.classes)
    model.blocks.append(("widen", new_classes))
    model.num_classes += new_classes
    return {"new_parameters": sum(p.numel() for p in new.parameters())}


def add_branch(model: GraftDetector, new_classes: int, *, seed: int = 0) -> dict[str, int]:
    """Add ``new_classes`` as a detector of their own over the shared backbone: a copy of the
    detector's neck and heads (a warm start) with a fresh classification layer. The original
    detector is not touched, so its scores and detections stay exactly as they were, and the new
    classes get a neck, towers and box regression that can learn what the old ones never saw."""
    if new_classes < 1:
        raise ValueError("no new classes to add")
    neck = model.detector.backbone
    source = neck.__dict__.pop("source")  # a bound method of the whole model: not to be copied
    try:
        branch = copy.deepcopy(model.detector)
    finally:
        neck.source = source
    branch.backbone.source = model.features
    branch.__dict__.pop("postprocess_detections", None)  # the class's own, not a widened head's blocks
    if model.head_kind in SIGMOID_HEADS:
        head = branch.head.classification_head
        old = head.cls_logits
        head.cls_logits = _new_class_conv(old.blocks[0] if isinstance(old, BlockConv2d) else old, head.num_anchors * new_classes, seed)
        head.num_classes = new_classes
    else:  # Faster R-CNN, SSDlite: a fresh class predictor with its own background class, softmax over the new classes only
        from graft.tasks.detect.torchvision_models import _replace_predictor

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _replace_predictor(branch, model.head_kind, new_classes + model.label_offset)
        branch.to(next(model.detector.parameters()).device)
    model.branches.append(branch)
    model.blocks.append(("branch", new_classes))
    model.num_classes += new_classes
    return {"new_parameters": sum(p.numel() for p in branch.parameters())}


CLASS_LAYERS = {"fcos": "head.classification_head.cls_logits", "retinanet": "head.classification_head.cls_logits", "fasterrcnn": "roi_heads.box_predictor", "ssd": "head.classification_head"}


def branch_class_layer(model: GraftDetector, index: int = -1) -> str:
    """The name of a branch's fresh class layer (what learns at the full rate)."""
    i = index % len(model.branches)
    return f"branches.{i}.{CLASS_LAYERS[model.head_kind]}"


def rebuild_blocks(model: GraftDetector, blocks: Sequence[int] | None, kinds: Sequence[str] | None = None) -> GraftDetector:
    """A detector built with ``blocks[0]`` classes, expanded block by block to a saved layout
    (``model.json``'s ``detector.class_blocks`` and ``block_kinds``), ready for the saved weights."""
    blocks = list(blocks or [])
    kinds = list(kinds or ["base"] + ["widen"] * (len(blocks) - 1))
    for kind, n in zip(kinds[1:], blocks[1:]):
        (add_branch if kind == "branch" else widen_detector)(model, int(n))
    return model


def add_block(model: GraftDetector, kind: str, new_classes: int, *, seed: int = 0) -> dict[str, int]:
    if kind not in ("branch", "widen"):
        raise ValueError(f"a class block is added as branch or widen, not {kind!r}")
    return (add_branch if kind == "branch" else widen_detector)(model, new_classes, seed=seed)
