"""How a detector expansion is measured (``expand_metrics.json``): the old classes before and after on
the original run's held-out images, the new classes on the new data's held-out images together with
the original's, each block scored on its own classes' boxes; and the parameters that changed, counted."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from graft.configuration import GraftConfig
from graft.data.dataset import default_workers, eval_loader
from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.data import DetectionSplits
from graft.tasks.detect.dataset import BoxDataset
from graft.tasks.detect.metrics import Prediction, detection_metrics
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.task import DetectionTask, collect_detections
from graft.models import surgery

if TYPE_CHECKING:
    from graft.tasks.detect.expand import DetectionSource


def restrict(samples: list[BoxSample], keep: range) -> list[BoxSample]:
    """The samples with only the boxes of classes in ``keep``, relabelled from 0."""
    out = []
    for s in samples:
        m = (s.labels >= keep.start) & (s.labels < keep.stop)
        out.append(dataclasses.replace(s, boxes=s.boxes[m], labels=s.labels[m] - keep.start, crowd=s.crowd[m], difficult=s.difficult[m]))
    return out


def restrict_predictions(preds: list[Prediction], keep: range) -> list[Prediction]:
    out = []
    for p in preds:
        m = (p.labels >= keep.start) & (p.labels < keep.stop)
        out.append(Prediction(p.boxes[m], p.scores[m], p.labels[m] - keep.start))
    return out


def held_out(samples_by_split: list[tuple[str, list[BoxSample]]]) -> tuple[str | None, list[BoxSample]]:
    """The first non-empty split whose images are still on disk: test before val."""
    for name, samples in samples_by_split:
        present = [s for s in samples if Path(s.path).is_file()]
        if present:
            return name, present
    return None, []


def expansion_metrics(source: DetectionSource, model: GraftDetector, splits: DetectionSplits, k: int, cfg: GraftConfig, device: torch.device) -> dict[str, Any]:
    """Old classes on the original run's held-out images (before and after); new classes on the new
    data's held-out images together with the original's (``new_map``; on the new data's alone:
    ``new_map_new_images``). Each block is scored on its own classes' boxes, so an old object the
    new data never labelled does not count against the old classes."""
    classes = splits.classes
    old_classes, new_classes = classes[:k], classes[k:]
    workers = min(2, cfg.data.num_workers if cfg.data.num_workers is not None else default_workers())

    def detect(net: GraftDetector, samples: list[BoxSample]) -> list[Prediction]:
        loader = eval_loader(BoxDataset(samples, net.size, max_pixels=cfg.data.max_pixels), batch_size=cfg.solver.batch_size, workers=workers, collate_fn=DetectionTask.collate)
        return collect_detections(net.to(device), loader, device, samples)

    def score(samples: list[BoxSample], preds: list[Prediction], keep: range, names: list[str]) -> dict[str, Any]:
        return detection_metrics(restrict(samples, keep), restrict_predictions(preds, keep), names, conf=cfg.detect.conf).metrics

    old_range, new_range = range(0, k), range(k, len(classes))
    src = source.splits
    old_split, old_samples = held_out([("test", src.test), ("val", src.val)] if src is not None else [])
    new_split, new_samples = held_out([("test", splits.test), ("val", splits.val)])
    out: dict[str, Any] = {"old_classes": old_classes, "new_classes": new_classes, "old_split": f"{Path(source.name).name} {old_split}" if old_split else None, "new_split": new_split, "old_images": len(old_samples), "new_images": len(new_samples)}
    before = after = None
    if old_samples:
        teacher_preds, preds = detect(source.model, old_samples), detect(model, old_samples)
        before, after = score(old_samples, teacher_preds, old_range, old_classes), score(old_samples, preds, old_range, old_classes)
        kept = [restrict_predictions([p], old_range)[0] for p in preds]
        same = sum(np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores) and np.array_equal(a.labels, b.labels) for a, b in zip(teacher_preds, kept))
        out["old_detections_unchanged"] = same / len(old_samples)
    else:
        out["note"] = (f"the old classes could not be measured: none of {source.name}'s held-out images are on disk" if source.dir is not None else
                       f"the old classes are not measured: {source.name}'s held-out images (COCO val) are not at hand; in frozen mode their detections are the COCO model's by construction")
    new_preds = detect(model, new_samples) if new_samples else []
    new, new_alone = score_new_classes((new_samples, new_preds), (old_samples, preds if old_samples else []), new_range, new_classes, cfg.detect.conf)
    if new_samples and old_samples:
        out["new_split"] = f"{new_split} + {out['old_split']}"
        out["new_images"] = len(new_samples) + len(old_samples)
    ap = {**({c: v["ap"] for c, v in after["per_class"].items()} if after else {}), **({c: v["ap"] for c, v in new["per_class"].items()} if new else {})}
    measured = [v for v in ap.values() if v is not None]
    out.update(
        old_map_before=before["map"] if before else None, old_map_after=after["map"] if after else None,
        old_map50_before=before["map50"] if before else None, old_map50_after=after["map50"] if after else None,
        forgetting=before["map"] - after["map"] if before and after and before["map"] is not None and after["map"] is not None else None,
        new_map=new["map"] if new else None, new_map50=new["map50"] if new else None,
        new_map_new_images=new_alone["map"] if new_alone else None, new_map50_new_images=new_alone["map50"] if new_alone else None,
        overall_map=float(np.mean(measured)) if measured else None,
        per_class_before=before["per_class"] if before else {}, per_class_after={**(after["per_class"] if after else {}), **(new["per_class"] if new else {})},
    )
    return out


def score_new_classes(new: tuple[list[BoxSample], list[Prediction]], old: tuple[list[BoxSample], list[Prediction]], keep: range, names: list[str], conf: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The new classes' metrics on the new data's held-out images together with the original's,
    and on the new data's alone (``None`` without new images). The original's images show old
    objects only: a new-class box there (an old object that looks like a new one) is a false
    positive, which the new data's images rarely reveal, as their old objects carry no boxes."""
    (new_samples, new_preds), (old_samples, old_preds) = new, old
    if not new_samples:
        return None, None

    def score(samples: list[BoxSample], preds: list[Prediction]) -> dict[str, Any]:
        return detection_metrics(restrict(samples, keep), restrict_predictions(preds, keep), names, conf=conf).metrics

    alone = score(new_samples, new_preds)
    return (score(new_samples + old_samples, new_preds + old_preds) if old_samples else alone), alone


def parameter_changes(original: GraftDetector, expanded: GraftDetector, added: dict[str, int]) -> dict[str, int]:
    """Counted by comparing tensors: the old parameters whose value changed, and the new ones."""
    before = dict(original.named_parameters())
    # the first widening made the old class layer block 0
    return surgery.parameter_changes(original, expanded, added["new_parameters"], old_name=lambda n: n if n in before else n.replace("cls_logits.blocks.0.", "cls_logits."))
