"""The decoded-image cache: each image is decoded and resized once per run, not once per epoch.

Images are stored as uint8 arrays already resized by the pipeline's own first ``Resize`` (short
side ``input_size / crop_pct``), so the pipeline's resize of a cached image is an identity and
its output is bit-identical to decoding the file again. Pipelines that start with a
random-resized crop (the ``strong`` preset) need the full-resolution file and are not cached.
Arrays live in memory up to a budget; the rest go to ``.npy`` files on disk (keyed by file
content and size, so later runs reuse them), memory-mapped when read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torchvision.transforms.v2 as T
from PIL import Image

from graft.console import plural
from graft.data.samples import Sample
from graft.data.images import load_image
from graft.data.transforms import _INTERPOLATION, Preprocessing
from graft import cache


class DecodedImages:
    """``cache[i]`` -> the i-th sample as a resized RGB ``PIL.Image``, decoded at most once."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocessing, *, budget_mb: float, disk_dir: str | os.PathLike | None, max_pixels: int | None) -> None:
        self.samples = list(samples)
        self.short_side = int(math.floor(pre.input_size / pre.crop_pct))
        self.resize = T.Resize(self.short_side, interpolation=_INTERPOLATION[pre.interpolation], antialias=True)
        self.tag = f"{self.short_side}-{pre.interpolation}"
        self.budget = int(budget_mb * 2**20)
        self.disk_dir = Path(disk_dir) / "decoded" if disk_dir is not None else None
        self.max_pixels = max_pixels
        self.items: list[np.ndarray | Path | None] = [None] * len(self.samples)
        self.memory_bytes = 0
        self.on_disk = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> np.ndarray:
        return np.asarray(self.resize(load_image(self.samples[i].path, max_pixels=self.max_pixels)))

    def _disk_path(self, i: int) -> Path:
        from graft.io import file_digest

        return self.disk_dir / f"{file_digest(self.samples[i].path)}-{self.tag}.npy"

    def fill(self, threads: int | None = None) -> DecodedImages:
        """Decode every image now, in parallel threads (Pillow releases the GIL while decoding)."""
        todo = [i for i, item in enumerate(self.items) if item is None]
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            for i, array in zip(todo, pool.map(self._decode, todo)):
                self._store(i, array)
        return self

    def _store(self, i: int, array: np.ndarray) -> None:
        if self.memory_bytes + array.nbytes <= self.budget or self.disk_dir is None:
            if self.memory_bytes + array.nbytes <= self.budget:
                self.items[i] = array
                self.memory_bytes += array.nbytes
            return  # over budget and no disk: decoded on demand
        path = self._disk_path(i)
        if path.is_file():
            cache.mark_used(path)
        elif not cache.store(path, lambda tmp: _save_array(tmp, array), what=f"decoded {self.samples[i].path}", expected_bytes=array.nbytes):
            return  # no room on the disk: decoded on demand
        self.items[i] = path
        self.on_disk += 1

    def __getitem__(self, i: int) -> Image.Image:
        item = self.items[i]
        if isinstance(item, np.ndarray):
            return Image.fromarray(item)
        if isinstance(item, Path):
            try:
                return Image.fromarray(np.asarray(np.load(item, mmap_mode="r")))
            except (OSError, ValueError):  # a damaged cache file: decode the original again
                item.unlink(missing_ok=True)
        return Image.fromarray(self._decode(i))

    def describe(self) -> str:
        return f"{plural(sum(isinstance(x, np.ndarray) for x in self.items), 'image')} in memory ({self.memory_bytes / 2**20:.0f} MiB), {self.on_disk} on disk"


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
