"""What the new rows learn from in the frozen embedding space: the new classes' embeddings, and
old-class negatives (rehearsal embeddings, and draws from the stored class statistics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

import torch.nn.functional as F

from graft.data.dataset import _mix
from graft.engine import distributed
from graft.tasks.classify.class_stats import ClassStats


class ExpandEmbeddings(Dataset):
    """Real embeddings ``[N, V, D]`` (``ds[(i, epoch)]`` draws one of image i's V views, as the
    embedding cache does), followed by ``per_class`` draws per class of ``stats``, fresh each
    epoch and seeded by (seed, epoch, index) so that a resumed run draws the same ones."""

    def __init__(self, real: torch.Tensor, labels: Sequence[int], *, stats: ClassStats | None = None, stat_labels: Sequence[int] = (), per_class: int = 0, seed: int = 0) -> None:
        if real.ndim == 2:
            real = real.unsqueeze(1)
        self.real, self.labels = real, torch.as_tensor(list(labels), dtype=torch.long)
        self.stats, self.stat_labels = stats, list(stat_labels)
        self.per_class = per_class if stats is not None else 0
        self.seed = seed

    def __len__(self) -> int:
        return len(self.real) + self.per_class * len(self.stat_labels)

    def label_counts(self, num_classes: int) -> torch.Tensor:
        """Samples per class in one epoch."""
        counts = torch.bincount(self.labels, minlength=num_classes).float()
        for label in self.stat_labels:
            counts[label] += self.per_class
        return counts

    def draws(self, epoch: int) -> torch.Tensor:
        """The epoch's class-statistics draws, all at once from one generator seeded by (seed,
        epoch): the same whatever the batches, their order or how processes split them, so a
        resumed or distributed run draws the same ones."""
        if getattr(self, "_drawn", (None,))[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x57A75))
            per_class = [self.stats.sample(torch.full((self.per_class,), c), g) for c in range(len(self.stat_labels))]  # a class at a time: bounded memory
            self._drawn = (epoch, torch.cat(per_class))
        return self._drawn[1]

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, int]]:
        """A batch at once (the DataLoader calls this)."""
        return [self[key] for key in keys]

    def _real(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        views = self.real.shape[1]
        view = 0 if views == 1 else _mix(self.seed, epoch, index) % views
        return self.real[index, view], int(self.labels[index])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if index < len(self.real):
            return self._real(index, epoch)
        drawn = index - len(self.real)
        return self.draws(epoch)[drawn], self.stat_labels[drawn // self.per_class]


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights giving every class present the same total weight."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, y, weight=weights)``: the weighted mean over the batch, whose
    divisor (the batch's total weight) is the global batch's when processes share it
    (``distributed.share_of_total``), so the averaged gradient is one process's."""
    weights = weights.to(logits.device)
    total = F.cross_entropy(logits, y, weight=weights, reduction="sum")
    return total / distributed.share_of_total(float(weights[y].sum()), len(y))
