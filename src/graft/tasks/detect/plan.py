"""``graft plan --task detect``: the detector a config would train, before any time is spent:
input size, pyramid levels with their strides and object sizes (fitted to the data's boxes when
``--data`` is given), anchors, how each kind of normalisation layer behaves, and the phases."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from graft.configuration import GraftConfig
from graft.tasks.detect.autotune import AUTO_AUGMENTS, FALLBACK, trial_line
from graft.tasks.detect.torchvision_models import is_torchvision_detector
from graft.errors import ConfigError
from graft.models import surgery


def describe_detection_plan(cfg: GraftConfig, num_classes: int | None = None, *, decide: bool = False) -> dict[str, Any]:
    """``decide``: decide ``data.augment: auto`` on the data's validation split now, exactly as
    training would (it costs the candidates' feature caches and short trainings)."""
    from graft.tasks.detect.build import build_detection_model, input_size
    from graft.tasks.detect.runner import apply_detection_defaults, augmentation, box_sizes, scan
    from graft.engine.phases import phase_rows

    apply_detection_defaults(cfg)
    sizes, classes, data, splits = [], None, None, None
    if cfg.data.dir:
        splits = scan(cfg)
        sizes = box_sizes(splits, input_size(cfg))
        classes = splits.classes
        data = {"format": splits.format, "description": splits.description, "counts": splits.counts()}
    k = len(classes) if classes else (num_classes or 1)
    deciding = decide and cfg.data.augment == "auto"
    model, _ = build_detection_model(cfg, k, load_weights=deciding, box_sizes=sizes, seed=cfg.solver.seed)
    decided = _decide_now(cfg, model, splits) if deciding else None
    if cfg.model.reinit:
        surgery.reinit(model, cfg.model.reinit)  # validates the patterns
    surgery.check_rule_patterns(model, cfg.model.freeze, cfg.model.lr_mult)
    layers = surgery.backbone_layers(model)
    anchors = model.detector.anchor_generator if hasattr(model.detector, "anchor_generator") else model.detector.rpn.anchor_generator
    aug_name, aug = augmentation(cfg)
    return {
        "task": "detect",
        "backbone": cfg.model.name,
        "weights": cfg.model.weights,
        "head": model.head_kind,
        "num_classes": k,
        "classes": classes,
        "data": data,
        "strategy": cfg.train.strategy,
        "input_size": model.size,
        "levels": [{"stride": s, "object_size": z} for s, z in zip(model.strides, model.level_sizes)],
        "level_sizes_fitted": cfg.detect.level_sizes == "auto" and bool(sizes) and model.head_kind in ("retinanet", "fasterrcnn") and not is_torchvision_detector(cfg.model.name),
        "box_sizes": _quantiles(sizes),
        "anchors": {"sizes": [list(a) for a in anchors.sizes] if hasattr(anchors, "sizes") else [[z] for z in model.level_sizes], "aspect_ratios": [list(a) for a in anchors.aspect_ratios]},
        "normalisation": _norm_layers(model, cfg),
        "solver": {k: getattr(cfg.solver, k) for k in ("type", "base_lr", "lr_policy", "momentum", "weight_decay", "batch_size", "max_iter")},
        "augmentation": {"preset": cfg.data.augment if cfg.data.augment == "auto" else aug_name, **({} if cfg.data.augment == "auto" else aug.__dict__)},
        "decided": decided,
        "above_backbone": "the FPN and the detection heads",
        "reinit": cfg.model.reinit,
        "layers": [{"index": i, "name": name, "type": type(m).__name__, "parameters": sum(p.numel() for p in m.parameters(recurse=False))} for i, (name, m) in enumerate(layers)],
        "phases": phase_rows(cfg, model, layers),
    }


def _decide_now(cfg: GraftConfig, model: Any, splits: Any) -> dict[str, Any]:
    """What ``graft train`` would make of ``auto``; ``cfg.data.augment`` becomes it."""
    from graft.tasks.detect.runner import decide_auto
    from graft.tasks.detect.task import DetectionTask
    from graft.engine.phases import plan_phases
    from graft.engine.device import seed_everything, select_device

    if splits is None:
        raise ConfigError("graft plan --decide needs --data DIR: the decision is made on its validation split")
    device = select_device(cfg.train.device)
    amp = cfg.train.amp if isinstance(cfg.train.amp, bool) else device.type == "cuda"
    seed_everything(cfg.solver.seed)
    model.to(device)
    decision, train_cache, val_cache, _ = decide_auto(cfg, model, splits, plan_phases(cfg, model), DetectionTask(splits.val, splits.classes, cfg.detect.conf), device=device, amp=amp, say=lambda m: None)
    for cache in (train_cache, val_cache):
        if cache is not None:
            cache.close()
    cfg.data.augment = decision.augment
    return decision.to_dict()


def _quantiles(sizes: list[float]) -> dict[str, float] | None:
    if not sizes:
        return None
    s = sorted(sizes)
    return {f"p{q}": round(s[min(len(s) - 1, int(q / 100 * len(s)))], 1) for q in (5, 50, 95)}


def _norm_layers(model: nn.Module, cfg: GraftConfig) -> list[str]:
    counts: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        for kind in (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm):
            if type(m) is kind or (kind is nn.BatchNorm2d and isinstance(m, nn.modules.batchnorm._BatchNorm)):
                counts.setdefault(kind.__name__, []).append(name)
                break
    lines = []
    if "FrozenBatchNorm2d" in counts:
        lines.append(f"{len(counts['FrozenBatchNorm2d'])} FrozenBatchNorm2d (torchvision's): fixed statistics and affine parameters in every phase")
    if "BatchNorm2d" in counts:
        mode = "in inference mode in every phase (model.bn_inference)" if cfg.model.bn_inference else "in inference mode while frozen (model.frozen_bn_eval)" if cfg.model.frozen_bn_eval else "using batch statistics when they train"
        lines.append(f"{len(counts['BatchNorm2d'])} BatchNorm layers in the backbone: {mode}")
    if "GroupNorm" in counts:
        lines.append(f"{len(counts['GroupNorm'])} GroupNorm layers in the heads: no batch statistics, the same in training and inference")
    return lines


def format_detection_header(plan: dict[str, Any]) -> list[str]:
    lines = [f"detector {plan['head']} on backbone {plan['backbone']} (weights: {plan['weights']}), {plan['num_classes']} class{'es' if plan['num_classes'] != 1 else ''}, strategy {plan['strategy']}"]
    if plan["data"]:
        lines.append(f"data: {plan['data']['description']}")
    if plan["box_sizes"]:
        b = plan["box_sizes"]
        lines.append(f"box sizes (square root of area, input pixels): 5% {b['p5']}, median {b['p50']}, 95% {b['p95']}")
    levels = ", ".join(f"stride {lv['stride']}: {lv['object_size']:g}px" for lv in plan["levels"])
    lines.append(f"input: longer side {plan['input_size']}px, padded square; pyramid levels ({'fitted to the boxes' if plan['level_sizes_fitted'] else 'defaults'}): {levels}")
    lines.append(f"anchors: sizes {plan['anchors']['sizes']}, aspect ratios {plan['anchors']['aspect_ratios'][0]}")
    lines += [f"normalisation: {line}" for line in plan["normalisation"]]
    a = plan["augmentation"]
    if plan.get("decided"):
        d = plan["decided"]
        lines.append(f"augmentation: {d['augment']}, decided now ({d['note']})")
        lines += [trial_line(t) for t in d.get("trials", [])]
    elif a["preset"] == "auto":
        lines.append(f"augmentation: auto, decided when training starts: the best of {', '.join(AUTO_AUGMENTS)} by validation mAP of the frozen phase (boxes move with the pixels; without validation images: {FALLBACK})")
    else:
        lines.append(f"augmentation: {a['preset']} (boxes move with the pixels)")
    lines.append(f"solver: {', '.join(f'{k}={v}' for k, v in plan['solver'].items())}")
    lines.append(f"backbone layers: {len(plan['layers'])} (indices 0..{len(plan['layers']) - 1}; --layers lists them)")
    return lines
