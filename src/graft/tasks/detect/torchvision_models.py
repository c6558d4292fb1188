"""torchvision's detectors by name (Faster R-CNN, RetinaNet, FCOS, SSDlite), in graft's form.

``--model fasterrcnn_mobilenet_v3_large_fpn --weights coco`` builds torchvision's model with its
weights enum (which downloads into torch's hub cache on a machine with internet, and reads the
file from there when it is already present), then replaces the class predictor for the user's
classes. The model is then split as every graft detector is: its body becomes
``GraftDetector.backbone`` (so freezing, ``fine_tune_at`` and ``lr_mult`` work by layer) and the rest,
with the FPN as its neck and graft's input batching instead of torchvision's resizing, becomes
``GraftDetector.detector``. SSDlite has no FPN: its MobileNetV3 feature stages are the backbone and
its extra layers the neck. torchvision uses FrozenBatchNorm2d in pretrained backbones; a model
rebuilt for loading gets the same layers, so its weights load exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from graft.tasks.detect.model import SOFTMAX_HEADS, GraftDetector, InputBatch, Neck
from graft.errors import WeightsError

DETECTORS = {
    "fasterrcnn_resnet50_fpn": "fasterrcnn",
    "fasterrcnn_resnet50_fpn_v2": "fasterrcnn",
    "fasterrcnn_mobilenet_v3_large_fpn": "fasterrcnn",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "fasterrcnn",
    "retinanet_resnet50_fpn": "retinanet",
    "retinanet_resnet50_fpn_v2": "retinanet",
    "fcos_resnet50_fpn": "fcos",
    "ssdlite320_mobilenet_v3_large": "ssd",
}
NOT_YET = ("ssd300_vgg16", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SSD_MEAN, SSD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # torchvision's SSDlite scales its input to -1..1


class ListFeatures(nn.Module):
    """torchvision's ``IntermediateLayerGetter`` body, returning its maps as a list."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x).values())


class SSDStages(nn.Module):
    """SSDlite's MobileNetV3 feature stages (C4, then C5), returning both maps."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.features:
            x = stage(x)
            out.append(x)
        return out


class SSDExtra(nn.Module):
    """SSDlite's extra layers, run on the last backbone map: all maps, as torchvision's extractor returns them."""

    def __init__(self, extra: nn.ModuleList) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, maps: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        out = list(maps.values())
        x = out[-1]
        for block in self.extra:
            x = block(x)
            out.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(out))


def coco_categories(name: str) -> list[str]:
    """The category names of the model's COCO weights (index 0 is background, some are "N/A")."""
    return list(get_model_weights(name).DEFAULT.meta["categories"])


def coco_class_names(name: str) -> list[str]:
    """The COCO weights' categories as graft class names, one per label the detector gives: for a
    sigmoid head label i is category i; a softmax head's background (category 0) is graft's
    business, so its labels start at category 1. Unused slots get unique names ("N/A 12")."""
    names = [f"{c} {i}" if c == "N/A" else c for i, c in enumerate(coco_categories(name))]
    return names[1:] if DETECTORS[name] in SOFTMAX_HEADS else names


def coco_weights_file(name: str) -> Path:
    """Where torchvision keeps the model's COCO weights once downloaded (torch's hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / get_model_weights(name).DEFAULT.url.rsplit("/", 1)[1]


def build_torchvision_detector(name: str, num_classes: int, *, weights: str, size: int, score_thresh: float, nms_thresh: float, detections: int, frozen_bn: bool | None = None, bn_inference: bool = True, keep_coco_classes: bool = False) -> tuple[GraftDetector, dict[str, Any]]:
    """(detector, facts for the weights report). ``weights``: coco | none (``frozen_bn`` says
    whether the model being rebuilt had torchvision's frozen BatchNorm). With
    ``keep_coco_classes`` the COCO class predictor stays (``num_classes``: the weights' categories)."""
    kind = DETECTORS[name]
    offset = 1 if kind in SOFTMAX_HEADS else 0
    if weights == "coco":
        enum = get_model_weights(name).DEFAULT
        try:
            model = get_model(name, weights=enum, trainable_backbone_layers=5)
        except Exception as err:  # no internet and no cached file, a damaged file, ...
            raise WeightsError(f"could not load torchvision's COCO weights for {name} ({type(err).__name__}: {str(err)[:200]}); on a machine without internet, put {enum.url.rsplit('/', 1)[1]} into {torch.hub.get_dir()}/checkpoints/") from None
        if not keep_coco_classes:
            _replace_predictor(model, kind, num_classes + offset)
        elif num_classes + offset != len(enum.meta["categories"]):  # every COCO output kept, in order
            raise WeightsError(f"{name}'s COCO weights have {len(enum.meta['categories'])} outputs, not {num_classes + offset}")
        facts = {"source": f"torchvision:{name} ({enum})", "coco_classes": len(enum.meta["categories"])}
    elif weights == "none":
        model = get_model(name, weights=None, weights_backbone=None, num_classes=num_classes + offset)
        if frozen_bn and kind != "ssd":
            _freeze_batchnorm(model.backbone.body)
        facts = {"source": f"torchvision:{name} (random init)"}
    else:
        raise WeightsError(f"weights for torchvision's {name} are coco or none (or a graft run of it), not {weights!r}")
    model.score_thresh = score_thresh
    model.nms_thresh = nms_thresh
    model.detections_per_img = detections
    if kind == "fasterrcnn":
        model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img = score_thresh, nms_thresh, detections
    if kind == "ssd":
        body: nn.Module = SSDStages(model.backbone.features)
        model.backbone = Neck(SSDExtra(model.backbone.extra), 0)  # out_channels is read only while torchvision builds a detector: SSD is built already
        model.transform = InputBatch(size, SSD_MEAN, SSD_STD)
        strides = [16, 32, 64, 128, 256, 512]
        # Default boxes are fractions of the input: the smaller box of each level's pair, in pixels.
        level_sizes = [float(s * size) for s in model.anchor_generator.scales[: len(strides)]]
    else:
        body = ListFeatures(model.backbone.body)
        model.backbone = Neck(model.backbone.fpn, model.backbone.out_channels)
        model.transform = InputBatch(size, IMAGENET_MEAN, IMAGENET_STD)
        strides = [4, 8, 16, 32, 64] if kind == "fasterrcnn" else [8, 16, 32, 64, 128]
        anchors = model.rpn.anchor_generator if kind == "fasterrcnn" else model.anchor_generator
        level_sizes = [float(s[0]) for s in anchors.sizes]
    detector = GraftDetector(body, model, head=kind, classes=num_classes, size=size, strides=strides[: len(level_sizes)], level_sizes=level_sizes, frozen_bn_eval=True, bn_inference=bn_inference)
    facts["frozen_bn"] = any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    return detector, facts


def _replace_predictor(model: nn.Module, kind: str, outputs: int) -> None:
    """A fresh class predictor for ``outputs`` classes; the rest keeps its COCO weights."""
    if kind == "ssd":
        from torchvision.models.detection import _utils as det_utils
        from torchvision.models.detection.ssdlite import SSDLiteClassificationHead

        channels = det_utils.retrieve_out_channels(model.backbone, (320, 320))
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # as torchvision builds it
        model.head.classification_head = SSDLiteClassificationHead(channels, model.anchor_generator.num_anchors_per_location(), outputs, norm)
    elif kind == "fasterrcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, outputs)
    elif kind == "retinanet":
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        old = model.head.classification_head
        norm = partial(nn.GroupNorm, 32) if any(isinstance(m, nn.GroupNorm) for m in old.modules()) else None
        model.head.classification_head = RetinaNetClassificationHead(old.conv[0][0].in_channels, old.num_anchors, outputs, norm_layer=norm)
    else:
        from torchvision.models.detection.fcos import FCOSClassificationHead

        old = model.head.classification_head
        model.head.classification_head = FCOSClassificationHead(old.conv[0].in_channels, old.num_anchors, outputs, num_convs=len([m for m in old.conv if isinstance(m, nn.Conv2d)]))


def _freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm2d layers replaced by FrozenBatchNorm2d (as torchvision builds pretrained bodies)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def is_torchvision_detector(name: str) -> bool:
    return name in DETECTORS


def names() -> Sequence[str]:
    return list(DETECTORS)
