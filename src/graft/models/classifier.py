"""The model graft trains: a pretrained backbone (the rootstock) and a new head (the scion)."""

from __future__ import annotations

import torch
from torch import nn

from graft.models import surgery
from graft.models.blocks import BlockLinear

HEAD_LAYER = "head.fc"


class Head(nn.Module):
    """Dropout then one linear layer: ``[N, in_features] -> [N, num_classes]`` logits.
    ``block_sizes`` (a model whose classes were added in steps) makes the layer a ``BlockLinear``."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0, block_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if block_sizes and len(block_sizes) > 1:
            if sum(block_sizes) != num_classes:
                raise ValueError(f"head blocks {block_sizes} do not add up to {num_classes} classes")
            self.fc: nn.Module = BlockLinear(in_features, block_sizes)
        else:
            self.fc = nn.Linear(in_features, num_classes)

    @property
    def block_sizes(self) -> list[int]:
        return self.fc.block_sizes if isinstance(self.fc, BlockLinear) else [self.fc.out_features]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class GraftClassifier(nn.Module):
    """``backbone`` is a timm model built with ``num_classes=0``: it maps images to pooled
    embeddings ``[N, num_features]``. Keeping the head separate lets a frozen backbone's
    embeddings be computed once and the head trained on them."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.2, *, frozen_bn_eval: bool = True, bn_inference: bool = False, head_blocks: list[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.head = Head(self.num_features, num_classes, dropout, head_blocks)
        self.frozen_bn_eval = frozen_bn_eval
        self.bn_inference = bn_inference  # every BatchNorm in inference mode, trainable or not (the Keras tutorial's advice for fine-tuning)

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> GraftClassifier:
        """As ``nn.Module.train``, but BatchNorm layers whose parameters are all frozen stay in
        inference mode (as Keras does for ``trainable=False``): their running statistics were
        estimated on the pretraining data and must not drift with small new batches."""
        super().train(mode)
        if mode:
            surgery.batchnorm_inference(self, every=self.bn_inference, frozen=self.frozen_bn_eval)
        return self
