"""Per-class statistics of a trained model's embeddings, kept with the run so that classes can be
added later without the old images (``graft expand``).

For each class: the mean embedding, the variance of every dimension, and the class's main
directions of spread (principal components scaled by their standard deviations). Samples from the
Gaussian these describe stand in for old-class images when the new rows of a widened head learn
what they must not fire on. The statistics belong to one backbone (its weights fingerprint): after
fine-tuning they describe nothing, so they are checked before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from graft.errors import SnapshotError
from graft.io import atomic_write

FORMAT = "graft-class-stats/1"
FILE_NAME = "class_stats.safetensors"
RANK = 16  # principal directions kept per class


@dataclass
class ClassStats:
    classes: list[str]
    mean: torch.Tensor  # [K, D]
    var: torch.Tensor  # [K, D] per-dimension variance
    components: torch.Tensor  # [K, R, D] principal directions times their standard deviation (zero rows when a class has few images)
    counts: torch.Tensor  # [K] images behind each class's statistics
    low: torch.Tensor  # [D] smallest value seen in each dimension (samples are clamped to the range)
    high: torch.Tensor  # [D]
    backbone: str  # fingerprint of the backbone the embeddings came from

    @classmethod
    def fit(cls, embeddings: torch.Tensor, labels: torch.Tensor, classes: list[str], backbone: str, rank: int = RANK) -> ClassStats:
        """``embeddings [N, D]`` with ``labels [N]`` indexing ``classes``; every class needs one image."""
        x = embeddings.double()
        labels = torch.as_tensor(labels)
        k, d = len(classes), x.shape[1]
        mean, var = torch.zeros(k, d, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64)
        components = torch.zeros(k, rank, d, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.long)
        for c in range(k):
            xc = x[labels == c]
            counts[c] = len(xc)
            if len(xc) == 0:
                raise ValueError(f"class {classes[c]!r} has no embeddings")
            mean[c] = xc.mean(0)
            if len(xc) > 1:
                centred = (xc - mean[c]) / (len(xc) - 1) ** 0.5
                var[c] = centred.pow(2).sum(0)
                _, s, vh = torch.linalg.svd(centred, full_matrices=False)
                r = min(rank, len(s))
                components[c, :r] = s[:r, None] * vh[:r]
        return cls(list(classes), mean.float(), var.float(), components.float(), counts, embeddings.min(0).values.float(), embeddings.max(0).values.float(), backbone)

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    def sample(self, class_indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[M, D]`` draws, one per entry of ``class_indices``: the class mean, plus its main
        directions with standard-normal weights, plus independent noise for the variance the
        directions leave unexplained; clamped to the range the real embeddings covered."""
        idx = torch.as_tensor(class_indices, dtype=torch.long)
        comps = self.components[idx]  # [M, R, D]
        residual = (self.var[idx] - comps.pow(2).sum(1)).clamp_min(0)
        z = torch.randn(len(idx), comps.shape[1], generator=generator)
        noise = torch.randn(len(idx), self.dim, generator=generator)
        x = self.mean[idx] + torch.einsum("mr,mrd->md", z, comps) + residual.sqrt() * noise
        return torch.maximum(torch.minimum(x, self.high), self.low)

    def select(self, names: list[str]) -> ClassStats:
        index = [self.classes.index(n) for n in names]
        return ClassStats(list(names), self.mean[index], self.var[index], self.components[index], self.counts[index], self.low, self.high, self.backbone)

    def merge(self, other: ClassStats) -> ClassStats:
        """This run's classes followed by ``other``'s (same backbone, same rank)."""
        if other.backbone != self.backbone:
            raise ValueError("class statistics of different backbones cannot be merged")
        rank = max(self.components.shape[1], other.components.shape[1])

        def padded(c: torch.Tensor) -> torch.Tensor:
            return torch.cat([c, c.new_zeros(c.shape[0], rank - c.shape[1], c.shape[2])], 1)

        return ClassStats(
            self.classes + other.classes,
            torch.cat([self.mean, other.mean]),
            torch.cat([self.var, other.var]),
            torch.cat([padded(self.components), padded(other.components)]),
            torch.cat([self.counts, other.counts]),
            torch.minimum(self.low, other.low),
            torch.maximum(self.high, other.high),
            self.backbone,
        )

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"mean": self.mean, "var": self.var, "components": self.components, "counts": self.counts, "low": self.low, "high": self.high}
        meta = {"format": FORMAT, "classes": json.dumps(self.classes), "backbone": self.backbone}
        return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassStats:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            stats = cls(json.loads(meta["classes"]), t["mean"], t["var"], t["components"], t["counts"], t["low"], t["high"], meta["backbone"])
            k, d = stats.mean.shape
            if len(stats.classes) != k or stats.var.shape != (k, d) or stats.components.shape[::2] != (k, d) or stats.counts.shape != (k,):
                raise ValueError("tensor shapes do not match the class list")
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            raise SnapshotError(f"cannot read class statistics {path}: {err}") from None
        return stats
