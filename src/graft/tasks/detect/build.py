"""From a config to a detector with its weights loaded, and a report of what loading did.

One path for every detector, as ``graft.models.backbones.build_model`` is for classifiers: a timm
backbone (``model.name``) built ``features_only``, loaded from the bundled EfficientNet-Lite0, the
hub, a file or a graft run; then the FPN and the heads of ``detect.head``, initialised fresh from
the seed (or loaded too, from a graft detection run with the same classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch

from graft.tasks.detect.model import GraftDetector, build_detector, default_level_sizes, fit_level_sizes
from graft.tasks.detect.torchvision_models import NOT_YET, build_torchvision_detector, is_torchvision_detector
from graft.errors import WeightsError
from graft.models.backbones import BUNDLED_ARCH, reinit_into_report, WeightsReport, bundled_state_dict, create_backbone, read_weights_file

DEFAULT_SIZE = 512  # detection input (longer side) when data.img_size is not set


def feature_backbone(name: str, levels: int, *, pretrained: bool = False) -> tuple[torch.nn.Module, list[int], list[int]]:
    """timm ``features_only`` model with the deepest ``levels`` feature maps, their channels and strides."""
    if not timm.is_model(name):
        create_backbone(name)  # raises the classifier's "unknown backbone, did you mean" error
    probe = timm.create_model(name, features_only=True, pretrained=False)
    n = len(probe.feature_info.channels())
    if levels > n:
        raise WeightsError(f"detect.levels is {levels}, but backbone '{name}' has only {n} feature levels")
    indices = tuple(range(n - levels, n))
    try:
        model = timm.create_model(name, features_only=True, out_indices=indices, pretrained=pretrained)
    except Exception as err:
        if pretrained:
            raise WeightsError(f"could not load pretrained weights for '{name}' from the hub ({type(err).__name__}: {str(err)[:200]}); on a machine without internet, pass --weights FILE") from err
        raise
    return model, list(model.feature_info.channels()), list(model.feature_info.reduction())


def input_size(cfg: Any) -> int:
    return cfg.data.img_size or DEFAULT_SIZE


def normalisation(cfg: Any, backbone: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pretrained = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = cfg.data.mean or tuple(pretrained.get("mean", (0.485, 0.456, 0.406)))
    std = cfg.data.std or tuple(pretrained.get("std", (0.229, 0.224, 0.225)))
    return tuple(mean), tuple(std)


def build_detection_model(cfg: Any, num_classes: int, *, load_weights: bool = True, box_sizes: Sequence[float] = (), seed: int = 0, level_sizes: list[float] | None = None, frozen_bn: bool | None = None) -> tuple[GraftDetector, WeightsReport]:
    """The detector for ``cfg`` with ``num_classes`` classes. ``box_sizes`` (square roots of the
    training boxes' areas, in input pixels) fit the level sizes when ``detect.level_sizes`` is auto;
    ``level_sizes`` given (a saved run's) override both. A torchvision detector named by
    ``model.name`` brings its own levels; ``frozen_bn`` rebuilds one that had frozen BatchNorm."""
    m, d = cfg.model, cfg.detect
    size = input_size(cfg)
    if m.name in NOT_YET:
        raise WeightsError(f"torchvision's {m.name} is not supported by graft yet (graft trains boxes, not masks or keypoints; SSD300's VGG body is not split yet); use ssdlite320_mobilenet_v3_large, a Faster R-CNN, RetinaNet or FCOS by name, or --model fcos over a timm backbone")
    if is_torchvision_detector(m.name):
        return _torchvision(cfg, num_classes, load_weights=load_weights, seed=seed, frozen_bn=frozen_bn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, channels, strides = feature_backbone(m.name, d.levels, pretrained=load_weights and m.weights == "hub")
        all_strides = [*strides, strides[-1] * 2] if d.head == "fasterrcnn" else [*strides, strides[-1] * 2, strides[-1] * 4]
        if level_sizes is None:
            # FCOS assigns boxes to levels by their extent (P3 takes everything up to 64 pixels from a
            # location to a side) and needs no fitting; anchors must overlap the boxes they learn.
            auto = default_level_sizes(all_strides) if d.head == "fcos" else fit_level_sizes(all_strides, box_sizes)
            level_sizes = list(d.level_sizes) if d.level_sizes != "auto" else auto
        if len(level_sizes) != len(all_strides):
            raise WeightsError(f"detect.level_sizes has {len(level_sizes)} sizes; the {d.head} pyramid has {len(all_strides)} levels (strides {all_strides})")
        mean, std = normalisation(cfg, backbone)
        model = build_detector(
            d.head, backbone, channels, strides, num_classes=num_classes, size=size, mean=mean, std=std, level_sizes=level_sizes,
            score_thresh=d.score_thresh, nms_thresh=d.nms_iou, detections=d.max_detections, head_convs=d.head_convs,
            frozen_bn_eval=m.frozen_bn_eval, bn_inference=m.bn_inference,
        )
    if not load_weights:
        return model, WeightsReport(source="(architecture only)")
    if m.weights == "hub":
        report = WeightsReport(source=f"hub:{m.name}", matched=[k for k in model.state_dict() if k.startswith("backbone.")])
        report.reinitialized = [k for k in model.state_dict() if not k.startswith("backbone.")]
    elif m.weights == "none":
        report = WeightsReport(source="none (random init)", reinitialized=list(model.state_dict()))
    elif m.weights == "bundled":
        if m.name != BUNDLED_ARCH:
            raise WeightsError(f"the bundled weights are for '{BUNDLED_ARCH}', not '{m.name}': set model.weights to hub, none or a weights file")
        report = load_detector_weights(model, bundled_state_dict(), f"bundled:{BUNDLED_ARCH} (ImageNet)")
    else:
        report = load_detector_weights(model, read_weights_file(m.weights), str(m.weights))
    if m.reinit:
        reinit_into_report(model, m.reinit, report, seed)
    return model, report


def _torchvision(cfg: Any, num_classes: int, *, load_weights: bool, seed: int, frozen_bn: bool | None) -> tuple[GraftDetector, WeightsReport]:
    m, d = cfg.model, cfg.detect
    weights = m.weights if load_weights else "none"
    path = None
    if weights not in ("coco", "none"):
        if weights in ("bundled", "hub"):
            raise WeightsError(f"{m.name} is torchvision's detector: use --weights coco (torchvision's COCO weights, downloaded once into the torch hub cache) or none, or a weights file; '{weights}' weights are for timm backbones")
        path, weights = weights, "none"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, facts = build_torchvision_detector(
            m.name, num_classes, weights=weights, size=input_size(cfg), score_thresh=d.score_thresh, nms_thresh=d.nms_iou, detections=d.max_detections,
            frozen_bn=frozen_bn if frozen_bn is not None else path is not None, bn_inference=m.bn_inference,
        )
    if not load_weights:
        return model, WeightsReport(source="(architecture only)")
    if path is not None:
        state = read_weights_file(path)
        if not any(k.startswith(("backbone.", "detector.")) for k in state):
            raise WeightsError(f"{path}: not a graft detection run of {m.name}; pass --weights coco for torchvision's own weights")
        report = load_detector_weights(model, state, str(path))
    else:
        state = model.state_dict()
        fresh = [k for k in state if ("box_predictor" in k or "classification_head" in k)] if weights == "coco" else list(state)
        report = WeightsReport(source=facts["source"], matched=[k for k in state if k not in fresh], reinitialized=fresh)
        if weights == "coco":
            report.notes.append(f"the COCO class predictor ({facts['coco_classes']} classes) is replaced by a fresh one for {num_classes}; `graft expand` keeps COCO's classes instead")
    report.notes.append(f"frozen BatchNorm: {facts['frozen_bn']}")
    model.frozen_bn = facts["frozen_bn"]
    return model, report


def load_detector_weights(model: GraftDetector, state: dict[str, torch.Tensor], source: str) -> WeightsReport:
    """Load a classifier's or backbone's weights (timm keys, or graft ``backbone.*`` keys) into the
    backbone, or a graft detection run's (``backbone.*`` and ``detector.*``) into everything that
    fits. What the backbone lacks (a classifier's last layers) is skipped and listed; a missing
    backbone tensor or one of the wrong shape means other weights: an error."""
    report = WeightsReport(source=source)
    target = model.state_dict()
    incoming: dict[str, torch.Tensor] = {}
    graft_format = any(k.startswith(("backbone.", "detector.")) for k in state)
    for key, tensor in state.items():
        name = key if graft_format else f"backbone.{key}"
        if name.startswith("head."):  # a graft classifier's head: nothing of a detector
            report.skipped.append(key)
            continue
        if name not in target:
            report.skipped.append(key)
            continue
        if target[name].shape != tensor.shape:
            if name.startswith("detector."):
                report.skipped.append(key)
                report.notes.append(f"{key}: shape {tuple(tensor.shape)} in the weights, {tuple(target[name].shape)} here (other classes); starts fresh")
                continue
            raise WeightsError(f"weights from {source} do not fit backbone '{model.backbone.__class__.__name__}': {key} has shape {tuple(tensor.shape)}, the model needs {tuple(target[name].shape)}. Is this the right --model for these weights?")
        incoming[name] = tensor
    missing = [k for k in target if k.startswith("backbone.") and k not in incoming]
    if missing:
        raise WeightsError(f"weights from {source} do not match the backbone: {len(missing)} backbone tensors missing (e.g. {', '.join(missing[:3])}). Is this the right --model for these weights?")
    skipped_backbone = [k for k in report.skipped if not k.startswith(("detector.", "head."))]
    if skipped_backbone:
        report.notes.append(f"{len(skipped_backbone)} tensors of the weights are beyond the feature levels a detector uses (e.g. {', '.join(skipped_backbone[:3])}); skipped")
    model.load_state_dict(incoming, strict=False)
    report.matched = sorted(incoming, key=list(target).index)
    report.reinitialized = [k for k in target if k not in incoming]
    return report
