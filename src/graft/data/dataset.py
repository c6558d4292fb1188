"""Datasets and loaders whose every random draw is a function of (seed, epoch, index).

That is what makes resume exact: an epoch interrupted after batch ``b`` is continued by
regenerating the same permutation and skipping ``b`` batches, and each image gets the same
augmentation whether it is loaded in the main process or in any worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from graft.data.samples import Sample
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from graft.errors import DataError


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so neighbouring (epoch, index) pairs are unrelated."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class ImageDataset(Dataset):
    """``dataset[i]`` or ``dataset[(i, epoch)]`` -> ``(image tensor [3, S, S], label)``.

    With an epoch key the transform runs under a torch RNG seeded from (seed, epoch, i)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        *,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decoded: Any = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.decoded = decoded  # a DecodedImages over the same samples, or None to read the files

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        try:
            image = self.decoded[index] if self.decoded is not None else load_image(sample.path, max_pixels=self.max_pixels)
        except ImageError as err:
            raise DataError(f"{err} (it was readable when the dataset was scanned; did it change?)") from None
        if epoch is None:
            return self.transform(image), sample.label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, index))
            return self.transform(image), sample.label


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, epoch)`` keys over a permutation seeded by (seed, epoch).

    ``batch_size`` is the *global* batch: with ``world`` processes, rank ``rank`` takes its
    contiguous part of each global batch (parts differ by at most one image), so the ranks together
    see exactly what one process would, in the same order, and every rank takes the same number
    of steps. A final global batch with fewer than 2 images per process is dropped (BatchNorm
    cannot train on one image); ``start_batch`` skips the batches an interrupted epoch already did,
    whatever the number of processes."""

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Set before the loader's iterator is built, so its workers see it."""
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0x5EED))
        return torch.randperm(self.n, generator=g).tolist()

    def batches(self) -> list[list[int]]:
        """The global batches of the epoch (every rank's images)."""
        order = self.order()
        out = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(out) > 1 and len(out[-1]) < 2 * self.world:
            out.pop()
        return out

    def part(self, batch: list[int]) -> list[int]:
        """This rank's contiguous part of a global batch."""
        base, extra = divmod(len(batch), self.world)
        start = self.rank * base + min(self.rank, extra)
        return batch[start : start + base + (1 if self.rank < extra else 0)]

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches()[self.start_batch :]:
            yield [(i, self.epoch) for i in self.part(batch)]


def default_workers() -> int:
    """Leave one core to the model; a few workers are enough to keep decoding ahead of it. Under
    torchrun the machine's cores are shared by its processes (``LOCAL_WORLD_SIZE``): each counts
    only its share, so N processes do not start N times the workers the cores can run."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, cpus - 1))


def train_loader(dataset: ImageDataset, sampler: EpochBatchSampler, *, workers: int, pin_memory: bool = False, collate_fn: Callable | None = None) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        # Its own generator: DataLoader otherwise draws worker seeds from the global RNG,
        # which would shift dropout masks after a resume.
        generator=torch.Generator().manual_seed(0),
    )


def eval_loader(dataset: ImageDataset, *, batch_size: int, workers: int, pin_memory: bool = False, collate_fn: Callable | None = None, part: range | None = None) -> DataLoader:
    """In order, every sample once; ``part``: only those indices (a rank's shard of an evaluation)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        sampler=part,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        # Its own generator: DataLoader otherwise draws worker seeds from the global RNG,
        # which would shift dropout masks after a resume.
        generator=torch.Generator().manual_seed(0),
    )
