"""The frozen-prefix cache: a fine-tuning phase whose bottom layers stay frozen (with BatchNorm in
inference mode) maps each image to fixed activations at the cut below the first trainable block,
one per flip outcome when the augmentation only flips. They are computed once and each epoch runs
only the layers above the cut."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from graft.configuration import GraftConfig
from graft.console import plural
from graft.data.dataset import ImageDataset, eval_loader
from graft.data.samples import DatasetSplits, Sample
from graft.data.transforms import Preprocessing, eval_transform, flipped_transform
from graft.engine.inference import in_chunks
from graft.tasks.classify.evaluate import Outputs, collect_outputs
from graft.models import surgery
from graft.models.classifier import GraftClassifier
from graft.engine.phases import frozen_bn_fixed
from graft.tasks.classify.embeddings import EmbeddingDataset
from graft.engine import distributed
from graft.engine.loop import Phase, PhaseData


def backbone_units(backbone: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The backbone as a chain of modules whose composition is its forward pass (image to pooled
    embedding), for the block-structured timm families graft knows (EfficientNet, ResNet).
    ``None`` for others; callers must still check the chain with ``chain_matches``."""
    b = backbone
    units: list[tuple[str, nn.Module]] = []
    if all(hasattr(b, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")):
        units += [("conv_stem", b.conv_stem), ("bn1", b.bn1)]
        for si, stage in enumerate(b.blocks):
            units += [(f"blocks.{si}.{bi}", block) for bi, block in enumerate(stage)]
        units += [("conv_head", b.conv_head), ("bn2", b.bn2), ("global_pool", b.global_pool)]
    elif all(hasattr(b, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4", "global_pool")):
        units += [("conv1", b.conv1), ("bn1", b.bn1), ("act1", b.act1), ("maxpool", b.maxpool)]
        for li in range(1, 5):
            units += [(f"layer{li}.{bi}", block) for bi, block in enumerate(getattr(b, f"layer{li}"))]
        units += [("global_pool", b.global_pool)]
    else:
        return None
    return units


@torch.inference_mode()
def chain_matches(backbone: nn.Module, units: list[tuple[str, nn.Module]], size: int) -> bool:
    """Does running ``units`` in order reproduce ``backbone(x)``, deterministically, in the mode
    training uses? Guards against architectures whose forward does more than the chain."""
    was = backbone.training
    try:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        backbone.eval()
        reference = backbone(x)
        chain = x
        for _, unit in units:
            chain = unit(chain)
        return chain.shape == reference.shape and torch.allclose(chain, reference, atol=1e-5, rtol=1e-4)
    except Exception:
        return False
    finally:
        backbone.train(was)


class SuffixHead(nn.Module):
    """The trainable top of the network: activations at the cut -> logits."""

    def __init__(self, model: GraftClassifier, units: list[nn.Module]) -> None:
        super().__init__()
        self.suffix = nn.Sequential(*units)
        self.head = model.head
        self.frozen_bn_eval, self.bn_inference = model.frozen_bn_eval, model.bn_inference

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.head(self.suffix(activations))

    def train(self, mode: bool = True) -> SuffixHead:
        super().train(mode)
        if mode:
            surgery.batchnorm_inference(self, every=self.bn_inference, frozen=self.frozen_bn_eval)
        return self


class ActivationDataset(EmbeddingDataset):
    """``[N, V, ...]`` cached activations (stored in half precision, served as float); ``ds[i]`` is
    view 0, ``ds[(i, epoch)]`` draws one of image i's V views (flip outcomes) as the embedding
    cache does."""

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        activations, label = super().__getitem__(key)
        return activations.float(), label


def prefix_data(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, pre: Preprocessing, aug: Any, device: torch.device, say: Any, decoded: tuple[Any, Any]) -> PrefixActivations | None:
    """The prefix cache applies where a frozen prefix maps each training image to a few fixed
    activations: without augmentation (one) or with an augmentation that only flips (one per
    outcome; each epoch draws one, as a random flip would), and with frozen BatchNorm in
    inference mode."""
    outcomes = [(False, False)] if aug.is_identity else aug.flips
    if not (cfg.train.prefix_cache and outcomes and frozen_bn_fixed(cfg)):
        return None
    source = PrefixActivations(model, cfg, splits, pre, device, say, decoded, flips=outcomes)
    return source if source.units is not None else None


class PrefixActivations:
    """For a fine-tuning phase without augmentation, or with flips only: run the frozen prefix
    once per image and flip outcome."""

    def __init__(self, model: GraftClassifier, cfg: GraftConfig, splits: DatasetSplits, pre: Preprocessing, device: torch.device, say: Any, decoded: tuple[Any, Any] = (None, None), *, flips: list[tuple[bool, bool]] = ((False, False),)) -> None:
        self.model, self.cfg, self.splits, self.pre, self.device, self.say = model, cfg, splits, pre, device, say
        self.decoded, self.flips = decoded, list(flips)  # (hflip, vflip) outcomes of the training images, identity first
        self.units = backbone_units(model.backbone)
        if self.units is not None and not chain_matches(model.backbone, self.units, pre.input_size):
            self.units = None
        self.cut = 0
        self.memo: dict[int, torch.Tensor] = {}

    def phase_data(self, phase: Phase) -> PhaseData | None:
        if phase.backbone_frozen or self.units is None:
            return None
        trainable = [any(p.requires_grad for p in unit.parameters()) for _, unit in self.units]
        cut = trainable.index(True) if True in trainable else len(self.units)
        if cut == 0:
            return None
        prefix = nn.Sequential(*[u for _, u in self.units[:cut]])
        per_image = self._activation_numel(prefix) * 2  # float16
        views = len(self.flips)
        need = per_image * (len(self.splits.train) * views + len(self.splits.val))
        budget = self.cfg.train.prefix_cache_mb * 2**20
        if need > budget:
            self.say(f"prefix cache: {need / 2**20:.0f} MiB of activations exceed train.prefix_cache_mb={self.cfg.train.prefix_cache_mb:g}; running the whole network each epoch")
            return None
        started = time.perf_counter()
        # Computed once (rank 0, with several processes) and handed to every rank.
        train, val = distributed.on_main(lambda: (
            torch.stack([self._activations(prefix, self.splits.train, self.decoded[0], flipped_transform(self.pre, h, v) if h or v else eval_transform(self.pre)) for h, v in self.flips], 1),
            self._activations(prefix, self.splits.val, self.decoded[1], eval_transform(self.pre)),
        ))
        if not (torch.isfinite(train).all() and torch.isfinite(val).all()):
            self.say("prefix cache: activations overflow half precision; running the whole network each epoch")
            return None
        self.cut = cut
        self.memo = {id(self.splits.val): val, id(self.splits.train): train[:, 0]}  # the evaluation view
        each = f" ({views} flips each)" if views > 1 else ""
        self.say(f"prefix cache: {self.units[cut - 1][0]} and below are frozen; their activations for {plural(len(train), 'training image')}{each} and {plural(len(val), 'validation image')} computed once ({time.perf_counter() - started:.1f}s, {need / 2**20:.0f} MiB); each epoch runs only the layers above")
        forward = SuffixHead(self.model, [u for _, u in self.units[cut:]])
        labels = [s.label for s in self.splits.train]
        return PhaseData(ActivationDataset(train, labels, seed=self.cfg.solver.seed), ActivationDataset(val.unsqueeze(1), [s.label for s in self.splits.val]), forward=forward, workers=0)

    @torch.inference_mode()
    def _activation_numel(self, prefix: nn.Module) -> int:
        was = prefix.training
        prefix.eval()
        try:
            x = torch.zeros(1, 3, self.pre.input_size, self.pre.input_size, device=self.device)
            return prefix(x).numel()
        finally:
            prefix.train(was)

    @torch.inference_mode()
    def _activations(self, prefix: nn.Module, samples: list[Sample], decoded: Any, transform: Any) -> torch.Tensor:
        was = prefix.training
        prefix.eval()
        try:
            ds = ImageDataset(samples, transform, max_pixels=self.cfg.data.max_pixels, decoded=decoded)
            chunks = [in_chunks(prefix, images.to(self.device)).half().cpu() for images, _ in eval_loader(ds, batch_size=self.cfg.solver.batch_size, workers=0)]
        finally:
            prefix.train(was)
        return torch.cat(chunks) if chunks else torch.zeros(0)

    @torch.inference_mode()
    def embeddings(self, samples: list[Sample]) -> torch.Tensor | None:
        """Pooled embeddings of the trained network from the cached activations (the prefix did
        not change), or ``None`` for samples whose activations were not cached."""
        acts = self.memo.get(id(samples))
        if acts is None or self.cut == 0:
            return None
        suffix = nn.Sequential(*[u for _, u in self.units[self.cut :]])
        was = suffix.training
        suffix.eval()
        try:
            return torch.cat([suffix(chunk.float().to(self.device)).float().cpu() for chunk in acts.split(256)]) if len(acts) else torch.zeros(0, self.model.num_features)
        finally:
            suffix.train(was)

    def outputs(self, model: GraftClassifier, samples: list[Sample]) -> Outputs:
        """Final metrics: on the cached validation activations (the prefix did not change); any
        other split (test) runs through the whole network, batch by batch, as without the cache."""
        acts = self.memo.get(id(samples))
        if acts is None:
            from graft.tasks.classify.results import evaluate_samples

            return evaluate_samples(model, samples, self.pre, device=self.device, amp=False, workers=0, batch_size=self.cfg.solver.batch_size)
        loader = eval_loader(ActivationDataset(acts.unsqueeze(1), [s.label for s in samples]), batch_size=64, workers=0)
        return collect_outputs(SuffixHead(model, [u for _, u in self.units[self.cut :]]), loader, self.device)
