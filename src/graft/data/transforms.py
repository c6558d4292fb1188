"""Preprocessing that follows the weights, and augmentation presets on top of it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn

from graft.errors import ConfigError

_INTERPOLATION = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How images become tensors for this model: stored in ``model.json`` so that predicting on a
    finished run uses exactly what training used."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )


def preprocessing_for(backbone: nn.Module, data_cfg: Any | None = None) -> Preprocessing:
    """The backbone's own preprocessing (timm's ``resolve_data_config``), with any of
    ``data.img_size/mean/std/interpolation/crop_pct`` overriding it."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    interp = cfg.get("interpolation", "bicubic")
    pre = Preprocessing(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=interp if interp in _INTERPOLATION else "bicubic",
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
    if data_cfg is None:
        return pre
    return Preprocessing(
        input_size=data_cfg.img_size or pre.input_size,
        mean=tuple(data_cfg.mean) if data_cfg.mean else pre.mean,
        std=tuple(data_cfg.std) if data_cfg.std else pre.std,
        interpolation=data_cfg.interpolation or pre.interpolation,
        crop_pct=data_cfg.crop_pct or pre.crop_pct,
    )


@dataclass(frozen=True)
class Augmentation:
    """Resolved augmentation: a preset with the user's overrides applied."""

    hflip: bool = False
    vflip: bool = False
    rotation: float = 0.0  # degrees
    crop_scale: tuple[float, float] | None = None  # random-resized-crop area range
    color_jitter: float = 0.0

    @property
    def is_identity(self) -> bool:
        return not (self.hflip or self.vflip or self.rotation or self.crop_scale or self.color_jitter)

    @property
    def flips(self) -> list[tuple[bool, bool]] | None:
        """Every outcome ``(hflip, vflip)`` of an augmentation that only flips, identity first (2 or
        4): a cache holds each once instead of random draws that repeat some and miss others.
        None when anything else is random."""
        return flip_outcomes(self.hflip, self.vflip) if not (self.rotation or self.crop_scale or self.color_jitter) else None


def flip_outcomes(hflip: bool, vflip: bool) -> list[tuple[bool, bool]] | None:
    if not (hflip or vflip):
        return None
    return [(h, v) for v in ((False, True) if vflip else (False,)) for h in ((False, True) if hflip else (False,))]


PRESETS = {
    "none": Augmentation(),
    "flip": Augmentation(hflip=True),
    # The Keras tutorial: RandomFlip('horizontal') + RandomRotation(0.2), i.e. +-0.2 of a full turn.
    "flip-rotate": Augmentation(hflip=True, rotation=0.2 * 360.0),
    "strong": Augmentation(hflip=True, rotation=15.0, crop_scale=(0.35, 1.0), color_jitter=0.3),
}


def augmentation_from_config(data_cfg: Any, preset: str | None = None) -> Augmentation:
    """``preset`` (default ``data.augment``) with the ``data.hflip/...`` overrides applied. ``auto``
    is decided from the data before training (``graft.tasks.classify.autotune``); until then it is ``none``."""
    name = preset or data_cfg.augment
    if name not in PRESETS and name != "auto":
        raise ConfigError(f"data.augment {name} is for detectors (it moves boxes); a classifier takes auto, {', '.join(PRESETS)}")
    base = PRESETS["none" if name == "auto" else name]
    return Augmentation(
        hflip=base.hflip if data_cfg.hflip is None else data_cfg.hflip,
        vflip=base.vflip if data_cfg.vflip is None else data_cfg.vflip,
        rotation=base.rotation if data_cfg.rotation is None else data_cfg.rotation,
        crop_scale=base.crop_scale if data_cfg.crop_scale is None else tuple(data_cfg.crop_scale),
        color_jitter=base.color_jitter if data_cfg.color_jitter is None else data_cfg.color_jitter,
    )


def _to_tensor(pre: Preprocessing) -> list[Callable]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def eval_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``input_size / crop_pct``, centre-crop ``input_size``: a
    ``[3, S, S]`` float tensor, normalised."""
    interp = _INTERPOLATION[pre.interpolation]
    resize = int(math.floor(pre.input_size / pre.crop_pct))
    return T.Compose([T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(pre.input_size), *_to_tensor(pre)])


def flipped_transform(pre: Preprocessing, hflip: bool, vflip: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation pipeline with fixed flips: one outcome of a flips-only ``train_transform``."""
    steps = eval_transform(pre).transforms
    flips = ([T.RandomHorizontalFlip(1.0)] if hflip else []) + ([T.RandomVerticalFlip(1.0)] if vflip else [])
    return T.Compose([*steps[:2], *flips, *steps[2:]])


def train_transform(pre: Preprocessing, aug: Augmentation) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation pipeline with augmentation; with no augmentation it *is* the eval pipeline."""
    if aug.is_identity:
        return eval_transform(pre)
    interp = _INTERPOLATION[pre.interpolation]
    steps: list[Callable] = []
    if aug.crop_scale:
        steps.append(T.RandomResizedCrop(pre.input_size, scale=aug.crop_scale, interpolation=interp, antialias=True))
    else:
        steps += [T.Resize(int(math.floor(pre.input_size / pre.crop_pct)), interpolation=interp, antialias=True), T.CenterCrop(pre.input_size)]
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(T.RandomVerticalFlip())
    if aug.rotation:
        steps.append(T.RandomRotation(aug.rotation, interpolation=T.InterpolationMode.BILINEAR))
    if aug.color_jitter:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    return T.Compose([*steps, *_to_tensor(pre)])
