"""Images and their boxes as the detector takes them: resized so the longer side is S, padded to
S x S (bottom and right, so box coordinates stay put), augmented with the boxes moving with the
pixels (torchvision ``transforms.v2`` with ``tv_tensors.BoundingBoxes``).

Like ``graft.data.dataset.ImageDataset``, every random draw is a function of (seed, epoch,
index): a resumed run sees the same augmentation. Crowd regions are left out of the training
targets (they are ignored by the loss, honoured by the metric).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from graft.data.dataset import _mix
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from graft.data.transforms import flip_outcomes
from graft.tasks.detect.boxes import BoxSample
from graft.errors import DataError

# Augmentation presets for boxes; ``auto`` resolves to one of them (graft.tasks.detect.runner).
PRESETS = ("none", "flip", "flip-scale", "strong")
PAD_FILL = 114  # grey padding, as YOLO pads


@dataclass(frozen=True)
class BoxAugment:
    hflip: bool = False
    vflip: bool = False
    scale: tuple[float, float] | None = None  # zoom range: below 1 zooms out (padding), above 1 crops in
    color: float = 0.0  # brightness/contrast/saturation jitter

    @classmethod
    def preset(cls, name: str) -> BoxAugment:
        if name == "none":
            return cls()
        if name == "flip":
            return cls(hflip=True)
        if name == "flip-scale":
            return cls(hflip=True, scale=(0.6, 1.4))
        if name == "strong":
            return cls(hflip=True, scale=(0.5, 1.6), color=0.3)
        raise ValueError(f"unknown box augmentation {name!r}; choose one of {', '.join(PRESETS)}")

    @property
    def active(self) -> bool:
        return self.hflip or self.vflip or self.scale is not None or self.color > 0

    @property
    def flips(self) -> list[tuple[bool, bool]] | None:
        """Every outcome ``(hflip, vflip)`` of an augmentation that only flips, identity first: a
        feature cache holds each once. None when anything else is random."""
        return flip_outcomes(self.hflip, self.vflip) if self.scale is None and not self.color else None

    def transforms(self) -> list[Any]:
        out: list[Any] = []
        if self.color:
            out.append(v2.ColorJitter(brightness=self.color, contrast=self.color, saturation=self.color))
        if self.hflip:
            out.append(v2.RandomHorizontalFlip())
        if self.vflip:
            out.append(v2.RandomVerticalFlip())
        if self.scale is not None:
            out.append(_Zoom(self.scale))
        return out


class _Zoom(v2.Transform):
    """Scale jitter on a fixed canvas: zoom out (shrink and pad) or in (enlarge and crop at a
    random place), by a factor drawn log-uniformly from ``scale``."""

    def __init__(self, scale: tuple[float, float]) -> None:
        super().__init__()
        self.low, self.high = float(np.log(scale[0])), float(np.log(scale[1]))

    def forward(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
        h, w = image.shape[-2:]
        factor = float(torch.empty(()).uniform_(self.low, self.high).exp())
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        image, boxes = TF.resize(image, [nh, nw], antialias=True), TF.resize(target["boxes"], [nh, nw])
        if factor >= 1:
            top, left = int(torch.randint(0, nh - h + 1, ())), int(torch.randint(0, nw - w + 1, ()))
            image, boxes = TF.crop(image, top, left, h, w), TF.crop(boxes, top, left, h, w)
        else:
            top, left = int(torch.randint(0, h - nh + 1, ())), int(torch.randint(0, w - nw + 1, ()))
            padding = [left, top, w - nw - left, h - nh - top]
            image, boxes = TF.pad(image, padding, fill=PAD_FILL), TF.pad(boxes, padding)
        return image, {**target, "boxes": boxes}


def resized_size(width: int, height: int, size: int) -> tuple[int, int, float]:
    """(width, height, scale) with the longer side ``size``."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale)), scale


def resize_longer(image: Any, size: int) -> torch.Tensor:
    """A PIL image as uint8 ``[3, h, w]`` with its longer side ``size`` (bilinear, antialiased)."""
    w, h, _ = resized_size(image.width, image.height, size)
    return TF.pil_to_tensor(image.resize((w, h), resample=2))


class BoxDataset(Dataset):
    """``ds[i]`` or ``ds[(i, epoch)]`` -> ``(image float [3, S, S] in 0..1, target)``; the target has
    ``boxes`` (xyxy pixels of that input), ``labels``, ``index`` and ``scale`` (input pixels per
    original pixel)."""

    def __init__(self, samples: Sequence[BoxSample], size: int, augment: BoxAugment | None = None, *, seed: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.samples, self.size = list(samples), size
        self.augment = augment if augment is not None and augment.active else None
        self.pipeline = v2.Compose(self.augment.transforms()) if self.augment else None
        self.seed, self.max_pixels = seed, max_pixels
        self._decoded: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def resized(self, index: int) -> torch.Tensor:
        """The image as uint8 ``[3, h, w]``, longer side S (decoded once, kept)."""
        if index not in self._decoded:
            s = self.samples[index]
            try:
                image = load_image(s.path, max_pixels=self.max_pixels)
            except ImageError as err:
                raise DataError(f"{err} (it was readable when the dataset was scanned; did it change?)") from None
            if image.size != (s.width, s.height):
                raise DataError(f"{s.path}: the image is {image.size[0]}x{image.size[1]} now, {s.width}x{s.height} when the dataset was scanned; did it change?")
            self._decoded[index] = resize_longer(image, self.size)
        return self._decoded[index]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        return self._item(self.resized(index), index, epoch)

    def outcome(self, index: int, hflip: bool, vflip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image ``index`` flipped as asked, boxes moved with it: one outcome of a flips-only augmentation."""
        flips = ([v2.RandomHorizontalFlip(1.0)] if hflip else []) + ([v2.RandomVerticalFlip(1.0)] if vflip else [])
        return self._item(self.resized(index), index, None, v2.Compose(flips) if flips else None)

    def item_from(self, image: Any, index: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The input for an image already loaded (prediction), as ``ds[index]`` would give it."""
        return self._item(resize_longer(image, self.size), index, None)

    def _item(self, pixels: torch.Tensor, index: int, epoch: int | None, fixed: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.samples[index]
        h, w = pixels.shape[-2:]
        scale = w / s.width
        keep = ~s.crowd
        boxes = torch.from_numpy(s.boxes[keep] * np.float32(scale)).reshape(-1, 4)
        labels = torch.from_numpy(s.labels[keep]).long()
        image = tv_tensors.Image(pixels)
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)), "labels": labels}
        if fixed is not None:
            image, target = fixed(image, target)
            target = _sanitize(target, image.shape[-2:])
        elif self.pipeline is not None and epoch is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, epoch, index))
                image, target = self.pipeline(image, target)
            target = _sanitize(target, image.shape[-2:])
        canvas = torch.full((3, self.size, self.size), PAD_FILL, dtype=torch.uint8)
        canvas[:, : image.shape[-2], : image.shape[-1]] = image
        return canvas.float().div_(255), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"],
            "index": torch.tensor(index),
            "scale": torch.tensor(scale, dtype=torch.float32),
        }


def _sanitize(target: dict[str, Any], canvas: Sequence[int]) -> dict[str, Any]:
    """Boxes clipped to the canvas; those left under 2 pixels wide or high dropped with their labels."""
    b = target["boxes"].as_subclass(torch.Tensor)
    h, w = int(canvas[0]), int(canvas[1])
    b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    keep = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
    return {"boxes": b[keep], "labels": target["labels"][keep]}


def collate_boxes(batch: list[tuple[Any, dict[str, torch.Tensor]]]) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """Images of one size stack (cached feature maps stack level by level); targets stay a list
    (their box counts differ)."""
    first = batch[0][0]
    if isinstance(first, (list, tuple)):
        inputs: Any = [torch.stack([item[0][level] for item in batch]) for level in range(len(first))]
    else:
        inputs = torch.stack([image for image, _ in batch])
    return inputs, [target for _, target in batch]
