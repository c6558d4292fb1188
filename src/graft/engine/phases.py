"""A run's phases: which run, what learns in each and at which rate (``plan_phases``), and the same
as rows a person reads before any time is spent (``phase_rows``, for ``graft plan``). Shared by
every task: a detector's phases are planned as a classifier's."""

from __future__ import annotations

from typing import Any

from graft.configuration import GraftConfig
from graft.models import surgery
from graft.engine.loop import Phase, phase_param_groups


def plan_phases(cfg: GraftConfig, model: Any) -> list[Phase]:
    """The recipe: which phases run, what learns in each, at which learning rate."""
    t, base = cfg.train, cfg.solver.base_lr
    # Until ``auto`` is decided (graft.tasks.classify.autotune), the head's rate shows as solver.base_lr.
    extract = Phase("feature-extract", t.epochs, None, t.head_lr if isinstance(t.head_lr, float) else base)
    at = surgery.resolve_fine_tune_at(model, t.fine_tune_at)
    if t.strategy == "feature-extract":
        return [extract]
    if t.strategy == "fine-tune":
        return [Phase("fine-tune", t.epochs, at, base * t.fine_tune_lr_mult)]
    phases = [extract, Phase("fine-tune", t.fine_tune_epochs, at, base * t.fine_tune_lr_mult)]
    return [p for p in phases if p.epochs > 0]


def phase_rows(cfg: GraftConfig, model: Any, layers: list) -> list[dict[str, Any]]:
    """Each phase: what learns, at which rate, in which optimizer groups (classifiers and detectors)."""
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
    return phases


def frozen_bn_fixed(cfg: GraftConfig) -> bool:
    """Do frozen BatchNorm layers stay in inference mode (so a frozen part is a fixed function)?"""
    return cfg.model.frozen_bn_eval or cfg.model.bn_inference
