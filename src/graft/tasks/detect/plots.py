"""A detection run's pictures: validation images with predicted and true boxes (misses and false
positives marked), per-class AP, and precision-recall curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from torchvision.ops import box_iou

from graft.console import plural
from graft.data.images import ImageError, load_image
from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.metrics import Prediction
from graft.report.figures import pyplot, save_figure

HIT, MISS, FALSE = "#2f9e44", "#e8590c", "#c62828"
TRUE = "#1971c2"


def match(sample: BoxSample, pred: Prediction, conf: float, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(detections at ``conf`` that hit a true box of their class, true boxes that were found):
    greedy by score at IoU ``iou``, for drawing only (the metric is pycocotools')."""
    import torch

    keep = pred.scores >= conf
    boxes, labels, scores = pred.boxes[keep], pred.labels[keep], pred.scores[keep]
    hit, found = np.zeros(len(boxes), bool), np.zeros(len(sample.boxes), bool)
    if len(boxes) and len(sample.boxes):
        ious = box_iou(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(sample.boxes, dtype=torch.float32)).numpy()
        for d in np.argsort(-scores):
            candidates = np.flatnonzero((sample.labels == labels[d]) & ~found & (ious[d] >= iou))
            if len(candidates):
                found[candidates[np.argmax(ious[d, candidates])]] = True
                hit[d] = True
    return hit, found | sample.ignored


def best_f1_threshold(samples: Sequence[BoxSample], preds: Sequence[Prediction]) -> float:
    """The score threshold with the best F1 (IoU 0.5) over these images: where a detector's boxes
    are worth looking at, whatever its scores' scale (FCOS scores rarely exceed 0.6)."""
    best, best_f1 = 0.3, -1.0
    n_true = sum(int((~s.ignored).sum()) for s in samples)
    for t in np.arange(0.05, 0.96, 0.05):
        tp = fp = 0
        for s, p in zip(samples, preds):
            hit, _ = match(s, p, float(t))
            tp, fp = tp + int(hit.sum()), fp + int((~hit).sum())
        f1 = 2 * tp / max(1, 2 * tp + fp + (n_true - tp))
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return round(best, 2)


def plot_detections(samples: Sequence[BoxSample], preds: Sequence[Prediction], classes: Sequence[str], path: str | os.PathLike, *, conf: float | None, title: str, limit: int = 12, columns: int = 4, labels_up_to: int = 25) -> os.PathLike | None:
    """The images with the most mistakes first: true boxes blue (orange when missed), detections
    green when right, red when false, with class and score while few enough to read. ``conf``
    None: the threshold with the best F1 on these images."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    chosen = conf is None
    conf = best_f1_threshold(samples, preds) if conf is None else conf
    scored = []
    for i, (s, p) in enumerate(zip(samples, preds)):
        hit, found = match(s, p, conf)
        scored.append(((~hit).sum() + (~found).sum(), i, hit, found))
    scored.sort(key=lambda t: (-t[0], t[1]))
    shown = scored[:limit]
    if not shown:
        return None
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.4 * rows + 0.6), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, (errors, i, hit, found) in zip(axes.flat, shown):
            s, p = samples[i], preds[i]
            try:
                ax.imshow(load_image(s.path))
            except ImageError:
                continue
            for box, label, ok in zip(s.boxes, s.labels, found):
                ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, lw=1.2, ec=TRUE if ok else MISS, ls="-" if ok else "--"))
            keep = p.scores >= conf
            for box, label, score, ok in zip(p.boxes[keep], p.labels[keep], p.scores[keep], hit):
                ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, lw=1.2, ec=HIT if ok else FALSE))
                if keep.sum() <= labels_up_to:
                    ax.text(box[0], box[1], f"{classes[label]} {score:.2f}", fontsize=6, color="white", va="bottom", bbox=dict(fc=HIT if ok else FALSE, ec="none", pad=0.5, alpha=0.8))
            misses, false = int((~found).sum()), int((~hit).sum())
            ax.set_title(f"{s.path.name[:28]}: {misses} missed, {false} false", fontsize=8, color=FALSE if errors else "0.2")
        how = f"score >= {conf:g}, the best F1 on these images" if chosen else f"score >= {conf:g}"
        fig.suptitle(f"{title}\nblue: true box, orange dashed: missed, green: detection that hits, red: false detection ({how})", fontsize=9)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)


def plot_per_class_ap(per_class: dict[str, dict], path: str | os.PathLike, *, title: str) -> os.PathLike:
    plt = pyplot()
    names = list(per_class)
    ap = [per_class[n]["ap"] or 0.0 for n in names]
    ap50 = [per_class[n]["ap50"] or 0.0 for n in names]
    order = np.argsort(ap)
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(names)))
    try:
        y = np.arange(len(names))
        ax.barh(y - 0.18, [ap50[i] for i in order], height=0.36, color="#74c0fc", label="AP@.5")
        ax.barh(y + 0.18, [ap[i] for i in order], height=0.36, color="#1971c2", label="AP@[.5:.95]")
        ax.set_yticks(y, [f"{names[i]} ({plural(per_class[names[i]]['boxes'], 'box', 'boxes')})" for i in order], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("average precision")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)


def plot_pr_curves(curves: dict[str, list[float]], recall: Sequence[float], path: str | os.PathLike, *, title: str) -> os.PathLike:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.6))
    try:
        for name, precision in sorted(curves.items()):
            ax.plot(recall, precision, lw=1.4, label=f"{name} (AP@.5 {np.mean(precision):.2f})")
        if not curves:
            ax.text(0.5, 0.5, "no true boxes", transform=ax.transAxes, ha="center", color="0.5")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall"), ax.set_ylabel("precision")
        ax.grid(True, alpha=0.3)
        if curves:
            ax.legend(fontsize=8, loc="lower left")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, path)
