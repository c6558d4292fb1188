"""Model surgery: small functions that change what learns, each returning what it changed.

Name patterns (``freeze``, ``lr_mult``, ``reinit``) are names or shell-style globs matched
against parameter or module names, component by component: ``backbone.blocks.6`` and
``backbone.blocks.[5-6]`` mean those blocks and everything in them; ``*.bn1`` every ``bn1``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from graft.errors import ConfigError
from graft.models.blocks import BlockLinear

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def matches(name: str, pattern: str) -> bool:
    """Does ``pattern`` name ``name`` or a module containing it? Both plain names and globs match
    whole dotted components: ``blocks.1`` and ``blocks.[0-3]`` match ``blocks.1.conv.weight``, not ``blocks.10``."""
    if any(c in pattern for c in "*?["):
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
    return name == pattern or name.startswith(pattern + ".")


def match_any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


# ------------------------------------------------------------------------------ layers


def backbone_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's layers in forward order, as ``graft plan`` numbers them: every module that
    owns parameters directly (conv, norm, linear, ...). Names are relative to ``model``."""
    layers = []
    for name, module in model.named_modules():
        # The backbone root itself is a layer when it owns parameters (a ViT's cls_token, pos_embed).
        if name != "backbone" and not name.startswith("backbone."):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            layers.append((name, module))
    return layers


def resolve_fine_tune_at(model: nn.Module, at: int | str | None) -> int:
    """Index of the first backbone layer that learns. ``None``: the last third of the layers."""
    layers = backbone_layers(model)
    n = len(layers)
    if at is None:
        return n - max(1, math.ceil(n / 3))
    if isinstance(at, bool):
        raise ConfigError("train.fine_tune_at must be a layer index or a layer name, not a boolean")
    if isinstance(at, int):
        index = at + n if at < 0 else at
        if not 0 <= index <= n:
            raise ConfigError(f"train.fine_tune_at={at} is out of range: the backbone has {n} layers (0..{n - 1}, or -1..-{n}; {n} trains the head only); `graft plan --layers` lists them")
        return index
    name = at if at.startswith("backbone.") else f"backbone.{at}"
    for i, (layer_name, _) in enumerate(layers):
        if matches(layer_name, name):
            return i
    raise ConfigError(f"train.fine_tune_at='{at}' names no layer of the backbone; `graft plan` lists the layer names")


# ------------------------------------------------------------------------------ freezing


def freeze(model: nn.Module, *, before: int | None = None, patterns: Sequence[str] = ()) -> list[str]:
    """Freeze backbone layers ``[0, before)`` (Keras ``fine_tune_at``) and every parameter matching
    ``patterns``. Returns the names of the parameters it froze. Frozen parameters get no gradient."""
    frozen = []
    to_freeze: set[str] = set()
    if before is not None:
        for layer_name, module in backbone_layers(model)[:before]:
            to_freeze.update(f"{layer_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    for name, param in model.named_parameters():
        if name in to_freeze or match_any(name, patterns):
            if param.requires_grad:
                frozen.append(name)
            param.requires_grad_(False)
            param.grad = None
    return frozen


def freeze_backbone(model: nn.Module) -> list[str]:
    return freeze(model, patterns=["backbone"])


def unfreeze_all(model: nn.Module) -> int:
    count = 0
    for param in model.parameters():
        if not param.requires_grad:
            count += 1
        param.requires_grad_(True)
    return count


def set_frozen_batchnorm_eval(model: nn.Module) -> list[str]:
    """Put BatchNorm layers whose affine parameters are all frozen into eval mode (running
    statistics used and not updated). Affine-less BatchNorm counts as frozen when the layers
    around it are, so it follows its parent module. Returns the names it set."""
    modules = dict(model.named_modules())
    changed = []
    for name, module in modules.items():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        params = list(module.parameters(recurse=False))
        if not params:  # affine-free: frozen when everything in its parent module is
            parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
            params = list(parent.parameters()) if parent is not None else []
        if params and not any(p.requires_grad for p in params):
            module.eval()
            changed.append(name)
    return changed



def batchnorm_inference(model: nn.Module, *, every: bool, frozen: bool) -> list[str]:
    """After ``model.train()``: BatchNorm layers in inference mode, ``every`` one (Keras' advice
    for fine-tuning) or only the ``frozen`` ones. Returns the names it set."""
    if every:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for n in names:
            model.get_submodule(n).eval()
        return names
    return set_frozen_batchnorm_eval(model) if frozen else []


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


# ------------------------------------------------------------------------------ lr_mult


def _timm_no_decay(model: nn.Module) -> set[str]:
    """Names timm marks as never decayed (a ViT's cls_token and pos_embed), as full parameter names."""
    backbone = getattr(model, "backbone", None)
    names = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    return {f"backbone.{n}" for n in names}


def _is_no_decay(name: str, param: torch.Tensor, module_of: dict[str, nn.Module], extra: set[str]) -> bool:
    owner = module_of.get(name.rsplit(".", 1)[0])
    return param.ndim <= 1 or isinstance(owner, _NORM_TYPES) or name in extra


def check_rule_patterns(model: nn.Module, freeze: Sequence[str], lr_rules: Sequence[Any]) -> None:
    """A ``model.freeze`` pattern or ``model.lr_mult`` rule that names no parameter is a typo that
    would train what the user meant to freeze: an error, as for ``model.reinit``."""
    names = [name for name, _ in model.named_parameters()]
    for key, patterns in (("model.freeze", list(freeze)), ("model.lr_mult", [r.pattern for r in lr_rules])):
        unused = [p for p in patterns if not any(matches(n, p) for n in names)]
        if unused:
            raise ConfigError(f"{key} pattern(s) {unused} match no parameter; `graft plan --layers` lists the layer names")


def apply_lr_mult_freezing(model: nn.Module, rules: Sequence[Any]) -> list[str]:
    """Freeze every parameter whose first matching rule has ``lr_mult == 0`` (Caffe's way)."""
    frozen = []
    for name, param in model.named_parameters():
        rule = next((r for r in rules if matches(name, r.pattern)), None)
        if rule is not None and rule.lr_mult == 0:
            if param.requires_grad:
                frozen.append(name)
            param.requires_grad_(False)
    return frozen


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    rules: Sequence[Any] = (),
    no_decay_bias_norm: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the trainable parameters, one per distinct
    (lr_mult, decay_mult). The first rule whose pattern matches a parameter sets its multipliers;
    biases and normalisation weights get no decay when ``no_decay_bias_norm``. Each group carries
    ``names`` (parameter names, in model order) so a snapshot can rebuild the same groups.
    Frozen parameters are left out: they get no optimizer state."""
    module_of = dict(model.named_modules())
    extra_no_decay = _timm_no_decay(model) if no_decay_bias_norm else set()
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((r for r in rules if matches(name, r.pattern)), None)
        lr_mult = rule.lr_mult if rule else 1.0
        decay_mult = rule.decay_mult if rule else 1.0
        if lr_mult == 0:
            continue
        if no_decay_bias_norm and _is_no_decay(name, param, module_of, extra_no_decay):
            decay_mult = 0.0
        key = (lr_mult, decay_mult)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr": lr * lr_mult,
                "initial_lr": lr * lr_mult,
                "weight_decay": weight_decay * decay_mult,
                "lr_mult": lr_mult,
                "decay_mult": decay_mult,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------ reinit


def reinit(model: nn.Module, patterns: Sequence[str], *, generator_seed: int | None = None) -> list[str]:
    """Re-initialise every module matching ``patterns`` with its own ``reset_parameters`` (Caffe
    re-initialises a renamed layer). Returns the module names; a pattern matching nothing is an error."""
    if not patterns:
        return []
    done = []
    used = {p: False for p in patterns}
    for name, module in model.named_modules():
        hit = [p for p in patterns if matches(name, p)]
        if not hit:
            continue
        for p in hit:
            used[p] = True
        if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
            if generator_seed is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(generator_seed + len(done))
                    module.reset_parameters()
            else:
                module.reset_parameters()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
            done.append(name)
    unused = [p for p, ok in used.items() if not ok]
    if unused:
        raise ConfigError(f"model.reinit pattern(s) {unused} match no layer; `graft plan` lists the layer names")
    return done


# ------------------------------------------------------------------------------ widen the head


def widen_head(model: nn.Module, new_classes: int, *, seed: int = 0) -> dict[str, int]:
    """Add ``new_classes`` outputs to ``model.head.fc`` (K -> K + N). The old K rows, weights and
    bias, are kept as they are (as their own block, so their logits stay bit-identical) and the N
    new rows are initialised from ``seed``. Returns the counts of what changed."""
    if new_classes < 1:
        raise ConfigError(f"widen_head needs at least one new class, got {new_classes}")
    fc = model.head.fc
    old_blocks = list(fc.blocks) if isinstance(fc, BlockLinear) else [fc]
    in_features = old_blocks[0].in_features
    old = sum(b.out_features for b in old_blocks)
    widened = BlockLinear(in_features, [b.out_features for b in old_blocks] + [new_classes])
    with torch.no_grad():
        for target, source in zip(widened.blocks, old_blocks):
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            widened.blocks[-1].reset_parameters()
    widened.to(old_blocks[0].weight.device)
    model.head.fc = widened
    return {"old_classes": old, "new_classes": new_classes, "new_parameters": new_classes * in_features + new_classes}


def parameter_changes(original: nn.Module, expanded: nn.Module, added: int, *, old_name: Callable[[str], str] = lambda name: name) -> dict[str, int]:
    """What an expansion changed, counted by comparing tensors: old parameters (found in
    ``original`` under ``old_name(name)``) whose values differ, and new ones. ``added``: how many
    new parameters the surgery said it added."""
    before = dict(original.named_parameters())
    changed = unchanged = new = 0
    for name, param in expanded.named_parameters():
        was = old_name(name)
        if was in before and before[was].shape == param.shape:
            diff = int((before[was].detach().cpu() != param.detach().cpu()).sum())
            changed += diff
            unchanged += param.numel() - diff
        else:
            new += param.numel()
    buffers_before = dict(original.named_buffers())
    buffers_changed = sum(int((buffers_before[n].cpu() != b.cpu()).sum()) for n, b in expanded.named_buffers() if n in buffers_before and b.is_floating_point() and buffers_before[n].shape == b.shape)
    return {"total": changed + unchanged + new, "added": new, "old_changed": changed, "old_unchanged": unchanged, "changed": changed + new, "buffers_changed": buffers_changed, "expected_added": added}
