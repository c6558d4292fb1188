"""What the new rows learn from in the frozen embedding space: the new classes' embeddings, and
old-class negatives (rehearsal embeddings, and draws from the stored class statistics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from graft.data.dataset import _mix
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

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, int]]:
        """A batch at once (the DataLoader calls this): the batch's draws come from one generator
        seeded by (seed, epoch, the batch's indices), so a resumed run draws the same ones."""
        indices = [k[0] if isinstance(k, tuple) else k for k in keys]
        epoch = keys[0][1] if keys and isinstance(keys[0], tuple) else 0
        synthetic = [i for i in indices if i >= len(self.real)]
        drawn: dict[int, torch.Tensor] = {}
        if synthetic:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, len(synthetic), *synthetic[:8], 0x57A75))
            classes = torch.tensor([(i - len(self.real)) // self.per_class for i in synthetic])
            drawn = dict(zip(synthetic, self.stats.sample(classes, g)))
        out = []
        for key, i in zip(keys, indices):
            if i in drawn:
                out.append((drawn[i], self.stat_labels[(i - len(self.real)) // self.per_class]))
            else:
                out.append(self._real(i, epoch))
        return out

    def _real(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        views = self.real.shape[1]
        view = 0 if views == 1 else _mix(self.seed, epoch, index) % views
        return self.real[index, view], int(self.labels[index])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if index < len(self.real):
            return self._real(index, epoch)
        return self.__getitems__([(index, epoch)])[0]  # one seeding rule for draws, alone or in a batch


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights giving every class present the same total weight."""
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights
