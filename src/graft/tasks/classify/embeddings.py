"""The embedding cache: a frozen backbone runs once per image (and augmented view), not once per epoch.

With the backbone frozen and its BatchNorm in inference mode, the backbone is a fixed function
of the image, so its pooled embedding can be computed once and the head trained on it. With
augmentation on, ``views`` augmented copies of each training image are embedded up front and each
epoch draws one of them per image (seeded by epoch and image, so resume stays exact).

Embeddings are stored on disk keyed by what determines them: the backbone's weights, the
preprocessing, the augmentation (and seed, for augmented views) and each file's *content*. A
second run, or a class expansion that reuses the same images, computes nothing again. Each store
file carries a checksum; a corrupt or foreign file is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from graft.data.dataset import ImageDataset, _mix, eval_loader
from graft.data.samples import Sample
from graft.engine.inference import in_chunks
from graft import cache
from graft.io import file_digest

FORMAT = "graft-embeddings/1"


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over the backbone's class, tensor names, shapes, dtypes and bytes."""
    h = hashlib.sha256(type(backbone).__qualname__.encode())
    for name, tensor in backbone.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _checksum(key: str, digests: list[str], t: torch.Tensor) -> str:
    """Covers the key, which row belongs to which file, and the numbers."""
    h = hashlib.sha256(key.encode())
    h.update(json.dumps(digests).encode())
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EmbeddingStore:
    """One safetensors file per key: ``embeddings [M, D]`` and the content digests of its M rows."""

    def __init__(self, root: str | os.PathLike, label: str = "") -> None:
        self.root = Path(root) / "embeddings"
        self.label = label  # what made the embeddings, for `graft cache list`

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """Rows by digest; empty (and the file removed) when the file is missing, corrupt or foreign."""
        path = self.path(key)
        if not path.is_file():
            return {}
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # one open: metadata and rows of the same version, even if another process renames a new one in
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
            digests = json.loads(meta["digests"])
            if meta.get("format") != FORMAT or meta.get("key") != key or len(digests) != len(emb) or meta.get("sha256") != _checksum(key, digests, emb):
                raise ValueError("metadata does not match the contents")
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError, RuntimeError):
            path.unlink(missing_ok=True)
            return {}
        cache.mark_used(path)
        return {d: emb[i] for i, d in enumerate(digests)}

    def locked(self, key: str):
        """While held, no other process computes or writes this key (see ``graft.cache.entry_lock``)."""
        return cache.entry_lock(self.path(key))

    def save(self, key: str, rows: dict[str, torch.Tensor]) -> None:
        if not rows:
            return
        digests = sorted(rows)
        emb = torch.stack([rows[d] for d in digests]).float().contiguous()
        meta = {"format": FORMAT, "key": key, "digests": json.dumps(digests), "sha256": _checksum(key, digests, emb), "model": self.label, "images": str(len(digests))}
        cache.store(self.path(key), lambda tmp: save_file({"embeddings": emb}, str(tmp), metadata=meta), what=f"{len(digests)} embeddings", expected_bytes=emb.numel() * 4)


def _label(spec: dict[str, Any]) -> str:
    pre = spec.get("preprocessing") or {}
    return f"{spec.get('backbone', '?')} {pre.get('input_size', '?')} px"


class _ViewDataset(Dataset):
    """Images under one transform; augmented views are seeded by (seed, view, file digest)."""

    def __init__(self, samples: Sequence[Sample], digests: Sequence[str], transform: Any, *, seed: int, view: int, max_pixels: int | None, decoded: Any = None) -> None:
        self.images = ImageDataset(samples, transform, max_pixels=max_pixels, decoded=decoded)
        self.digests, self.seed, self.view = list(digests), seed, view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.view == 0:
            return self.images[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.view, int(self.digests[i][:15], 16)))
            return self.images[i]


class EmbeddingCache:
    """Computes, stores and serves backbone embeddings for one backbone and preprocessing."""

    def __init__(self, backbone: nn.Module, *, root: str | os.PathLike | None, spec: dict[str, Any], device: torch.device, batch_size: int = 64, workers: int = 0, max_pixels: int | None = None) -> None:
        self.backbone = backbone
        self.store = EmbeddingStore(root, label=_label(spec)) if root is not None else None
        self.fingerprint = backbone_fingerprint(backbone)
        self.spec = spec
        self.device, self.batch_size, self.workers, self.max_pixels = device, batch_size, workers, max_pixels
        self.computed = 0  # images run through the backbone by this cache (for tests and reports)
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def key(self, view: int, augmentation: dict[str, Any] | None, seed: int) -> str:
        ident = {"backbone": self.fingerprint, "spec": self.spec, "view": view, "augmentation": augmentation if view else None, "seed": seed if view else None}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    @torch.inference_mode()
    def _compute(self, samples: Sequence[Sample], digests: Sequence[str], transform: Any, *, seed: int, view: int, decoded: Any = None) -> list[torch.Tensor]:
        was_training = self.backbone.training
        self.backbone.eval()
        ds = _ViewDataset(samples, digests, transform, seed=seed, view=view, max_pixels=self.max_pixels, decoded=decoded)
        out: list[torch.Tensor] = []
        try:
            # Decoded pixels in memory leave cheap transforms: a worker process would only compete
            # with the backbone for the cores (on 2 cores, 25% slower on digits).
            workers = 0 if decoded is not None and self.device.type == "cpu" else self.workers
            for images, _ in eval_loader(ds, batch_size=self.batch_size, workers=workers, pin_memory=self.device.type == "cuda"):
                out.extend(in_chunks(self.backbone, images.to(self.device)).float().cpu())
        finally:
            self.backbone.train(was_training)
        self.computed += len(samples)
        return out

    def embed(self, samples: Sequence[Sample], transform: Any, *, view: int = 0, augmentation: dict[str, Any] | None = None, seed: int = 0, decoded: Any = None) -> torch.Tensor:
        """``[N, D]`` embeddings of ``samples`` (view 0: the evaluation transform; view v > 0: the v-th
        augmented copy under ``transform``). Only rows missing from the store are computed;
        ``decoded`` (a DecodedImages over ``samples``) saves decoding the files again."""
        digests = [file_digest(s.path) for s in samples]
        key = self.key(view, augmentation, seed)
        if key not in self.memory:
            self.memory[key] = self.store.load(key) if self.store else {}
        rows = self.memory[key]
        if any(d not in rows for d in digests):
            # Another process building this key (two runs on the same images) computes it once:
            # this one waits, then reads what the other wrote.
            with self.store.locked(key) if self.store else contextlib.nullcontext():
                if self.store:
                    for d, row in self.store.load(key).items():
                        rows.setdefault(d, row)
                missing = [i for i, d in enumerate(digests) if d not in rows]
                if missing:
                    unique = {digests[i]: i for i in missing}
                    subset = None
                    if decoded is not None and len(unique) == len(samples):
                        subset = decoded
                    new = self._compute([samples[i] for i in unique.values()], list(unique), transform, seed=seed, view=view, decoded=subset)
                    rows.update(zip(unique, new))
                    if self.store:
                        self.store.save(key, rows)
        if not samples:
            return torch.zeros(0, getattr(self.backbone, "num_features", 0))
        return torch.stack([rows[d] for d in digests])


class EmbeddingDataset(Dataset):
    """``[N, V, D]`` cached embeddings; ``ds[(i, epoch)]`` draws one of image i's V views, seeded by
    (seed, epoch, i) like the image path's augmentation; ``ds[i]`` is view 0."""

    def __init__(self, embeddings: torch.Tensor, labels: Sequence[int], *, seed: int = 0) -> None:
        if embeddings.ndim == 2:
            embeddings = embeddings.unsqueeze(1)
        self.embeddings, self.labels, self.seed = embeddings, torch.as_tensor(list(labels), dtype=torch.long), seed

    def __len__(self) -> int:
        return len(self.embeddings)

    def view(self, index: int, epoch: int | None) -> int:
        views = self.embeddings.shape[1]
        return 0 if epoch is None or views == 1 else _mix(self.seed, epoch, index) % views

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        return self.embeddings[index, self.view(index, epoch)], int(self.labels[index])

    def batch(self, indices: Sequence[int], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples ``(i, epoch)`` for ``i`` in ``indices`` as one ``[B, D]`` tensor and labels,
        without a DataLoader: what a batch of ``EpochBatchSampler`` keys would collate to."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        views = torch.as_tensor([self.view(i, epoch) for i in indices], dtype=torch.long)
        return self.embeddings[index, views], self.labels[index]
