"""A classifier's run: class folders scanned, the model built, the frozen phase on cached
embeddings where it can be, then results, class statistics and plots in the run folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from graft.configuration import GraftConfig
from graft.console import progress, tell_data, warn
from graft.data.dataset import ImageDataset, default_workers
from graft.data.folder import scan_folder
from graft.data.samples import DatasetSplits
from graft.data.transforms import Preprocessing, augmentation_from_config, eval_transform, preprocessing_for, train_transform
from graft.report.html import write_report_after_run
from graft.tasks.classify.report import REPORT
from graft.models import surgery
from graft.models.backbones import build_model
from graft.models.classifier import GraftClassifier
from graft.tasks.classify import autotune
from graft.engine.hooks import EarlyStoppingHook, run_hooks
from graft.tasks.classify.caches import class_statistics, decoded_for_search, decoded_images, embedding_cache, embedding_data, phase_sources
from graft.tasks.classify.prefix import prefix_data
from graft.tasks.classify.class_stats import FILE_NAME as CLASS_STATS_FILE
from graft.engine.loop import Phase, Trainer
from graft.engine.phases import plan_phases
from graft.tasks.classify.run_info import check_classifier_monitor, check_files_exist, run_info, use_channels_last
from graft.engine.run_folder import opened_run, record_start, write_weights_report, TrainResult, check_batch_size
from graft.engine import distributed
from graft.engine.device import seed_everything
from graft.tasks.classify.task import ClassificationTask
from graft.tasks.classify.results import write_results
from graft.tasks.classify.autotune import fallback, summary, wants_decision
from graft.engine.phases import frozen_bn_fixed



def train_classifier(cfg: GraftConfig, run_dir: Path, payload: dict[str, Any] | None, *, replace: bool, device: torch.device, source_run: Path | None,
                     data_dir: str | Path | None, started: float, quiet: bool, hooks: list[Any]) -> TrainResult:
    """Train a classifier into ``run_dir`` (``TaskPackage.train``): scan the class folders (or take
    the snapshot's split), build the model, validate, then train and write the results."""
    if payload is not None:
        splits = DatasetSplits.from_json(payload["splits"], root=Path(data_dir) if data_dir else None)
        check_files_exist(splits)
    if payload is None:
        d = cfg.data
        splits = scan_folder(d.dir, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.solver.seed, strict=d.strict, max_pixels=d.max_pixels)
    say = progress(quiet)
    model, report = build_model(cfg.model, len(splits.classes), load_weights=payload is None, seed=cfg.solver.seed)
    if payload is not None:
        model.load_state_dict(payload["model"])
    pre = preprocessing_for(model.backbone, cfg.data)
    aug = augmentation_from_config(cfg.data)
    check_classifier_monitor(cfg)
    phases = plan_phases(cfg, model)
    surgery.check_rule_patterns(model, cfg.model.freeze, cfg.model.lr_mult)
    check_batch_size(cfg, model, phases)
    # Everything is validated: only now are the data's problems told (the run will list them) and
    # may an earlier run in the folder be set aside.
    tell_data(warnings=splits.warnings, skipped=splits.skipped, listed_in=str(run_dir / "metrics.json"))
    if not splits.val:
        warn("warning: no validation images (data.val_fraction is 0 or the classes are too small to split): no validation metrics" + ("; lr_policy plateau will never lower the rate" if cfg.solver.lr_policy == "plateau" else ""))
    with opened_run(run_dir, replace, cfg.train.cache_dir):
        return _train(cfg, run_dir, payload, splits, model, report, pre, aug, phases, device, source_run, started, say, quiet, hooks)


def _train(cfg: GraftConfig, run_dir: Path, payload: dict[str, Any] | None, splits: DatasetSplits, model: GraftClassifier, report: Any, pre: Preprocessing, aug: Any, phases: list[Phase], device: torch.device, source_run: Path | None, started: float, say: Any, quiet: bool, hooks: list[Any]) -> TrainResult:
    """The run itself, once everything is validated and ``run_dir`` is ready."""
    write_weights_report(run_dir, payload, report, source_run, say)
    channels_last = use_channels_last(cfg, device)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # before the embedding cache's pass
    amp = cfg.train.amp if isinstance(cfg.train.amp, bool) else device.type == "cuda"
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()
    cache = embedding_cache(cfg, model, pre, device, workers, stored=cfg.train.embedding_cache)
    decoded_train, decision = None, None
    if wants_decision(cfg):  # a resumed run's config was resolved when it started
        decoded_train = decoded_for_search(cfg, splits, pre)
        if frozen_bn_fixed(cfg):  # decided once (rank 0) and broadcast
            decision = distributed.on_main(lambda: autotune.decide(cfg, model, splits, pre, cache, device=device, has_head_phase=any(p.backbone_frozen for p in phases), decoded=decoded_train, say=say))
        else:
            decision = fallback(cfg, "model.frozen_bn_eval and model.bn_inference are off, so a frozen backbone is no fixed function to decide on: augmentation none, head lr = solver.base_lr")
            say(summary(decision)[0])
        cfg = decision.apply(cfg)
        aug = augmentation_from_config(cfg.data)
        phases = plan_phases(cfg, model)
    cached = embedding_data(cfg, model, splits, pre, aug, device, workers, say, cache=cache)
    decoded_train, decoded_val = decoded_images(cfg, phases, cached, aug, splits, pre, say, train=decoded_train)
    if cached is not None:
        cached.decoded = decoded_train
    prefix = prefix_data(cfg, model, splits, pre, aug, device, say, (decoded_train, decoded_val))
    train_ds = ImageDataset(splits.train, train_transform(pre, aug), seed=cfg.solver.seed, max_pixels=cfg.data.max_pixels, decoded=decoded_train)
    val_ds = ImageDataset(splits.val, eval_transform(pre), max_pixels=cfg.data.max_pixels, decoded=decoded_val)
    weights_source = report.source if payload is None else payload.get("weights_source", "snapshot")
    static = {"config": cfg.to_dict(), "classes": splits.classes, "splits": splits.to_json(), "preprocessing": pre.to_dict(), "weights_source": weights_source}
    record_start(run_dir, cfg, static, payload, decision)
    stopping = EarlyStoppingHook(cfg.train.early_stopping, cfg.train.early_stopping_monitor) if cfg.train.early_stopping else None
    say(f"data: {len(splits.classes)} classes, {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images; device {device}" + distributed.describe(cfg.solver.batch_size))
    trainer = Trainer(
        model,
        phases,
        solver=cfg.solver,
        train_data=train_ds,
        val_data=val_ds,
        device=device,
        amp=amp,
        workers=workers,
        freeze_patterns=cfg.model.freeze,
        lr_rules=cfg.model.lr_mult,
        task=ClassificationTask(cfg.train.label_smoothing),
        hooks=run_hooks(run_dir, cfg, static, quiet=quiet, stopping=stopping, extra=hooks),
        data_for_phase=phase_sources(cached, prefix),
        channels_last=channels_last,
        sync_bn=cfg.train.sync_bn,
    )
    if payload is None:
        seed_everything(cfg.solver.seed)  # a resumed run restores the RNG states of its snapshot instead
    state = trainer.fit(resume=payload)
    # The results: evaluated and written once, by rank 0; every rank returns them.
    metrics = distributed.on_main(lambda: _write_run(cfg, run_dir, splits, model, pre, phases, weights_source, static, stopping, trainer, started, cached, prefix, device, amp, workers, state, say))
    return TrainResult(run_dir, metrics, state.history)


def _write_run(cfg: GraftConfig, run_dir: Path, splits: DatasetSplits, model: GraftClassifier, pre: Preprocessing, phases: list[Phase], weights_source: str, static: dict[str, Any],
               stopping: Any, trainer: Trainer, started: float, cached: Any, prefix: Any, device: torch.device, amp: bool, workers: int, state: Any, say: Any) -> dict[str, Any]:
    """``model.safetensors``, ``model.json``, metrics, class statistics, plots and the report."""
    info = run_info(cfg, splits.classes, pre, model, phases, weights_source)
    if "decided" in static:
        info["decided"] = static["decided"]
    if stopping is not None:
        info["early_stopping"] = stopping.summary()
    # Training time across every session of the run, plus this session's set-up and results.
    seconds = trainer.elapsed() + (time.perf_counter() - started - trainer.session_seconds)
    # After a frozen-backbone last phase the backbone is unchanged: evaluate on cached embeddings.
    head_outputs = cached.outputs if cached and phases[-1].backbone_frozen else None
    if head_outputs is None and prefix is not None and prefix.cut > 0:
        head_outputs = prefix.outputs  # the frozen prefix is unchanged: reuse its activations
    if cfg.train.class_stats:
        stats = class_statistics(cfg, model, splits, pre, cached, phases[-1], device, workers, prefix=prefix)
        stats.save(run_dir / CLASS_STATS_FILE)
        info["class_stats"] = {"file": CLASS_STATS_FILE, "embeddings": int(stats.counts.sum()), "backbone": stats.backbone}
    metrics = write_results(run_dir, model, info, splits, state.history, device=device, amp=amp, workers=workers, train_seconds=seconds, outputs_for=head_outputs, batch_size=cfg.solver.batch_size)
    write_report_after_run(run_dir, REPORT)
    say(f"done: val accuracy {_pct(metrics['val_accuracy'])}" + (f", test accuracy {_pct(metrics['test_accuracy'])}" if metrics["test_accuracy"] is not None else "") + f"; results in {run_dir}")
    return metrics


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
