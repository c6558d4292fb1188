"""``graft plan``: what a config would train, phase by phase, before any time is spent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graft.config import GraftConfig
from graft.errors import ConfigError, DataError
from graft.data.transforms import augmentation_from_config, preprocessing_for
from graft.models import surgery
from graft.models.backbones import build_model
from graft.train.loop import phase_param_groups
from graft.train.runner import plan_phases


def _count_class_folders(data_dir: str) -> int:
    """Class folders under ``data_dir`` (or its ``train/``), without reading any image."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    base = root / "train" if (root / "train").is_dir() else root
    n = sum(1 for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if n < 2:
        raise DataError(f"graft needs at least 2 classes; {base} has {n} class folder(s)")
    return n


def describe_plan(cfg: GraftConfig, num_classes: int | None = None) -> dict[str, Any]:
    """Phases with their trainable layers, parameter counts and optimizer groups (JSON-able)."""
    if num_classes is None and cfg.data.dir:
        num_classes = _count_class_folders(cfg.data.dir)
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"--classes must be 2 or more, got {num_classes}")
    num_classes = num_classes or 2
    model, _ = build_model(cfg.model, num_classes, load_weights=False, seed=cfg.solver.seed)
    if cfg.model.reinit:
        surgery.reinit(model, cfg.model.reinit)  # validates the patterns
    layers = surgery.backbone_layers(model)
    phases = []
    for phase in plan_phases(cfg, model):
        groups = phase_param_groups(model, phase, cfg.solver, cfg.model.freeze, cfg.model.lr_mult)
        learning = [name for name, module in layers if any(p.requires_grad for p in module.parameters(recurse=False))]
        phases.append(
            {
                "name": phase.name,
                "epochs": phase.epochs,
                "lr": phase.lr,
                "trainable_from_layer": phase.trainable_from,
                "first_trainable_layer": layers[phase.trainable_from][0] if phase.trainable_from is not None and phase.trainable_from < len(layers) else None,
                "parameters": surgery.count_parameters(model),
                "backbone_layers_learning": len(learning),
                "frozen_batchnorm_in_eval": cfg.model.frozen_bn_eval,
                "groups": [
                    {"lr": g["lr"], "weight_decay": g["weight_decay"], "lr_mult": g["lr_mult"], "decay_mult": g["decay_mult"], "tensors": len(g["names"]), "parameters": sum(p.numel() for p in g["params"]), "first": g["names"][0], "last": g["names"][-1]}
                    for g in groups
                ],
            }
        )
    pre = preprocessing_for(model.backbone, cfg.data)
    return {
        "backbone": cfg.model.name,
        "weights": cfg.model.weights,
        "num_classes": num_classes,
        "strategy": cfg.train.strategy,
        "solver": {k: getattr(cfg.solver, k) for k in ("type", "base_lr", "lr_policy", "momentum", "weight_decay", "batch_size", "max_iter")},
        "preprocessing": pre.to_dict(),
        "augmentation": augmentation_from_config(cfg.data).__dict__,
        "reinit": cfg.model.reinit,
        "layers": [{"index": i, "name": name, "type": type(m).__name__, "parameters": sum(p.numel() for p in m.parameters(recurse=False))} for i, (name, m) in enumerate(layers)],
        "phases": phases,
    }


def format_plan(plan: dict[str, Any], *, layers: bool = False) -> str:
    lines = [
        f"backbone {plan['backbone']} (weights: {plan['weights']}), {plan['num_classes']} classes, strategy {plan['strategy']}",
        f"preprocessing: {plan['preprocessing']['input_size']}px, mean {plan['preprocessing']['mean']}, std {plan['preprocessing']['std']}, {plan['preprocessing']['interpolation']}",
        f"solver: {', '.join(f'{k}={v}' for k, v in plan['solver'].items())}",
        f"backbone layers: {len(plan['layers'])} (indices 0..{len(plan['layers']) - 1}; --layers lists them)",
    ]
    if plan["reinit"]:
        lines.append(f"re-initialised after loading: {', '.join(plan['reinit'])}")
    for i, ph in enumerate(plan["phases"], 1):
        c = ph["parameters"]
        where = "head only (backbone frozen)" if ph["trainable_from_layer"] is None else f"from layer {ph['trainable_from_layer']} ({ph['first_trainable_layer']}) on, plus the head"
        lines.append(f"\nphase {i}: {ph['name']}, {ph['epochs']} epochs, lr {ph['lr']:.2e}")
        lines.append(f"  learns: {where}; {ph['backbone_layers_learning']} backbone layers")
        lines.append(f"  parameters: {c['trainable']:,} trainable / {c['frozen']:,} frozen / {c['total']:,} total")
        for g in ph["groups"]:
            lines.append(f"  group lr {g['lr']:.2e} (x{g['lr_mult']:g}) decay {g['weight_decay']:g} (x{g['decay_mult']:g}): {g['tensors']} tensors, {g['parameters']:,} params [{g['first']} .. {g['last']}]")
    if layers:
        lines.append("\nlayers:")
        lines += [f"  {l['index']:>4}  {l['name']:<45} {l['type']:<20} {l['parameters']:>10,}" for l in plan["layers"]]
    return "\n".join(lines)
