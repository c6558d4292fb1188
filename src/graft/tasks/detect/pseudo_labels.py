"""Pseudo-labels for a detector expansion: the new classes boxed in the original run's own
training images.

A detector's training images usually show the classes added later, unboxed (VOC's "19 + 1": the
original learnt 19 classes from photos in which the 20th appears). The expansion's new data has
fewer boxes of the new classes than those photos hold, and no image in which old objects carry
boxes that say "this is not a new class". So: the new block first learns from the new data alone
(a probe, in memory); then it detects its classes in the original's training images still on
disk. A detection scoring at least ``expand.pseudo_label_score`` that does not lie on an object
the original's data boxed (IoU >= ``ON_OLD_OBJECT``) becomes a box; the images join the training
data with those boxes and their old ones (negatives for the new block), and the run trains the
new block further on both. Old detections are not touched: in frozen mode they stay the original's.

Measured (``benchmarks/expand_detection.py --dataset digits``) in the README.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from graft.configuration import GraftConfig
from graft.data.dataset import default_workers, eval_loader
from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.cache import build_feature_cache, cache_options, features_cacheable
from graft.tasks.detect.data import DetectionSplits
from graft.tasks.detect.dataset import BoxAugment, BoxDataset
from graft.tasks.detect.metrics import Prediction
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.task import DetectionTask, collect_detections
from graft.engine.device import seed_everything
from graft.engine.loop import Phase, PhaseData, Trainer

ON_OLD_OBJECT = 0.5  # IoU with a box of the original's data above which a new-class detection is an old object


def source_images(source_splits: DetectionSplits | None, new: DetectionSplits) -> list[BoxSample]:
    """The original run's training images still on disk that the new data does not hold itself."""
    if source_splits is None:
        return []
    taken = {Path(s.path).resolve() for s in new.train + new.val + new.test}
    return [s for s in source_splits.train if Path(s.path).is_file() and Path(s.path).resolve() not in taken]


def probe(cfg: GraftConfig, model: GraftDetector, splits: DetectionSplits, phase: Phase, aug: BoxAugment, device: torch.device, say: Any) -> float | None:
    """Train the new block (``phase``) on ``splits`` in memory, on cached backbone features where
    the backbone is a fixed function; returns the last epoch's validation mAP."""
    model.to(device)
    amp = cfg.train.amp if isinstance(cfg.train.amp, bool) else device.type == "cuda"
    train_ds = BoxDataset(splits.train, model.size, aug, seed=cfg.solver.seed, max_pixels=cfg.data.max_pixels)
    val_ds = BoxDataset(splits.val, model.size, max_pixels=cfg.data.max_pixels)
    caches: list[Any] = []
    data_for_phase = None
    if features_cacheable(cfg):
        common = cache_options(cfg, device, amp, say)
        caches.append(build_feature_cache(model, train_ds, views=cfg.train.cache_views, **common))
        caches.append(build_feature_cache(model, val_ds, views=1, **common) if len(val_ds) else None)
        data_for_phase = lambda p: PhaseData(caches[0], caches[1], forward=model, workers=0)  # noqa: E731
    try:
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()  # images, where the features are not cached
        trainer = Trainer(model, [phase], solver=cfg.solver, train_data=train_ds, val_data=val_ds, device=device, amp=amp, workers=workers,
                          freeze_patterns=cfg.model.freeze, lr_rules=cfg.model.lr_mult, task=DetectionTask(splits.val, splits.classes, cfg.detect.conf),
                          data_for_phase=data_for_phase)
        seed_everything(cfg.solver.seed)
        history = trainer.fit().history
    finally:
        for c in caches:
            if c is not None:
                c.close()
    return history[-1].get("val_map") if history else None


def with_pseudo_boxes(sample: BoxSample, found: Prediction, k: int, score: float) -> tuple[BoxSample, int]:
    """``sample`` with the new-class detections of ``found`` (labels >= ``k``) that score at least
    ``score``, are at least a pixel wide and high, and do not lie on one of its boxes added as boxes; and how many were dropped for
    lying on a boxed (old) object."""
    extent = np.minimum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1]) if len(found.boxes) else np.zeros(0)
    m = (found.labels >= k) & (found.scores >= score) & (extent >= 1)  # a box clipped to nothing at the border is no object
    boxes, labels = found.boxes[m].astype(np.float32).reshape(-1, 4), found.labels[m].astype(np.int64)
    dropped = 0
    if len(boxes) and len(sample.boxes):
        on_old = box_iou(torch.as_tensor(boxes), torch.as_tensor(sample.boxes, dtype=torch.float32)).amax(1).numpy() >= ON_OLD_OBJECT
        dropped = int(on_old.sum())
        boxes, labels = boxes[~on_old], labels[~on_old]
    added = dataclasses.replace(
        sample, boxes=np.concatenate([sample.boxes.astype(np.float32).reshape(-1, 4), boxes]), labels=np.concatenate([sample.labels.astype(np.int64), labels]),
        crowd=np.concatenate([sample.crowd.astype(bool), np.zeros(len(boxes), bool)]), difficult=np.concatenate([sample.difficult.astype(bool), np.zeros(len(boxes), bool)]),
    )
    return added, dropped


def pseudo_label(model: GraftDetector, images: list[BoxSample], k: int, *, score: float, cfg: GraftConfig, device: torch.device) -> tuple[list[BoxSample], dict[str, Any]]:
    """``images`` (labels in the expanded index; old boxes only) with the new classes that
    ``model`` finds in them added as boxes, and what was found, counted."""
    workers = min(2, cfg.data.num_workers if cfg.data.num_workers is not None else default_workers())
    loader = eval_loader(BoxDataset(images, model.size, max_pixels=cfg.data.max_pixels), batch_size=cfg.solver.batch_size, workers=workers, collate_fn=DetectionTask.collate)
    out, dropped = [], 0
    for sample, found in zip(images, collect_detections(model.to(device), loader, device, images)):
        labelled, d = with_pseudo_boxes(sample, found, k, score)
        out.append(labelled)
        dropped += d
    added = [len(a.boxes) - len(s.boxes) for a, s in zip(out, images)]
    return out, {"images": len(images), "images_with_boxes": sum(n > 0 for n in added), "boxes": sum(added), "dropped_on_old_objects": dropped, "score": score}


def add_pseudo_labelled(cfg: GraftConfig, model: GraftDetector, splits: DetectionSplits, source_splits: DetectionSplits | None, k: int, phase: Phase, aug: BoxAugment, device: torch.device, say: Any) -> tuple[DetectionSplits, dict[str, Any]]:
    """``splits`` with the original's training images added, pseudo-labelled by a probe of the new
    block (``model`` then holds the probe's block: the run continues from it); and the record."""
    images = source_images(source_splits, splits)
    if not images:
        if source_splits is None:
            why = "the original run has no data split (splits.json)"
        elif not any(Path(s.path).is_file() for s in source_splits.train):
            why = "the original run's training images are not on disk"
        else:
            why = "the new data holds every training image of the original run"
        say(f"pseudo-labels: none ({why})")
        return splits, {"used": False, "why": why}
    t0 = time.perf_counter()
    say(f"pseudo-labels: the new block trains {phase.epochs} epochs on the new data alone, then looks for its classes in {len(images)} training images of the original run")
    val_map = probe(cfg, model, splits, phase, aug, device, say)
    # the source's labels are its classes' indices, which the expansion keeps (old classes first)
    labelled, found = pseudo_label(model, images, k, score=cfg.expand.pseudo_label_score, cfg=cfg, device=device)
    record = {"used": True, "probe_epochs": phase.epochs, "probe_val_map": val_map, **found, "seconds": round(time.perf_counter() - t0, 2)}
    say(f"pseudo-labels: the new block, trained {phase.epochs} epochs on the new data (val mAP {'n/a' if val_map is None else f'{val_map:.3f}'}), "
        f"boxed {found['boxes']} new objects in {found['images_with_boxes']} of the original's {found['images']} training images "
        f"(score >= {found['score']:g}; {found['dropped_on_old_objects']} detections on boxed old objects dropped); it trains on both ({record['seconds']:.1f}s)")
    return dataclasses.replace(splits, train=splits.train + labelled), record
