"""The end of a run: the trained model, its metrics and its plots, each written atomically."""

from __future__ import annotations

import random
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from graft.data.dataset import ImageDataset, eval_loader
from graft.data.samples import DatasetSplits, Sample
from graft.data.images import ImageError, load_image
from graft.data.transforms import Preprocessing, eval_transform
from graft.tasks.classify.evaluate import Outputs, collect_outputs, metrics_from_outputs
from graft.io import write_json
from graft.models.classifier import GraftClassifier
from graft.report.figures import plot_learning_curves, write_history_csv
from graft.tasks.classify.plots import plot_confusion_matrix, plot_predictions
from graft.engine.run_folder import save_model


def evaluate_samples(model: GraftClassifier, samples: list[Sample], pre: Preprocessing, *, device: torch.device, amp: bool, workers: int, batch_size: int = 64) -> Outputs:
    ds = ImageDataset(samples, eval_transform(pre))
    return collect_outputs(model, eval_loader(ds, batch_size=batch_size, workers=min(workers, 2)), device, amp=amp)


def prediction_items(samples: list[Sample], out: Outputs, classes: list[str], *, limit: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """A sample of predictions for the grid, the mistakes first so they are seen."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    preds = out.preds
    order.sort(key=lambda i: preds[i] == out.labels[i])
    items = []
    for i in order[:limit]:
        try:
            image = load_image(samples[i].path)
        except ImageError:
            continue
        image.thumbnail((256, 256))
        items.append({"image": image, "true": classes[out.labels[i]], "pred": classes[preds[i]], "prob": float(out.probs[i, preds[i]])})
    return items


def write_results(
    run_dir: Path,
    model: GraftClassifier,
    info: dict[str, Any],
    splits: DatasetSplits,
    history: list[dict[str, Any]],
    *,
    device: torch.device,
    amp: bool,
    workers: int,
    train_seconds: float,
    outputs_for: Callable[[GraftClassifier, list[Sample]], Outputs] | None = None,
    batch_size: int = 32,
    blocks: list[tuple[str, int, int]] | None = None,
) -> dict[str, Any]:
    """Write model, metrics and plots; returns the metrics (also in ``metrics.json``).
    ``outputs_for`` computes model outputs some cheaper way (cached embeddings) when it can."""
    classes = splits.classes
    pre = Preprocessing.from_dict(info["preprocessing"])

    def outputs(samples: list[Sample]) -> Outputs:
        if outputs_for is not None:
            return outputs_for(model, samples)
        return evaluate_samples(model, samples, pre, device=device, amp=amp, workers=workers, batch_size=batch_size)

    val = outputs(splits.val)
    test = outputs(splits.test) if splits.test else None
    val_m = metrics_from_outputs(val, classes)
    test_m = metrics_from_outputs(test, classes) if test is not None else None
    final = test_m or val_m
    metrics = {
        "val_accuracy": val_m["accuracy"],
        "val_loss": val_m["loss"],
        "test_accuracy": test_m["accuracy"] if test_m else None,
        "test_loss": test_m["loss"] if test_m else None,
        "classes": classes,
        "per_class": final["per_class"],
        "per_class_split": "test" if test_m else "val",
        "confusion_matrix": final["confusion_matrix"],
        "val": val_m,
        "test": test_m,
        "counts": splits.counts(),
        "epochs": len(history),
        "train_seconds": round(train_seconds, 2),
        "skipped_files": [{"path": str(s.path), "reason": s.reason} for s in splits.skipped],
        "warnings": list(splits.warnings),
        # What ``auto`` became and the validation figures behind it; early stopping's best epochs.
        **{k: info[k] for k in ("decided", "early_stopping") if k in info},
    }
    info = {**info, "metrics": {k: metrics[k] for k in ("val_accuracy", "test_accuracy", "epochs", "train_seconds")}}
    save_model(run_dir, model, info)
    write_json(run_dir / "metrics.json", metrics)
    write_history_csv(history, run_dir / "history.csv")
    if history:
        plot_learning_curves(history, run_dir / "learning_curves.png", title=f"{info['backbone']['name']} on {len(classes)} classes")
    which = "test" if test_m else "validation"
    plot_confusion_matrix(final["confusion_matrix"], classes, run_dir / "confusion_matrix.png", title=f"Confusion matrix ({which})", blocks=blocks)
    shown = (splits.test, test) if test is not None else (splits.val, val)
    items = prediction_items(shown[0], shown[1], classes) if len(shown[0]) else []
    if items:
        plot_predictions(items, run_dir / "predictions.png", title=f"Predictions on the {which} images (mistakes first)")
    return metrics
