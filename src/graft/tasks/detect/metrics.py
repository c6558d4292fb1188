"""COCO detection metrics, computed by pycocotools (the reference implementation), not by hand.

``detection_metrics`` takes graft's samples and predictions (boxes in the original image's pixels)
and returns mAP@[.5:.95], mAP@.5, mAP@.75, AR@100, and per class AP, AP@.5 and the precision and
recall at a confidence threshold, the last from pycocotools' own matching at IoU 0.5. Crowd regions
and VOC "difficult" objects are ignored regions: a detection on them is neither a hit nor a miss.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graft.tasks.detect.boxes import BoxSample


@dataclass
class Prediction:
    """One image's detections: ``boxes [N, 4]`` xyxy in the original image's pixels."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class DetectionResult:
    metrics: dict[str, Any]
    pr_curves: dict[str, list[float]]  # per class: precision at the 101 recall points of IoU 0.5 (for plots)
    recall_points: list[float]


def _coco_objects(samples: Sequence[BoxSample], predictions: Sequence[Prediction], num_classes: int) -> tuple[Any, Any]:
    from pycocotools.coco import COCO

    images, anns = [], []
    for i, s in enumerate(samples):
        images.append({"id": i, "width": s.width, "height": s.height})
        for box, label, ignored in zip(s.boxes, s.labels, s.ignored):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label) + 1, "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": int(bool(ignored))})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    dets = []
    for i, p in enumerate(predictions):
        for box, score, label in zip(p.boxes, p.scores, p.labels):
            dets.append({"image_id": i, "category_id": int(label) + 1, "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])], "score": float(score)})
    dt = COCO()
    dt.dataset = {"images": images, "annotations": [], "categories": gt.dataset["categories"]}
    if dets:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(dets)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            dt.createIndex()
    return gt, dt


def detection_metrics(samples: Sequence[BoxSample], predictions: Sequence[Prediction], classes: Sequence[str], *, conf: float = 0.3) -> DetectionResult:
    from pycocotools.cocoeval import COCOeval

    k = len(classes)
    empty = {"map": None, "map50": None, "map75": None, "ar100": None, "conf": conf, "images": len(samples), "per_class": {c: {"ap": None, "ap50": None, "precision": None, "recall": None, "boxes": 0} for c in classes}}
    if not samples:
        return DetectionResult(empty, {}, [])
    gt, dt = _coco_objects(samples, predictions, k)
    ev = COCOeval(gt, dt, "bbox")
    # Only the 'all' area range is reported. pycocotools matches every image again for each of its
    # small/medium/large ranges: skipping them makes the matching, most of a validation pass on
    # crowded images, 4x cheaper, and changes none of the figures reported.
    ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    stats = _summary(ev)
    counts = np.bincount(np.concatenate([s.labels[~s.ignored] for s in samples]) if samples else np.zeros(0, int), minlength=k)
    per_class, curves = {}, {}
    hits = _hits_at(ev, conf, k)
    for c, name in enumerate(classes):
        p = precision[:, :, c, 0, -1]
        ap = float(p[p > -1].mean()) if (p > -1).any() else None
        p50 = precision[0, :, c, 0, -1]
        ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else None
        tp, fp, n_gt = hits[c]
        per_class[name] = {
            "ap": ap,
            "ap50": ap50,
            "precision": float(tp / (tp + fp)) if tp + fp else None,
            "recall": float(tp / n_gt) if n_gt else None,
            "boxes": int(counts[c]),
        }
        if (p50 > -1).any():
            curves[name] = [max(0.0, float(v)) for v in p50]
    metrics = {**stats, "conf": conf, "images": len(samples), "per_class": per_class}
    return DetectionResult(metrics, curves, [float(r) for r in ev.params.recThrs])


def _summary(ev: Any) -> dict[str, float | None]:
    """mAP@[.5:.95], mAP@.5, mAP@.75 and AR@100 over all areas, as ``COCOeval.summarize`` computes
    its stats[0], [1], [2] and [8] (None where pycocotools would give -1)."""
    p = ev.params
    m = p.maxDets.index(100)

    def mean(values: np.ndarray) -> float | None:
        valid = values[values > -1]
        return float(np.mean(valid)) if valid.size else None

    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    at = lambda iou: np.flatnonzero(np.isclose(p.iouThrs, iou))  # noqa: E731
    return {
        "map": mean(precision[:, :, :, 0, m]),
        "map50": mean(precision[at(0.5), :, :, 0, m]),
        "map75": mean(precision[at(0.75), :, :, 0, m]),
        "ar100": mean(recall[:, :, 0, m]),
    }


def _hits_at(ev: Any, conf: float, k: int) -> list[tuple[int, int, int]]:
    """Per class (true positives, false positives, ground-truth boxes) at IoU 0.5 among
    detections scoring at least ``conf``, from pycocotools' matching (area 'all', 100 detections)."""
    out = [[0, 0, 0] for _ in range(k)]
    area_all = ev.params.areaRng[0]
    for e in ev.evalImgs:
        if e is None or e["aRng"] != area_all:
            continue
        c = e["category_id"] - 1
        scores = np.asarray(e["dtScores"])
        matched = np.asarray(e["dtMatches"])[0] > 0 if len(scores) else np.zeros(0, bool)
        ignored = np.asarray(e["dtIgnore"])[0].astype(bool) if len(scores) else np.zeros(0, bool)
        confident = (scores >= conf) & ~ignored
        out[c][0] += int((confident & matched).sum())
        out[c][1] += int((confident & ~matched).sum())
        out[c][2] += int((~np.asarray(e["gtIgnore"]).astype(bool)).sum())
    return [tuple(v) for v in out]
