"""Per-class statistics of a trained model's embeddings, kept with the run so that classes can be
added later without the old images (``graft expand``).

For each class: the mean embedding, the variance of every dimension, and the class's main
directions of spread (principal components scaled by their standard deviations). Samples from the
Gaussian these describe stand in for old-class images when the new rows of a widened head learn
what they must not fire on. A Gaussian is a tidy picture, though: real images of a class that
resemble another class lie in its tails. So a few real embeddings per class are kept too
(*anchors*, half precision): training images chosen by herding, to learn against, and held-out
images the model never trained on, to check the new rows on. The statistics belong to one
backbone (its weights fingerprint): after fine-tuning they describe nothing, so they are checked
before use.
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
ANCHORS = 64  # real embeddings kept per class and split (training, held-out)...
ANCHOR_BUDGET = 8192  # ...but at most this many per split in all (at least 8 per class), so the file stays small


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
    anchors: torch.Tensor  # [M, D] real embeddings
    anchor_labels: torch.Tensor  # [M] indices into classes
    anchor_heldout: torch.Tensor  # [M] bool: from images the model was not trained on

    @classmethod
    def fit(
        cls,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        classes: list[str],
        backbone: str,
        rank: int = RANK,
        *,
        heldout: torch.Tensor | None = None,
        heldout_labels: torch.Tensor | None = None,
        anchors: int | None = None,
    ) -> ClassStats:
        """``embeddings [N, D]`` with ``labels [N]`` indexing ``classes``; every class needs one image.
        ``heldout`` (with its labels): embeddings of images the model never trained on."""
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
        if anchors is None:
            anchors = max(8, min(ANCHORS, ANCHOR_BUDGET // max(1, k)))
        picked, picked_labels, picked_heldout = [], [], []
        for c in range(k):
            members = embeddings[labels == c]
            chosen = herding(members, anchors)
            picked.append(members[chosen])
            picked_labels += [c] * len(chosen)
            picked_heldout += [False] * len(chosen)
            if heldout is not None:
                extra = heldout[torch.as_tensor(heldout_labels) == c][:anchors]
                picked.append(extra)
                picked_labels += [c] * len(extra)
                picked_heldout += [True] * len(extra)
        return cls(
            list(classes), mean.float(), var.float(), components.float(), counts, embeddings.min(0).values.float(), embeddings.max(0).values.float(), backbone,
            torch.cat(picked).half().float(), torch.tensor(picked_labels, dtype=torch.long), torch.tensor(picked_heldout, dtype=torch.bool),
        )

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
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[index] = torch.arange(len(index))
        keep = remap[self.anchor_labels] >= 0
        return ClassStats(
            list(names), self.mean[index], self.var[index], self.components[index], self.counts[index], self.low, self.high, self.backbone,
            self.anchors[keep], remap[self.anchor_labels[keep]], self.anchor_heldout[keep],
        )

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
            torch.cat([self.anchors, other.anchors]),
            torch.cat([self.anchor_labels, other.anchor_labels + len(self.classes)]),
            torch.cat([self.anchor_heldout, other.anchor_heldout]),
        )

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"mean": self.mean, "var": self.var, "components": self.components, "counts": self.counts, "low": self.low, "high": self.high,
                   "anchors": self.anchors.half(), "anchor_labels": self.anchor_labels, "anchor_heldout": self.anchor_heldout}
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
            stats = cls(json.loads(meta["classes"]), t["mean"], t["var"], t["components"], t["counts"], t["low"], t["high"], meta["backbone"],
                        t["anchors"].float(), t["anchor_labels"], t["anchor_heldout"])
            k, d = stats.mean.shape
            m = len(stats.anchors)
            shapes_ok = (
                len(stats.classes) == k and stats.var.shape == (k, d) and stats.components.ndim == 3 and stats.components.shape[::2] == (k, d)
                and stats.counts.shape == (k,) and stats.low.shape == (d,) and stats.high.shape == (d,)
                and stats.anchors.shape == (m, d) and stats.anchor_labels.shape == (m,) and stats.anchor_heldout.shape == (m,)
            )
            if not shapes_ok:
                raise ValueError("tensor shapes do not match the class list")
            if stats.anchor_heldout.dtype != torch.bool or stats.anchor_labels.dtype != torch.long or stats.counts.dtype != torch.long:
                raise ValueError("tensor types are not those graft writes")
            if m and not (0 <= int(stats.anchor_labels.min()) and int(stats.anchor_labels.max()) < k):
                raise ValueError("an anchor's class index is out of range")
            floats = (stats.mean, stats.var, stats.components, stats.low, stats.high, stats.anchors)
            if not all(torch.isfinite(t).all() for t in floats) or bool((stats.var < 0).any()):
                raise ValueError("it holds non-finite values or a negative variance")
        except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
            raise SnapshotError(f"cannot read class statistics {path}: {err}") from None
        return stats


def herding(embeddings: torch.Tensor, k: int) -> list[int]:
    """iCaRL's exemplar choice: up to ``k`` row indices, picked one by one so that the mean of
    those picked stays as close as possible to the mean of all rows."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=1)
    target = x.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(x), dtype=torch.bool)
    for step in range(1, min(k, len(x)) + 1):
        distance = ((target - (total + x) / step) ** 2).sum(1)
        distance[~available] = float("inf")
        i = int(distance.argmin())
        chosen.append(i)
        available[i] = False
        total += x[i]
    return chosen
