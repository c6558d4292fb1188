"""Layers stored as blocks of classes: what lets classes be added without touching the old ones."""

from __future__ import annotations

import torch
from torch import nn


class BlockLinear(nn.Module):
    """A linear layer stored as row blocks, one ``nn.Linear`` per block of classes; the logits are
    the blocks' outputs side by side. Classes added to a trained model get a block of their own,
    so the old classes' logits come from the very same matrix product as before: bit for bit
    (one wider matrix would not guarantee that: the GEMM's blocking depends on its width)."""

    def __init__(self, in_features: int, block_sizes: list[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(in_features, n) for n in block_sizes)
        self.in_features = in_features
        self.out_features = sum(block_sizes)

    @property
    def block_sizes(self) -> list[int]:
        return [b.out_features for b in self.blocks]

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([b.weight for b in self.blocks])

    @property
    def bias(self) -> torch.Tensor:
        return torch.cat([b.bias for b in self.blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.blocks], dim=1)
