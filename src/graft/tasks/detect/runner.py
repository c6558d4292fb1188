"""A detection run, from a validated config to a finished run folder.

It shares with a classifier run what the engine gives every task: the loop (with
``DetectionTask``), phases, solver, snapshots, early stopping, progress and history hooks, and the
run folder's safety (``opened_run``: ``--overwrite`` keeps the old run until the new one finishes).
``RUNDIR`` holds what a classifier run holds (``model.safetensors`` + ``model.json``,
``snapshots/``, ``history.csv``, ``metrics.json``, ``config.yaml``, ``splits.json``,
``weights_report.json``) and the detection plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.version import __version__
from graft.configuration import GraftConfig
from graft.console import plural, progress, tell_data, warn
from graft.data.dataset import default_workers, eval_loader
from graft.tasks.detect.build import build_detection_model, input_size
from graft.tasks.detect.autotune import FALLBACK, decide_augment
from graft.tasks.detect.cache import build_feature_cache, cache_options, features_cacheable
from graft.tasks.detect.data import DetectionSplits, describe, scan_detection
from graft.tasks.detect.dataset import BoxAugment, BoxDataset, resized_size
from graft.tasks.detect.metrics import detection_metrics
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.normalisers import with_global_normalisers
from graft.tasks.detect.plots import plot_detections, plot_per_class_ap, plot_pr_curves
from graft.tasks.detect.task import DetectionTask, collect_detections
from graft.tasks.detect.widen import block_kinds, class_blocks
from graft.errors import ConfigError, SnapshotError
from graft.report.html import write_report_after_run
from graft.tasks.detect.report import REPORT
from graft.io import write_json
from graft.models import surgery
from graft.report.figures import plot_learning_curves, write_history_csv
from graft.engine.hooks import EarlyStoppingHook, SnapshotHook, run_hooks
from graft.engine import distributed
from graft.engine.decision import Decision
from graft.engine.loop import Phase, PhaseData, Trainer
from graft.engine.run_folder import record_start, save_model

DETECTION_FILES = ("detections.png", "per_class_ap.png", "pr_curves.png")


# Defaults that differ from a classifier's, applied where the config does not set the key: detection
# heads start from scratch and need many more, smaller steps than a new linear layer. Chosen by
# validation mAP against wall time (benchmarks/detection.py --report val, objects and digits):
# batch 4 reached the tutorial loop's best in 36% of its time on objects where batch 8 needed 16
# epochs of a 30-epoch schedule and batch 2 lost on digits; 20 + 3 epochs ended above 30 + 5 on both.
DETECTION_DEFAULTS = {("solver", "batch_size"): 4, ("solver", "base_lr"): 3e-3, ("train", "epochs"): 20, ("train", "fine_tune_epochs"): 3}


def apply_detection_defaults(cfg: GraftConfig) -> list[str]:
    """Set ``DETECTION_DEFAULTS`` where ``cfg`` leaves the key at a classifier's default; returns what changed."""
    changed = []
    for (section, key), value in DETECTION_DEFAULTS.items():
        part = getattr(cfg, section)
        if key not in part.model_fields_set:
            setattr(part, key, value)
            changed.append(f"{section}.{key}={value}")
    return changed


def scan(cfg: GraftConfig) -> DetectionSplits:
    d = cfg.data
    return scan_detection(d.dir, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.solver.seed, strict=d.strict, max_pixels=d.max_pixels)


def augmentation(cfg: GraftConfig) -> tuple[str, BoxAugment]:
    """The box augmentation the config asks for; classifier-only presets are an error here."""
    name = cfg.data.augment
    if name == "flip-rotate":
        raise ConfigError("data.augment flip-rotate is for classifiers: rotating an image loosens its boxes; use none, flip, flip-scale or strong")
    if name == "auto":  # decided on the validation split when the run starts (graft.tasks.detect.autotune)
        name = FALLBACK
    return name, with_overrides(cfg, BoxAugment.preset(name))


def with_overrides(cfg: GraftConfig, aug: BoxAugment) -> BoxAugment:
    """A preset with the config's own flip and colour settings on top."""
    d = cfg.data
    overrides = {k: v for k, v in (("hflip", d.hflip), ("vflip", d.vflip)) if v is not None}
    if d.color_jitter is not None:
        overrides["color"] = d.color_jitter
    if overrides:
        aug = BoxAugment(**{**aug.__dict__, **overrides})
    return aug


def box_sizes(splits: DetectionSplits, size: int) -> list[float]:
    """Square roots of the training boxes' areas, in input pixels."""
    out = []
    for s in splits.train:
        _, _, scale = resized_size(s.width, s.height, size)
        wh = (s.boxes[:, 2:] - s.boxes[:, :2]) * scale
        out += np.sqrt(np.clip(wh[:, 0] * wh[:, 1], 0, None)).tolist()
    return out


def run_info(cfg: GraftConfig, splits: DetectionSplits, model: GraftDetector, phases: list[Phase], weights_source: str) -> dict[str, Any]:
    """``model.json`` of a detector: everything needed to rebuild and use it."""
    mean, std = model.detector.transform.image_mean, model.detector.transform.image_std
    return {
        "format": "graft-run/1",
        "task": "detect",
        "graft_version": __version__,
        "backbone": {"name": cfg.model.name, "weights": weights_source},
        "classes": list(splits.classes),
        "num_classes": len(splits.classes),
        "detector": {
            "head": model.head_kind, "levels": cfg.detect.levels, "strides": model.strides, "level_sizes": model.level_sizes, "head_convs": cfg.detect.head_convs,
            "score_thresh": cfg.detect.score_thresh, "nms_iou": cfg.detect.nms_iou, "max_detections": cfg.detect.max_detections, "label_offset": model.label_offset, "frozen_bn": getattr(model, "frozen_bn", None),
            "class_blocks": class_blocks(model), "block_kinds": block_kinds(model),
        },
        "preprocessing": {"input_size": model.size, "resize": "longer side to input_size, bilinear, antialiased", "pad": "bottom and right to input_size x input_size, value 114", "mean": list(mean), "std": list(std), "range": "0..1 before normalising"},
        "output": {"boxes": "xyxy pixels of the original image", "labels": "indices into classes", "scores": "0..1"},
        "trained": {"strategy": cfg.train.strategy, "phases": [{"name": p.name, "epochs": p.epochs, "trainable_from_layer": p.trainable_from, "lr": p.lr} for p in phases]},
        "data": {"format": splits.format, "description": splits.description},
        "config": cfg.to_dict(),
    }


def train_detection(cfg: GraftConfig, run_dir: Path, payload: dict[str, Any] | None, *, replace: bool, device: torch.device, source_run: Path | None, data_dir: str | Path | None, started: float, quiet: bool, hooks: list[Any]):
    from graft.engine.phases import plan_phases
    from graft.engine.run_folder import check_batch_size, opened_run, write_weights_report

    say = progress(quiet)
    if payload is None:
        changed = apply_detection_defaults(cfg)
        if changed:
            say(f"detection defaults: {', '.join(changed)} (set them to choose otherwise)")
        splits = scan(cfg)
    else:
        splits = DetectionSplits.from_json(payload["splits"], root=Path(data_dir) if data_dir else None)
        missing = [s.path for s in splits.train + splits.val + splits.test if not Path(s.path).is_file()]
        if missing:
            raise SnapshotError(f"{plural(len(missing), 'image')} of the snapshot's data split {'is' if len(missing) == 1 else 'are'} gone (e.g. {missing[0]}); if the data moved, pass its new location with --data")
    say(describe(splits))
    size = input_size(cfg)
    saved = payload["detector"] if payload is not None else {}
    model, report = build_detection_model(cfg, len(splits.classes), load_weights=payload is None, box_sizes=box_sizes(splits, size), seed=cfg.solver.seed, level_sizes=saved.get("level_sizes"), frozen_bn=saved.get("frozen_bn"))
    if payload is not None:
        model.load_state_dict(payload["model"])
    _, aug = augmentation(cfg)  # checks the preset; auto stays auto until the run decides it on the validation split
    phases = plan_phases(cfg, model)
    surgery.check_rule_patterns(model, cfg.model.freeze, cfg.model.lr_mult)
    check_batch_size(cfg, model, phases)
    if cfg.train.early_stopping_monitor in ("val_loss", "val_accuracy"):
        cfg.train.early_stopping_monitor = "val_map"  # a detector's validation score
    # Everything is validated: only now are the data's problems told (the run will list them).
    tell_data(warnings=splits.warnings, problems=splits.problems, skipped=splits.skipped, listed_in=str(run_dir / "metrics.json"))
    if not splits.val:
        warn("warning: no validation images: no validation mAP")
    with opened_run(run_dir, replace, cfg.train.cache_dir):
        write_weights_report(run_dir, payload, report, source_run, say)
        result = train_and_report(cfg, run_dir, payload, splits, model, aug, phases, device, started, say, quiet, hooks)
        if distributed.is_main():
            write_report_after_run(run_dir, REPORT)
        return result


def decide_auto(cfg: GraftConfig, model: GraftDetector, splits: DetectionSplits, phases: list[Phase], task: DetectionTask, *, device: torch.device, amp: bool, say: Any) -> tuple[Decision, Any, Any, dict[str, Any] | None]:
    """``data.augment: auto`` decided on the validation split (``graft.tasks.detect.autotune``), for a
    run or for ``graft plan --decide``: (decision, the winner's training features, the validation
    features, the winner's trial as a snapshot payload for the run to continue), the caches and
    the payload None where nothing could be searched (the fallback is then used)."""
    val_ds = BoxDataset(splits.val, model.size, max_pixels=cfg.data.max_pixels)
    cacheable = features_cacheable(cfg)
    frozen = next((p for p in phases if p.backbone_frozen), None)
    if frozen is None or not cacheable or not len(val_ds):
        why = "no validation images" if not len(val_ds) else "no frozen-backbone phase with cached features"
        decision = Decision(augment=FALLBACK, note=f"{why} to decide on: augmentation {FALLBACK}")
        say(f"auto: {decision.note}")
        return decision, None, None, None
    common = cache_options(cfg, device, amp, say)

    def candidate_cache(name: str) -> Any:
        t0 = time.perf_counter()
        dataset = BoxDataset(splits.train, model.size, with_overrides(cfg, BoxAugment.preset(name)), seed=cfg.solver.seed, max_pixels=cfg.data.max_pixels)
        cache = build_feature_cache(model, dataset, views=cfg.train.cache_views, **common)
        say(f"feature cache: {len(splits.train)} training images x {plural(cache.views, 'view')} through the frozen backbone once ({time.perf_counter() - t0:.1f}s)")
        return cache

    val_cache = None
    try:
        val_cache = build_feature_cache(model, val_ds, views=1, **common)
        decision, train_cache, start = decide_augment(cfg, model, frozen, task, train_cache=candidate_cache, val_cache=val_cache, device=device, say=say)
        if frozen is not phases[0]:  # the winner's epochs are the run's first only when the run starts frozen
            start = None
    except BaseException:  # Ctrl-C or a failed trial: no cache file is left behind
        if val_cache is not None:
            val_cache.close()
        raise
    return decision, train_cache, val_cache, start


def train_and_report(cfg: GraftConfig, run_dir: Path, payload: dict[str, Any] | None, splits: DetectionSplits, model: GraftDetector, aug: BoxAugment, phases: list[Phase], device: torch.device, started: float, say: Any, quiet: bool, hooks: list[Any], *, extra: dict[str, Any] | None = None, task: DetectionTask | None = None):
    """Train ``model`` on ``splits`` and write the run. ``extra`` goes into every snapshot and into
    ``model.json`` (an expansion's record of where it came from); ``task`` replaces the plain
    detection loss (an expansion's distillation)."""
    from graft.engine.device import seed_everything
    from graft.engine.run_folder import TrainResult

    with_global_normalisers(model).to(device)
    amp = cfg.train.amp if isinstance(cfg.train.amp, bool) else device.type == "cuda"
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()
    size = model.size
    val_ds = BoxDataset(splits.val, size, max_pixels=cfg.data.max_pixels)
    caches: dict[str, Any] = {}
    cacheable = features_cacheable(cfg)
    common = cache_options(cfg, device, amp, say)

    def train_dataset(augment: Any) -> BoxDataset:
        return BoxDataset(splits.train, size, augment, seed=cfg.solver.seed, max_pixels=cfg.data.max_pixels)

    def build_caches(augment: Any) -> None:
        """A frozen backbone is a fixed function: its features are computed once per (image, view)."""
        t0 = time.perf_counter()
        caches["train"] = build_feature_cache(model, train_dataset(augment), views=cfg.train.cache_views, **common)
        if "val" not in caches:
            caches["val"] = build_feature_cache(model, val_ds, views=1, **common) if len(val_ds) else None
        say(f"feature cache: {len(splits.train)} training images x {plural(caches['train'].views, 'view')} and {len(val_ds)} validation images through the frozen backbone once ({time.perf_counter() - t0:.1f}s)")

    task = task or DetectionTask(splits.val, splits.classes, cfg.detect.conf)
    decision = start = None
    if cfg.data.augment == "auto" and distributed.active():
        decision, start = distributed.on_main(lambda: _decided_alone(cfg, model, splits, phases, task, device=device, amp=amp, say=say))
        cfg.data.augment = decision.augment
        aug = with_overrides(cfg, BoxAugment.preset(decision.augment))
    elif cfg.data.augment == "auto":
        decision, train_cache, val_cache, start = decide_auto(cfg, model, splits, phases, task, device=device, amp=amp, say=say)
        if train_cache is not None:
            caches.update(train=train_cache, val=val_cache)
        cfg.data.augment = decision.augment  # the saved config says what ran; a resumed run does not decide again
        aug = with_overrides(cfg, BoxAugment.preset(decision.augment))
    train_ds = train_dataset(aug)

    def data_for_phase(phase: Phase) -> PhaseData | None:
        if not (phase.backbone_frozen and cacheable):
            return None
        if "train" not in caches:
            build_caches(aug)
        return PhaseData(caches["train"], caches["val"], forward=model, workers=0)

    static = {"config": cfg.to_dict(), "classes": splits.classes, "splits": splits.to_json(), "task": "detect", "detector": {"level_sizes": model.level_sizes, "frozen_bn": getattr(model, "frozen_bn", None), "class_blocks": class_blocks(model), "block_kinds": block_kinds(model)}, "weights_source": payload.get("weights_source") if payload else cfg.model.weights, **(extra or {})}
    record_start(run_dir, cfg, static, payload, decision)
    stopping = EarlyStoppingHook(cfg.train.early_stopping, cfg.train.early_stopping_monitor) if cfg.train.early_stopping else None
    trainer = Trainer(
        model, phases, solver=cfg.solver, train_data=train_ds, val_data=val_ds, device=device, amp=amp, workers=workers,
        freeze_patterns=cfg.model.freeze, lr_rules=cfg.model.lr_mult, task=task,
        hooks=run_hooks(run_dir, cfg, static, quiet=quiet, stopping=stopping, extra=hooks),
        data_for_phase=data_for_phase,
        channels_last=cfg.train.channels_last if isinstance(cfg.train.channels_last, bool) else device.type == "cuda",
        sync_bn=cfg.train.sync_bn,
    )
    if payload is None:
        seed_everything(cfg.solver.seed)
    if start is not None:  # auto's winning trial is the run's first epochs: snapshotted as if the run had trained them
        model.load_state_dict(start["model"])
        for hook in trainer.hooks:
            if isinstance(hook, SnapshotHook):
                hook.save(start)
    try:
        state = trainer.fit(resume=payload if payload is not None else start)
    finally:
        _close(caches)
    metrics = distributed.on_main(lambda: _write_run(cfg, run_dir, splits, model, phases, static, extra, stopping, trainer, started, state, device, amp, workers, say))
    return TrainResult(run_dir, metrics, state.history)


def _decided_alone(cfg: GraftConfig, model: GraftDetector, splits: DetectionSplits, phases: list[Phase], task: DetectionTask, **common: Any) -> tuple[Decision, dict[str, Any] | None]:
    """``auto`` decided by one rank for all: the decision and the winner's trial; its feature
    caches are that rank's own (the run builds its shared ones)."""
    decision, train_cache, val_cache, start = decide_auto(cfg, model, splits, phases, task, **common)
    _close({"train": train_cache, "val": val_cache})
    return decision, start


def _write_run(cfg: GraftConfig, run_dir: Path, splits: DetectionSplits, model: GraftDetector, phases: list[Phase], static: dict[str, Any], extra: dict[str, Any] | None, stopping: Any,
               trainer: Trainer, started: float, state: Any, device: torch.device, amp: bool, workers: int, say: Any) -> dict[str, Any]:
    """The model, metrics and plots, written once (rank 0)."""
    info = {**run_info(cfg, splits, model, phases, static["weights_source"]), **(extra or {})}
    if stopping is not None:
        info["early_stopping"] = stopping.summary()
    if "decided" in static:
        info["decided"] = static["decided"]
    seconds = trainer.elapsed() + (time.perf_counter() - started - trainer.session_seconds)
    metrics = write_detection_results(run_dir, model, info, splits, state.history, device=device, amp=amp, workers=workers, train_seconds=seconds, batch_size=cfg.solver.batch_size, conf=cfg.detect.conf)
    test = f", test mAP {metrics['test_map']:.3f} (mAP@.5 {metrics['test_map50']:.3f})" if metrics["test_map"] is not None else ""
    val = "n/a" if metrics["val_map"] is None else f"{metrics['val_map']:.3f} (mAP@.5 {metrics['val_map50']:.3f})"
    say(f"done: val mAP {val}{test}; results in {run_dir}")
    return metrics


def _close(caches: dict[str, Any]) -> None:
    for c in caches.values():
        if c is not None:
            c.close()


def evaluate_detector(model: GraftDetector, samples: list, classes: list[str], *, device: torch.device, amp: bool, workers: int, batch_size: int, conf: float):
    ds = BoxDataset(samples, model.size)
    preds = collect_detections(model, eval_loader(ds, batch_size=batch_size, workers=min(workers, 2), collate_fn=DetectionTask.collate), device, samples, amp=amp)
    return preds, detection_metrics(samples, preds, classes, conf=conf)


def write_detection_results(run_dir: Path, model: GraftDetector, info: dict[str, Any], splits: DetectionSplits, history: list[dict[str, Any]], *, device: torch.device, amp: bool, workers: int, train_seconds: float, batch_size: int, conf: float) -> dict[str, Any]:
    classes = splits.classes
    common = {"device": device, "amp": amp, "workers": workers, "batch_size": batch_size, "conf": conf}
    val_preds, val = evaluate_detector(model, splits.val, classes, **common) if splits.val else (None, None)
    test_preds, test = evaluate_detector(model, splits.test, classes, **common) if splits.test else (None, None)
    final, which = (test, "test") if test is not None else (val, "val")

    def figure(result: Any, key: str) -> float | None:
        return None if result is None else result.metrics[key]

    metrics = {
        "task": "detect",
        "val_map": figure(val, "map"), "val_map50": figure(val, "map50"), "val_map75": figure(val, "map75"), "val_ar100": figure(val, "ar100"),
        "test_map": figure(test, "map"), "test_map50": figure(test, "map50"), "test_map75": figure(test, "map75"), "test_ar100": figure(test, "ar100"),
        "classes": classes,
        "per_class": final.metrics["per_class"] if final is not None else {},
        "per_class_split": which if final is not None else None,
        "conf": conf,
        "val": val.metrics if val is not None else None,
        "test": test.metrics if test is not None else None,
        "counts": splits.counts(),
        "epochs": len(history),
        "train_seconds": round(train_seconds, 2),
        "data_format": splits.format,
        "skipped_files": [{"path": str(s.path), "reason": s.reason} for s in splits.skipped],
        "annotation_problems": list(splits.problems),
        "warnings": list(splits.warnings),
        **{k: info[k] for k in ("early_stopping", "decided") if k in info},
    }
    info = {**info, "metrics": {k: metrics[k] for k in ("val_map", "val_map50", "test_map", "test_map50", "epochs", "train_seconds")}}
    save_model(run_dir, model, info)
    write_json(run_dir / "metrics.json", metrics)
    write_history_csv(history, run_dir / "history.csv")
    name = f"{info['detector']['head']} on {info['backbone']['name']}, {len(classes)} class{'' if len(classes) == 1 else 'es'}"
    if history:
        terms = sorted({k for row in history for k in row if k.startswith("train_loss_")})
        panels = [
            ("accuracy", "Validation mAP", [("val_map", "mAP@[.5:.95]"), ("val_map50", "mAP@.5")]),
            ("loss", "Training loss", [("train_loss", "train"), *[(k, k.removeprefix("train_loss_")) for k in terms]]),
        ]
        plot_learning_curves(history, run_dir / "learning_curves.png", title=name, panels=panels)
    if final is not None:
        samples, preds = (splits.test, test_preds) if test is not None else (splits.val, val_preds)
        label = "test" if test is not None else "validation"
        plot_detections(samples, preds, classes, run_dir / "detections.png", conf=None, title=f"{name}: {label} images, most mistakes first")
        plot_per_class_ap(final.metrics["per_class"], run_dir / "per_class_ap.png", title=f"Per-class AP ({label})")
        plot_pr_curves(final.pr_curves, final.recall_points, run_dir / "pr_curves.png", title=f"Precision-recall at IoU 0.5 ({label})")
    return metrics

