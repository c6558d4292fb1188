"""The detector graft trains: a backbone (timm ``features_only``, or a torchvision detector's own
body) and torchvision's detection machinery above it (FPN, then FCOS, RetinaNet or Faster R-CNN
heads).

``GraftDetector`` keeps the backbone at ``backbone.*`` so that freezing, ``fine_tune_at``,
``lr_mult`` and ``graft plan`` treat it exactly as a classifier's; everything above it lives at
``detector.*``. The torchvision model's own "backbone" is reduced to the neck (FPN) and draws its
input features from ``GraftDetector.features``, which is either the backbone or, in a cached
frozen phase, features computed once.

Contracts, so that no user meets torchvision's traps:
- images: float ``[B, 3, S, S]`` in 0..1, resized (longer side S) and padded by the dataset; the
  detector normalises them and does not resize again;
- boxes: ``[x1, y1, x2, y2]`` float32 pixels of that input; labels ``0..K-1``. Faster R-CNN's
  background class 0 is added and removed here (the ``label_offset``), never by the user.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from graft.models import surgery

HEADS = ("fcos", "retinanet", "fasterrcnn")  # over a timm backbone; torchvision's SSDlite by name adds "ssd"
SOFTMAX_HEADS = ("fasterrcnn", "ssd")  # torchvision gives these a background class 0: graft adds and removes it
FPN_CHANNELS = 128  # lighter than torchvision's 256: graft's backbones are small and its users' GPUs often absent


class InputBatch(GeneralizedRCNNTransform):
    """Normalise and batch images that the dataset already resized and padded to one size (the
    base class would resize them again, and move boxes, to its own ``min_size``)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(min_size=size, max_size=size, image_mean=list(mean), image_std=list(std), size_divisible=32)

    def resize(self, image: torch.Tensor, target: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any] | None]:
        return image, target

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=batch.dtype, device=batch.device)[:, None, None]
        std = torch.as_tensor(self.image_std, dtype=batch.dtype, device=batch.device)[:, None, None]
        return (batch - mean) / std

    def forward(self, images: list[torch.Tensor] | torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> tuple[ImageList, list[dict[str, torch.Tensor]] | None]:
        batch = self.normalise(images if isinstance(images, torch.Tensor) else torch.stack(list(images)))
        sizes = [(int(batch.shape[-2]), int(batch.shape[-1]))] * len(batch)
        return ImageList(batch, sizes), targets


class Neck(nn.Module):
    """What torchvision calls the detector's backbone, minus graft's backbone: an FPN over the
    features that ``source`` (set by ``GraftDetector``) gives for the input batch."""

    def __init__(self, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.fpn = fpn
        self.out_channels = out_channels
        self.source: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # a plain attribute: not a submodule

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.source(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def score_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` from highest to lowest, ties in their given order. ONNX has no stable
    sort, but its TopK puts equal values in index order, so an export uses that."""
    if torch.onnx.is_in_onnx_export():
        return scores.topk(scores.shape[0]).indices
    return torch.argsort(scores, descending=True, stable=True)


class GraftDetector(nn.Module):
    def __init__(self, backbone: nn.Module, detector: nn.Module, *, head: str, classes: int, size: int, strides: list[int], level_sizes: list[float], frozen_bn_eval: bool = True, bn_inference: bool = True) -> None:
        super().__init__()
        self.frozen_bn_eval, self.bn_inference = frozen_bn_eval, bn_inference
        self.backbone = backbone
        self.detector = detector
        self.head_kind = head
        self.num_classes = classes
        self.size = size
        self.strides, self.level_sizes = strides, level_sizes
        self.label_offset = 1 if head in SOFTMAX_HEADS else 0
        self.cached_features: list[torch.Tensor] | None = None  # set for one forward by a cached phase
        detector.backbone.source = self.features
        # Classes in blocks, in label order: ("base", K), then what graft expand added
        # (graft.tasks.detect.widen): "widen" blocks live in ``detector``'s last layer, each "branch"
        # block is a detector of its own in ``branches`` (neck and heads) over the shared backbone.
        self.blocks: list[tuple[str, int]] = [("base", classes)]
        self.branches = nn.ModuleList()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps; without autograd when nothing in the backbone learns."""
        if self.cached_features is not None:
            return self.cached_features
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.backbone.parameters()):
            with torch.no_grad():
                return list(self.backbone(x))
        return list(self.backbone(x))

    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's maps for images in 0..1, normalised as the detector normalises them."""
        return list(self.backbone(self.detector.transform.normalise(images)))

    def train(self, mode: bool = True) -> GraftDetector:
        """As for classifiers: BatchNorm of frozen parts (or every BatchNorm, with bn_inference)
        stays in inference mode. torchvision's FrozenBatchNorm2d has no training mode at all."""
        super().train(mode)
        if mode:
            surgery.batchnorm_inference(self, every=self.bn_inference, frozen=self.frozen_bn_eval)
        return self

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        """Training: a dict of loss terms. Evaluation: per image ``boxes`` (xyxy pixels of the
        input), ``scores`` and ``labels`` (0..K-1).

        With branches, training trains the detector that holds the newest class block, on the
        boxes of its own classes (the others are background to it); evaluation runs the backbone
        once and merges every detector's detections, in score order, with their global labels."""
        if self.training:
            if targets is None:
                raise ValueError("a detector in training mode needs targets")
            if not self.branches:
                shifted = [{"boxes": t["boxes"].float(), "labels": t["labels"] + self.label_offset} for t in targets]
                return self.detector(images, shifted)
            owner = self.block_owners()[-1]
            table = torch.tensor(self.label_tables()[owner], device=images.device)
            local = []
            for t in targets:
                hit = t["labels"][:, None] == table[None, :]
                keep = hit.any(1)
                local.append({"boxes": t["boxes"][keep].float(), "labels": hit[keep].float().argmax(1) + self.label_offset})
            return self.owner(owner)(images, local)
        if not self.branches:
            out = self.detector(images)
            if self.label_offset:
                for o in out:
                    o["labels"] = o["labels"] - self.label_offset
            return out
        shared = self.cached_features is None
        if shared:  # the backbone once, for every detector
            self.cached_features = self.backbone_features(images)
        try:
            per_owner = [self.owner(i)(images) for i in range(1 + len(self.branches))]
        finally:
            if shared:
                self.cached_features = None
        tables = self.label_tables()
        merged = []
        for image_outs in zip(*per_owner):
            labels = [torch.tensor(tables[i], device=o["labels"].device, dtype=torch.long)[o["labels"] - self.label_offset] for i, o in enumerate(image_outs)]
            scores = torch.cat([o["scores"] for o in image_outs])
            order = score_order(scores)
            merged.append({"boxes": torch.cat([o["boxes"] for o in image_outs])[order], "scores": scores[order], "labels": torch.cat(labels)[order]})
        return merged

    def owner(self, index: int) -> nn.Module:
        """Detector 0 is ``detector``, detector i > 0 the branch ``branches[i - 1]``."""
        return self.detector if index == 0 else self.branches[index - 1]

    def block_owners(self) -> list[int]:
        """For each class block, the index of the detector that scores it."""
        owners, branch = [], 0
        for kind, _ in self.blocks:
            if kind == "branch":
                branch += 1
            owners.append(branch if kind == "branch" else 0)
        return owners

    def label_tables(self) -> list[list[int]]:
        """For each detector, the global label of each of its local labels."""
        tables: list[list[int]] = [[] for _ in range(1 + len(self.branches))]
        start = 0
        for owner, (_, n) in zip(self.block_owners(), self.blocks):
            tables[owner].extend(range(start, start + n))
            start += n
        return tables


# ---------------------------------------------------------------------------------- building


def default_level_sizes(strides: Sequence[int]) -> list[float]:
    """Object size each pyramid level answers for: four times its stride (RetinaNet's 32 at P3)."""
    return [4.0 * s for s in strides]


def fit_level_sizes(strides: Sequence[int], box_sizes: Sequence[float]) -> list[float]:
    """Level sizes that fit the data: the defaults, shrunk by a power of two while the smallest
    tenth of the boxes (square root of area, in input pixels) would be below the smallest level's
    range. Never enlarged: a level covers everything above its size anyway."""
    sizes = default_level_sizes(strides)
    if not box_sizes:
        return sizes
    small = sorted(box_sizes)[max(0, int(0.1 * len(box_sizes)) - 1)]
    factor = 1.0
    while small < 0.7 * sizes[0] * factor and factor > 1 / 8:
        factor /= 2
    return [s * factor for s in sizes]


def build_detector(
    head: str,
    backbone: nn.Module,
    channels: list[int],
    strides: list[int],
    *,
    num_classes: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    level_sizes: list[float] | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections: int = 100,
    head_convs: int = 4,
    frozen_bn_eval: bool = True,
    bn_inference: bool = True,
) -> GraftDetector:
    """A detector with ``head`` over ``backbone`` (which maps images to feature maps with
    ``channels`` at ``strides``)."""
    if head not in HEADS:
        raise ValueError(f"unknown detector head {head!r}; choose one of {', '.join(HEADS)}")
    extra = LastLevelMaxPool() if head == "fasterrcnn" else LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)
    fpn = FeaturePyramidNetwork(channels, FPN_CHANNELS, extra_blocks=extra)
    all_strides = [*strides, strides[-1] * 2] if head == "fasterrcnn" else [*strides, strides[-1] * 2, strides[-1] * 4]
    sizes = level_sizes if level_sizes is not None and len(level_sizes) == len(all_strides) else default_level_sizes(all_strides)
    neck = Neck(fpn, FPN_CHANNELS)
    common = {"min_size": size, "max_size": size, "image_mean": list(mean), "image_std": list(std)}
    if head == "fcos":
        anchors = AnchorGenerator(tuple((s / 4,) for s in sizes), ((1.0,),) * len(sizes))  # FCOS: one point per location, sized stride-like
        head_module = FCOSHead(FPN_CHANNELS, 1, num_classes, num_convs=head_convs)
        # The box distances leave the head through a ReLU: started at 0 (torchvision's bias), one
        # large step (Adam's are large) can push them all negative, and then no gradient ever
        # flows again and every box has zero size. Starting them at one anchor size keeps them alive.
        nn.init.constant_(head_module.regression_head.bbox_reg.bias, 1.0)
        model = FCOS(neck, num_classes, anchor_generator=anchors, head=head_module, score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections, topk_candidates=1000, **common)
    elif head == "retinanet":
        scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        anchors = AnchorGenerator(tuple(tuple(s * k for k in scales) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        model = RetinaNet(neck, num_classes, anchor_generator=anchors, score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections, topk_candidates=1000, **common)
    else:
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        roi = MultiScaleRoIAlign([str(i) for i in range(len(strides))], output_size=7, sampling_ratio=2)
        model = FasterRCNN(neck, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=roi, box_score_thresh=score_thresh, box_nms_thresh=nms_thresh, box_detections_per_img=detections, **common)
    model.transform = InputBatch(size, mean, std)
    return GraftDetector(backbone, model, head=head, classes=num_classes, size=size, strides=all_strides, level_sizes=sizes, frozen_bn_eval=frozen_bn_eval, bn_inference=bn_inference)

