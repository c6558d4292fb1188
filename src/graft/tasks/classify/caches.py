"""Where a phase's batches come from when something can be computed once instead of every epoch.

- ``CachedEmbeddings``: a frozen-backbone phase trains the head on cached backbone embeddings.
- ``PrefixActivations`` (``graft.tasks.classify.prefix``): a fine-tuning phase caches the activations at
  the cut below the first trainable block and runs only the trainable suffix.
- ``decoded_images``: image phases read each file's decoded, resized pixels from memory.

Each returns ``None`` where it does not apply, and the loop then runs the plain image path.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graft.configuration import GraftConfig
from graft.data.dataset import eval_loader
from graft.data.samples import DatasetSplits, Sample
from graft.data.transforms import Preprocessing, eval_transform, flipped_transform, train_transform
from graft.tasks.classify.evaluate import Outputs, collect_outputs
from graft.models.classifier import GraftClassifier
from graft.tasks.classify.class_stats import ClassStats
from graft.cache import cache_root
from graft.tasks.classify.embeddings import EmbeddingCache, EmbeddingDataset, backbone_fingerprint
from graft.engine import distributed
from graft.engine.loop import Phase, PhaseData
from graft.engine.phases import frozen_bn_fixed

if TYPE_CHECKING:
    from graft.tasks.classify.prefix import PrefixActivations


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
        # Computed once, on rank 0 with several processes (which alone writes the store), and
        # handed to every rank.
        train_emb, val_emb = distributed.on_main(lambda: (
            training_views(self.cache, splits.train, pre, aug, cfg, phase.epochs, decoded=self.decoded),
            self.cache.embed(splits.val, eval_transform(pre)),
        ))
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

    root = cache_root(cfg.train.cache_dir)
    # With several processes each rank decodes for itself; only rank 0 spills to the shared disk cache.
    disk = root if distributed.is_main() else None
    return DecodedImages(samples, pre, budget_mb=cfg.data.decode_cache_mb * share, disk_dir=disk, max_pixels=cfg.data.max_pixels).fill()


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


def embedding_cache(cfg: GraftConfig, model: GraftClassifier, pre: Preprocessing, device: torch.device, workers: int, *, stored: bool = True) -> EmbeddingCache:
    """The frozen backbone's embeddings of this run's images, kept on disk unless ``stored`` is off."""
    root = cache_root(cfg.train.cache_dir) if stored else None
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
