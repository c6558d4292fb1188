"""``graft plan``: what a config would train, phase by phase, before any time is spent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.configuration import GraftConfig
from graft.console import plural
from graft.errors import ConfigError, DataError
from graft.data.transforms import augmentation_from_config, preprocessing_for
from graft.models import surgery
from graft.models.backbones import build_model
from graft.engine.phases import phase_rows, plan_phases
from graft.engine.decision import Decision
from graft.tasks.classify.autotune import wants_decision


def _count_class_folders(data_dir: str) -> int:
    """Class folders under ``data_dir`` (or its ``train/``), without reading any image."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    base = root / "train" if (root / "train").is_dir() else root
    n = sum(1 for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if n < 2:
        raise DataError(f"graft needs at least 2 classes; {base} has {plural(n, 'class folder')}")
    return n


def decide_now(cfg: GraftConfig) -> dict[str, Any]:
    """What graft train would make of ``auto`` on ``cfg.data.dir``, decided the same way."""
    from graft.data.folder import scan_folder
    from graft.data.dataset import default_workers
    from graft.tasks.classify import autotune
    from graft.tasks.classify.caches import decoded_for_search, embedding_cache
    from graft.engine.device import select_device

    if not cfg.data.dir:
        raise ConfigError("graft plan --decide needs --data DIR: the decision is made on its validation split")
    d = cfg.data
    splits = scan_folder(d.dir, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.solver.seed, strict=d.strict, max_pixels=d.max_pixels)
    model, _ = build_model(cfg.model, len(splits.classes), seed=cfg.solver.seed)
    device = select_device(cfg.train.device)
    pre = preprocessing_for(model.backbone, cfg.data)
    cache = embedding_cache(cfg, model.to(device), pre, device, default_workers(), stored=cfg.train.embedding_cache)
    has_head = any(p.backbone_frozen for p in plan_phases(cfg, model))
    return autotune.decide(cfg, model, splits, pre, cache, device=device, has_head_phase=has_head, decoded=decoded_for_search(cfg, splits, pre), say=lambda m: None).to_dict()


def describe_plan(cfg: GraftConfig, num_classes: int | None = None, *, decide: bool = False) -> dict[str, Any]:
    """Phases with their trainable layers, parameter counts and optimizer groups (JSON-able).
    ``decide``: decide what is ``auto`` on the data now (costs the embeddings), as training would."""
    decided = None
    if decide and wants_decision(cfg):
        decided = decide_now(cfg)
        cfg = Decision(augment=decided["augment"], head_lr=decided["head_lr"]).apply(cfg)
    if num_classes is None and cfg.data.dir:
        num_classes = _count_class_folders(cfg.data.dir)
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"--classes must be 2 or more, got {num_classes}")
    num_classes = num_classes or 2
    model, _ = build_model(cfg.model, num_classes, load_weights=False, seed=cfg.solver.seed)
    if cfg.model.reinit:
        surgery.reinit(model, cfg.model.reinit)  # validates the patterns
    surgery.check_rule_patterns(model, cfg.model.freeze, cfg.model.lr_mult)
    layers = surgery.backbone_layers(model)
    phases = phase_rows(cfg, model, layers)
    pre = preprocessing_for(model.backbone, cfg.data)
    return {
        "backbone": cfg.model.name,
        "weights": cfg.model.weights,
        "num_classes": num_classes,
        "strategy": cfg.train.strategy,
        "solver": {k: getattr(cfg.solver, k) for k in ("type", "base_lr", "lr_policy", "momentum", "weight_decay", "batch_size", "max_iter")},
        "preprocessing": pre.to_dict(),
        "augmentation": augmentation_from_config(cfg.data).__dict__,
        "auto": _auto(cfg, decided),
        "reinit": cfg.model.reinit,
        "layers": [{"index": i, "name": name, "type": type(m).__name__, "parameters": sum(p.numel() for p in m.parameters(recurse=False))} for i, (name, m) in enumerate(layers)],
        "phases": phases,
    }


def _auto(cfg: GraftConfig, decided: dict[str, Any] | None) -> dict[str, Any]:
    """What is decided from the data, and how (or, after ``--decide``, what it became)."""
    from graft.tasks.classify.autotune import AUTO_AUGMENTS, HEAD_LRS

    pending = {k: v for k, v in (("augment", list(AUTO_AUGMENTS)), ("head_lr", list(HEAD_LRS))) if (cfg.data.augment if k == "augment" else cfg.train.head_lr) == "auto"}
    return {"pending": pending, "decided": decided}


def _format_auto(auto: dict[str, Any]) -> list[str]:
    decided = auto["decided"]
    if decided is not None:
        from graft.tasks.classify.autotune import Trial, summary

        d = Decision(augment=decided["augment"], head_lr=decided["head_lr"], trials=[Trial(**t) for t in decided["trials"]], note=decided["note"], seconds=decided["seconds"])
        return summary(d)
    lines = []
    if "augment" in auto["pending"]:
        lines.append(f"augmentation: auto, decided when training starts: the best of {', '.join(auto['pending']['augment'])} on the validation split (graft plan --decide --data DIR decides now)")
    if "head_lr" in auto["pending"]:
        rates = ", ".join(f"{r:.0e}" for r in auto["pending"]["head_lr"])
        lines.append(f"head lr: auto, decided when training starts by a range test over {rates} on cached embeddings, scored on the validation split; the phase 1 rate below is a placeholder")
    return lines


def plan_header(plan: dict[str, Any]) -> list[str]:
    """The lines above the phases in ``graft plan``: backbone, preprocessing, solver, ``auto``."""
    lines = [
        f"backbone {plan['backbone']} (weights: {plan['weights']}), {plan['num_classes']} class{'es' if plan['num_classes'] != 1 else ''}, strategy {plan['strategy']}",
        f"preprocessing: {plan['preprocessing']['input_size']}px, mean {plan['preprocessing']['mean']}, std {plan['preprocessing']['std']}, {plan['preprocessing']['interpolation']}",
        f"solver: {', '.join(f'{k}={v}' for k, v in plan['solver'].items())}",
        f"backbone layers: {len(plan['layers'])} (indices 0..{len(plan['layers']) - 1}; --layers lists them)",
    ]
    lines += _format_auto(plan["auto"])
    return lines
