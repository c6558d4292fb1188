"""Backbone features computed once, so that a frozen-backbone phase trains only the neck and heads.

The classifier's embedding cache does this for one vector per image; a detector needs every
pyramid level's map. Each (image, view) is run through the frozen backbone once (half precision)
and kept in memory within ``detect.cache_mb``, or beyond it in a file under the cache folder
(memory-mapped, deleted with the cache). With augmentation, ``views`` augmented versions of each
training image are cached with their moved boxes, and each epoch draws one per image, seeded by
(seed, epoch, index) as everything else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from graft import cache
from graft.configuration import GraftConfig
from graft.console import warn
from graft.data.dataset import _mix
from graft.tasks.detect.dataset import BoxDataset, collate_boxes
from graft.tasks.detect.model import GraftDetector
from graft.engine import distributed
from graft.engine.inference import autocast, in_chunks


class FeatureCache(Dataset):
    """``ds[(i, epoch)]`` -> (one view's feature maps, its target)."""

    def __init__(self, flat: torch.Tensor, shapes: list[tuple[int, int, int]], targets: list[dict[str, torch.Tensor]], views: int, seed: int, file: Path | None = None) -> None:
        self.flat, self.shapes, self.targets = flat, shapes, targets
        self.views, self.seed, self.file = views, seed, file
        self.sizes = [c * h * w for c, h, w in shapes]

    def __len__(self) -> int:
        return len(self.targets) // self.views

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        view = 0 if self.views == 1 or epoch is None else _mix(self.seed, epoch, index) % self.views
        row = self.flat[index * self.views + view]
        maps, start = [], 0
        for (c, h, w), n in zip(self.shapes, self.sizes):
            maps.append(row[start : start + n].view(c, h, w))
            start += n
        return maps, self.targets[index * self.views + view]

    def close(self) -> None:
        self.flat = torch.empty(0)
        if self.file is not None:
            self.file.unlink(missing_ok=True)


def feature_shapes(model: GraftDetector, size: int, device: torch.device) -> list[tuple[int, int, int]]:
    was = model.training
    model.eval()
    with torch.no_grad():
        maps = model.backbone_features(torch.zeros(1, 3, size, size, device=device))
    model.train(was)
    return [tuple(m.shape[1:]) for m in maps]


def build_feature_cache(
    model: GraftDetector, dataset: BoxDataset, *, views: int, seed: int, device: torch.device, amp: bool, budget_mb: float, cache_dir: str | os.PathLike, batch_size: int = 16, say=None,
) -> FeatureCache:
    """Run the (frozen) backbone once over every (image, view) of ``dataset``. An augmentation that
    only flips has 2 or 4 outcomes: those are the views, each computed once, instead of ``views``
    random draws that would repeat some outcomes and miss others."""
    shapes = feature_shapes(model, dataset.size, device)
    per_item = sum(c * h * w for c, h, w in shapes)
    views = views if dataset.augment is not None else 1
    flips = dataset.augment.flips if views > 1 else None
    if flips is not None:
        views = len(flips)
    n = len(dataset) * views
    need_mb = 2 * n * per_item / 2**20
    file = None
    if need_mb <= budget_mb:
        flat = torch.empty(n, per_item, dtype=torch.float16)
    else:
        file = _spill_file(Path(cache_dir), 2 * n * per_item)
        if file is None:
            warn(f"feature cache: no room on disk in {cache_dir} for {need_mb:.0f} MB (over detect.cache_mb, {budget_mb:g}); not cached on disk, kept in memory instead")
            flat = torch.empty(n, per_item, dtype=torch.float16)
        else:
            flat = torch.from_numpy(np.memmap(file, dtype=np.float16, mode="w+", shape=(n, per_item)))
            if say:
                say(f"feature cache: {need_mb:.0f} MB is over detect.cache_mb ({budget_mb:g}); kept on disk in {file}")
    keys = [(i, v) for v in range(views) for i in range(len(dataset))] if views > 1 else list(range(len(dataset)))
    rows = {key: (key[0] * views + key[1]) if views > 1 else key for key in keys}
    targets: list[dict[str, torch.Tensor] | None] = [None] * n
    mine = [keys[i] for i in distributed.shard(len(keys))]  # with several processes, each rank's share, gathered below
    loader = DataLoader(_Keyed(dataset, mine, flips), batch_size=batch_size, shuffle=False, collate_fn=_collate_keyed)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch_keys, images, batch_targets in loader:
                with autocast(device, amp):
                    maps = in_chunks(model.backbone_features, images.to(device))
                flat_maps = torch.cat([m.float().flatten(1) for m in maps], 1).half().cpu()
                for key, row, target in zip(batch_keys, flat_maps, batch_targets):
                    flat[rows[key]] = row
                    targets[rows[key]] = target
    except BaseException:  # interrupted or failed half way: the file goes too
        del flat
        if file is not None:
            file.unlink(missing_ok=True)
        raise
    finally:
        model.train(was)
    if distributed.active():
        for part in distributed.all_gather({rows[key]: (flat[rows[key]].clone(), targets[rows[key]]) for key in mine}):
            for row, (features, target) in part.items():
                flat[row], targets[row] = features, target
    return FeatureCache(flat, shapes, targets, views, seed, file)


def _spill_file(folder: Path, size: int) -> Path | None:
    """A file of ``size`` bytes with its blocks reserved now, named after this process (the start-up
    sweep removes a killed run's); None when the disk has no room. Reserving matters: a memory-mapped
    write that finds the disk full kills the process (SIGBUS) instead of raising an error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=cache.spill_name_prefix(), suffix=".f16", dir=folder)
    except OSError:
        return None
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle, 0, size)
        else:
            os.ftruncate(handle, size)
    except OSError:
        os.close(handle)
        Path(name).unlink(missing_ok=True)
        return None
    os.close(handle)
    return Path(name)


class _Keyed(Dataset):
    """``dataset`` under explicit keys: (index, view) draws view ``view``'s augmentation, or with
    ``flips`` is that flip outcome."""

    def __init__(self, dataset: BoxDataset, keys: Sequence, flips: Sequence[tuple[bool, bool]] | None = None) -> None:
        self.dataset, self.keys, self.flips = dataset, list(keys), flips

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        key = self.keys[i]
        image, target = self.dataset.outcome(key[0], *self.flips[key[1]]) if self.flips is not None else self.dataset[key]
        return key, image, target


def _collate_keyed(batch):
    keys = [k for k, _, _ in batch]
    images, targets = collate_boxes([(image, target) for _, image, target in batch])
    return keys, images, targets


def features_cacheable(cfg: GraftConfig) -> bool:
    """Backbone features are computed once only when asked and the frozen backbone is a fixed function."""
    from graft.engine.phases import frozen_bn_fixed

    return cfg.train.embedding_cache and frozen_bn_fixed(cfg)


def cache_options(cfg: GraftConfig, device: torch.device, amp: bool, say: Any) -> dict[str, Any]:
    """``build_feature_cache``'s settings from the config."""
    cache_dir = cache.cache_root(cfg.train.cache_dir) / "features"
    return {"seed": cfg.solver.seed, "device": device, "amp": amp, "budget_mb": cfg.detect.cache_mb, "cache_dir": cache_dir, "say": say}

