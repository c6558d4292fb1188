"""``graft plan`` for every task: what a config would train, phase by phase, before any time is
spent. The task describes its model and data; the phases are printed the same way for all."""

from __future__ import annotations

from typing import Any

from graft.configuration import GraftConfig
from graft.console import plural
from graft.pipeline.registry import DEFAULT_TASK, resolve_task, task_named


def describe_plan(cfg: GraftConfig, num_classes: int | None = None, *, decide: bool = False) -> dict[str, Any]:
    """Phases with their trainable layers, parameter counts and optimizer groups (JSON-able), and
    the plan's ``task``. ``decide``: decide what is ``auto`` on the data now (costs what training's
    decision costs), as training would."""
    task = resolve_task(cfg)
    return {"task": task.name, **task.describe_plan(cfg, num_classes, decide=decide)}


def format_plan(plan: dict[str, Any], *, layers: bool = False) -> str:
    """``describe_plan``'s result as text: the task's header, then the phases."""
    return "\n".join(task_named(plan.get("task", DEFAULT_TASK)).plan_header(plan) + format_phases(plan, layers=layers))


def format_phases(plan: dict[str, Any], *, layers: bool = False) -> list[str]:
    lines = []
    batch = plan.get("solver", {}).get("batch_size")
    if batch:
        lines.append(f"batch: {batch} images per step in all; solver.batch_size is the global batch: with P processes (torchrun, --devices) "
                     f"each takes about {batch}/P of every batch, and the learning rates below hold for any P")
    if plan["reinit"]:
        lines.append(f"re-initialised after loading: {', '.join(plan['reinit'])}")
    for i, ph in enumerate(plan["phases"], 1):
        c = ph["parameters"]
        above = plan.get("above_backbone", "the head")
        where = f"{above} only (backbone frozen)" if ph["trainable_from_layer"] is None else f"from layer {ph['trainable_from_layer']} ({ph['first_trainable_layer']}) on, plus {above}"
        lines.append(f"\nphase {i}: {ph['name']}, {plural(ph['epochs'], 'epoch')}, lr {ph['lr']:.2e}")
        lines.append(f"  learns: {where}; {ph['backbone_layers_learning']} backbone layers")
        lines.append(f"  parameters: {c['trainable']:,} trainable / {c['frozen']:,} frozen / {c['total']:,} total")
        for g in ph["groups"]:
            lines.append(f"  group lr {g['lr']:.2e} (x{g['lr_mult']:g}) decay {g['weight_decay']:g} (x{g['decay_mult']:g}): {g['tensors']} tensors, {g['parameters']:,} params [{g['first']} .. {g['last']}]")
    if layers:
        lines.append("\nlayers:")
        lines += [f"  {l['index']:>4}  {l['name']:<45} {l['type']:<20} {l['parameters']:>10,}" for l in plan["layers"]]
    return lines
