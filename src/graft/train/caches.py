"""Where a phase's batches come from when something can be computed once instead of every epoch.

- ``CachedEmbeddings``: a frozen-backbone phase trains the head on cached backbone embeddings.
- ``PrefixActivations``: a fine-tuning phase without augmentation caches the activations at the
  cut below the first trainable block and runs only the trainable suffix.
- ``decoded_images``: image phases read each file's decoded, resized pixels from memory.

Each returns ``None`` where it does not apply, and the loop then runs the plain image path.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from graft.configuration import GraftConfig
from graft.console import plural
from graft.data.dataset import ImageDataset, eval_loader
from graft.data.folder import DatasetSplits, Sample
from graft.data.transforms import Preprocessing, eval_transform, flipped_transform, train_transform
from graft.evaluate import Outputs, collect_outputs, in_chunks
from graft.models import surgery
from graft.models.classifier import GraftClassifier
from graft.train.class_stats import ClassStats
from graft.train.embeddings import EmbeddingCache, EmbeddingDataset, backbone_fingerprint, default_cache_dir
from graft.train.loop import Phase, PhaseData


def training_views(cache: EmbeddingCache, samples: list[Sample], pre: Preprocessing, aug: Any, cfg: GraftConfig, epochs: int, decoded: Any = None) -> torch.Tensor:
    """``[N, V, D]``: without augmentation the one evaluation view, else V augmented views, never
    more than there are epochs (then the cache costs at most what the slow path would). An
    augmentation that only flips has 2 or 4 outcomes: each is cached once (the unflipped one is the
    evaluation view, already needed), and each epoch draws one of them, as a random flip would."""
    if aug.is_identity:
        return cache.embed(samples, eval_transform(pre)).unsqueeze(1)
    views = max(1, min(cfg.train.cache_views, epochs))
    if aug.flips is not None and views > 1:
        return torch.stack([
            cache.embed(samples, flipped_transform(pre, h, v), view=i, augmentation={"flips": [h, v]} if i else None, decoded=decoded)
            for i, (h, v) in enumerate(aug.flips)
        ], 1)
    tf, spec = train_transform(pre, aug), asdict(aug)
    return torch.stack([cache.embed(samples, tf, view=v, augmentation=spec, seed=cfg.solver.seed, decoded=decoded) for v in range(1, views + 1)], 1)


class CachedEmbeddings:
    """Embedding-cache data for the frozen-backbone phase, built on first use."""

    def __init__(self, cache: EmbeddingCache, head: nn.Module, cfg: GraftConfig, splits: DatasetSplits, pre: Preprocessing, aug: Any, device: torch.device, say: Any) -> None:
        self.cache, self.head, self.cfg, self.splits, self.pre, self.aug, self.device, self.say = cache, head, cfg, splits, pre, aug, device, say
        self._data: PhaseData | None = None
        self.decoded: Any = None  # DecodedImages of the training split, when images are decoded more than once

    def phase_data(self, phase: Phase) -> PhaseData | None:
        if not phase.backbone_frozen:
            return None
        if self._data is None:
            self._data = self._build(phase)
        return self._data

    def _build(self, phase: Phase) -> PhaseData:
        cfg, splits, pre, aug = self.cfg, self.splits, self.pre, self.aug
        before = self.cache.computed
        started = time.perf_counter()
        train_emb = training_views(self.cache, splits.train, pre, aug, cfg, phase.epochs, decoded=self.decoded)
        val_emb = self.cache.embed(splits.val, eval_transform(pre))
        computed = self.cache.computed - before
        where = self.cache.store.root if self.cache.store else "memory"
        self.say(f"embedding cache: {computed} image views through the backbone ({time.perf_counter() - started:.1f}s), {train_emb.shape[0] * train_emb.shape[1] + len(val_emb) - computed} reused; stored in {where}")
        train = EmbeddingDataset(train_emb, [s.label for s in splits.train], seed=cfg.solver.seed)
        val = EmbeddingDataset(val_emb, [s.label for s in splits.val])
        return PhaseData(train, val, forward=self.head, workers=0)

    def outputs(self, model: GraftClassifier, samples: list) -> Outputs:
        emb = self.cache.embed(samples, eval_transform(self.pre))
        loader = eval_loader(EmbeddingDataset(emb, [s.label for s in samples]), batch_size=256, workers=0)
        return collect_outputs(model.head, loader, self.device)


def _decoded(samples: list[Sample], cfg: GraftConfig, pre: Preprocessing, share: float) -> Any:
    from graft.data.decoded import DecodedImages

    root = Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir()
    return DecodedImages(samples, pre, budget_mb=cfg.data.decode_cache_mb * share, disk_dir=root, max_pixels=cfg.data.max_pixels).fill()


def _shares(splits: DatasetSplits) -> tuple[float, float]:
    total = max(1, len(splits.train) + len(splits.val))
    return len(splits.train) / total, len(splits.val) / total


def decoded_for_search(cfg: GraftConfig, splits: DatasetSplits, pre: Preprocessing) -> Any:
    """Training images decoded once for ``auto``'s augmented candidates (each embeds several
    views); the run reuses them."""
    if cfg.data.decode_cache_mb <= 0 or cfg.data.augment != "auto":
        return None
    return _decoded(splits.train, cfg, pre, _shares(splits)[0])


def decoded_images(cfg: GraftConfig, phases: list[Phase], cached: CachedEmbeddings | None, aug: Any, splits: DatasetSplits, pre: Preprocessing, say: Any, train: Any = None) -> tuple[Any, Any]:
    """Decode each image once up front when the run would otherwise decode it more than once
    (image epochs, or several augmented views for the embedding cache); ``train``: the training
    images already decoded (by the ``auto`` search)."""
    if cfg.data.decode_cache_mb <= 0:
        return None, None
    on_embeddings = [p for p in phases if p.backbone_frozen and cached is not None]
    image_epochs = sum(p.epochs for p in phases if p not in on_embeddings)
    view_passes = max((min(cfg.train.cache_views, p.epochs) for p in on_embeddings if not aug.is_identity), default=0)
    if image_epochs <= 1 and view_passes <= 1:
        return train, None
    # A random-resized crop must see the full-resolution file, not the pipeline-resized copy:
    # training images are then decoded per epoch, so caching never changes a result.
    train_decodable = not aug.crop_scale
    if not train_decodable and image_epochs <= 1:
        return None, None
    started = time.perf_counter()
    share_train, share_val = _shares(splits)
    if train_decodable and train is None:
        train = _decoded(splits.train, cfg, pre, share_train)
    val = _decoded(splits.val, cfg, pre, share_val) if image_epochs > 1 else None
    parts = [f"train {train.describe()}" if train_decodable else "train: decoded per epoch (random-resized crops need the full image)"] + ([f"val {val.describe()}"] if val else [])
    say(f"decoded images once ({time.perf_counter() - started:.1f}s): " + "; ".join(parts))
    return (train if train_decodable else None), val


def frozen_bn_fixed(cfg: GraftConfig) -> bool:
    """Do frozen BatchNorm layers stay in inference mode (so a frozen part is a fixed function)?"""
    return cfg.model.frozen_bn_eval or cfg.model.bn_inference


def embedding_cache(cfg: GraftConfig, model: GraftClassifier, pre: Preprocessing, device: torch.device, workers: int, *, stored: bool = True) -> EmbeddingCache:
    """The frozen backbone's embeddings of this run's images, kept on disk unless ``stored`` is off."""
    root = (Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir()) if stored else None
    return EmbeddingCache(
        model.backbone,
        root=root,
        spec={"preprocessing": pre.to_dict(), "backbone": cfg.model.name},
        device=device,
        batch_size=max(32, cfg.solver.batch_size),
        workers=workers,
        max_pixels=cfg.data.max_pixels,
    )


def embedding_data(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, pre: Preprocessing, aug: Any, device: torch.device, workers: int, say: Any, cache: EmbeddingCache | None = None) -> CachedEmbeddings | None:
    """The embedding cache applies when a frozen backbone is a fixed function of the image: its
    BatchNorm stays in inference mode (``model.frozen_bn_eval`` or ``model.bn_inference``)."""
    if not (cfg.train.embedding_cache and frozen_bn_fixed(cfg)):
        return None
    return CachedEmbeddings(cache or embedding_cache(cfg, model, pre, device, workers), model.head, cfg, splits, pre, aug, device, say)


def class_statistics(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, pre: Preprocessing, cached: CachedEmbeddings | None, last: Phase, device: torch.device, workers: int, prefix: PrefixActivations | None = None) -> ClassStats:
    """Statistics of the trained model's embeddings of the training images, as the model sees
    images when it predicts (the evaluation view, never augmented views: a rotated 6 is no 6 a user
    will show it, and new classes learned against such negatives misjudge the real old images).
    From the cache when the backbone stayed frozen (free without augmentation), from the frozen
    prefix's cached activations after fine-tuning without augmentation (only the top runs), else
    one inference pass over the training and validation splits."""
    fingerprint = backbone_fingerprint(model.backbone)
    labels = torch.tensor([s.label for s in splits.train])
    from_prefix = prefix.embeddings(splits.train) if prefix is not None and not last.backbone_frozen else None
    if from_prefix is not None:
        emb, heldout = from_prefix, prefix.embeddings(splits.val)
    else:
        if cached is not None and last.backbone_frozen:
            cache = cached.cache
        else:
            cache = EmbeddingCache(model.backbone, root=None, spec={}, device=device, batch_size=max(32, cfg.solver.batch_size), workers=workers, max_pixels=cfg.data.max_pixels)
        emb = cache.embed(splits.train, eval_transform(pre))
        heldout = cache.embed(splits.val, eval_transform(pre))
    return ClassStats.fit(emb, labels, splits.classes, fingerprint, heldout=heldout, heldout_labels=torch.tensor([s.label for s in splits.val], dtype=torch.long))



# ---------------------------------------------------------------------------- frozen prefix


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


class ActivationDataset(Dataset):
    """Cached activations (stored in half precision); ``ds[i]`` or ``ds[(i, epoch)]``."""

    def __init__(self, activations: torch.Tensor, labels: list[int]) -> None:
        self.activations, self.labels = activations, labels

    def __len__(self) -> int:
        return len(self.activations)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key
        return self.activations[index].float(), self.labels[index]


def prefix_data(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, pre: Preprocessing, aug: Any, device: torch.device, say: Any, decoded: tuple[Any, Any]) -> PrefixActivations | None:
    """The prefix cache applies without augmentation (a frozen prefix then maps each image to one
    activation) and with frozen BatchNorm in inference mode."""
    if not (cfg.train.prefix_cache and aug.is_identity and frozen_bn_fixed(cfg)):
        return None
    source = PrefixActivations(model, cfg, splits, pre, device, say, decoded)
    return source if source.units is not None else None


class PrefixActivations:
    """For a fine-tuning phase without augmentation: run the frozen prefix once per image."""

    def __init__(self, model: GraftClassifier, cfg: GraftConfig, splits: DatasetSplits, pre: Preprocessing, device: torch.device, say: Any, decoded: tuple[Any, Any] = (None, None)) -> None:
        self.model, self.cfg, self.splits, self.pre, self.device, self.say = model, cfg, splits, pre, device, say
        self.decoded = decoded
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
        need = per_image * (len(self.splits.train) + len(self.splits.val))
        budget = self.cfg.train.prefix_cache_mb * 2**20
        if need > budget:
            self.say(f"prefix cache: {need / 2**20:.0f} MiB of activations exceed train.prefix_cache_mb={self.cfg.train.prefix_cache_mb:g}; running the whole network each epoch")
            return None
        started = time.perf_counter()
        train = self._activations(prefix, self.splits.train, self.decoded[0])
        val = self._activations(prefix, self.splits.val, self.decoded[1])
        if not (torch.isfinite(train).all() and torch.isfinite(val).all()):
            self.say("prefix cache: activations overflow half precision; running the whole network each epoch")
            return None
        self.cut = cut
        self.memo = {id(self.splits.val): val, id(self.splits.train): train}
        self.say(f"prefix cache: {self.units[cut - 1][0]} and below are frozen; their activations for {plural(len(train) + len(val), 'image')} computed once ({time.perf_counter() - started:.1f}s, {need / 2**20:.0f} MiB); each epoch runs only the layers above")
        forward = SuffixHead(self.model, [u for _, u in self.units[cut:]])
        return PhaseData(ActivationDataset(train, [s.label for s in self.splits.train]), ActivationDataset(val, [s.label for s in self.splits.val]), forward=forward, workers=0)

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
    def _activations(self, prefix: nn.Module, samples: list[Sample], decoded: Any) -> torch.Tensor:
        was = prefix.training
        prefix.eval()
        try:
            ds = ImageDataset(samples, eval_transform(self.pre), max_pixels=self.cfg.data.max_pixels, decoded=decoded)
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
            from graft.train.results import evaluate_samples

            return evaluate_samples(model, samples, self.pre, device=self.device, amp=False, workers=0, batch_size=self.cfg.solver.batch_size)
        loader = eval_loader(ActivationDataset(acts, [s.label for s in samples]), batch_size=64, workers=0)
        return collect_outputs(SuffixHead(model, [u for _, u in self.units[self.cut :]]), loader, self.device)


def phase_sources(*sources: Any) -> Any:
    """The first source that has data for a phase wins; None: the plain image path."""

    def data_for(phase: Phase) -> PhaseData | None:
        for source in sources:
            if source is not None:
                data = source.phase_data(phase)
                if data is not None:
                    return data
        return None

    return data_for
