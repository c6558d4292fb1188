"""``graft expand``: a finished run plus a folder of new classes -> an expanded run.

The expanded run is a run like any other (model, snapshots, history, metrics, plots, class
statistics), resumable from its snapshots, plus ``expand_metrics.json``: how the old classes fared
(the original model's accuracy on them against the expanded model's) and how the new ones learned.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from graft.configuration import GraftConfig, dump_yaml
from graft.console import plural, progress, tell_data, warn
from graft.data.dataset import ImageDataset, default_workers
from graft.data.samples import DatasetSplits, Sample
from graft.data.transforms import (
    augmentation_from_config,
    eval_transform,
    train_transform,
)
from graft.tasks.classify.evaluate import Outputs, collect_outputs
from graft.report.html import write_report_after_run
from graft.tasks.classify.report import REPORT
from graft.tasks.classify.expansion.calibrate import Calibration, fit_calibration, norm_ratio
from graft.tasks.classify.expansion.negatives import ExpandEmbeddings, balanced_weights, weighted_cross_entropy
from graft.tasks.classify.expansion.data import evaluation_split, gather_data
from graft.tasks.interface import ExpansionJob
from graft.io import write_json, write_text
from graft.models import surgery
from graft.models.classifier import GraftClassifier
from graft.tasks.classify.caches import training_views
from graft.tasks.classify.class_stats import FILE_NAME as STATS_FILE
from graft.tasks.classify.class_stats import ClassStats
from graft.cache import cache_root as default_cache_root
from graft.tasks.classify.embeddings import EmbeddingCache, EmbeddingDataset, backbone_fingerprint
from graft.engine.hooks import run_hooks
from graft.engine.loop import Phase, PhaseData, Trainer
from graft.tasks.classify.task import ClassificationTask
from graft.tasks.classify.results import write_results
from graft.engine import distributed
from graft.engine.device import seed_everything, select_device
from graft.engine.run_folder import ExpandResult, inherit_weights_report, keeping_replaced_run, stash_run
from graft.engine.run_folder import tidy as tidy_run_folder
from graft.tasks.classify.run_info import check_classifier_monitor, check_files_exist, run_info, use_channels_last

CALIBRATION_DRAWS = 256  # old-class samples drawn per class from the statistics for calibration


def expand_classifier(job: ExpansionJob, *, data_dir: str | Path | None, quiet: bool, hooks: list[Any]) -> ExpandResult:
    """Expand the classifier ``job.source`` with the new class folders in ``job.cfg.data.dir`` (or
    continue the snapshot ``job.payload``, its data now under ``data_dir`` if given)."""
    say = progress(quiet)
    splits = spec = None
    if job.payload is not None:
        splits = DatasetSplits.from_json(job.payload["splits"], root=Path(data_dir) if data_dir else None)
        check_files_exist(splits)
        spec = job.payload["expand"]
    with keeping_replaced_run(job.run_dir):
        return _expand(job, splits, spec, say, quiet, hooks)


def _expand(job: ExpansionJob, splits: DatasetSplits | None, spec: dict[str, Any] | None, say: Any, quiet: bool, hooks: list[Any]) -> ExpandResult:
    cfg, source, run_dir, payload = job.cfg, job.source, job.run_dir, job.payload
    device = select_device(cfg.train.device)
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()
    pre, aug = source.preprocessing, augmentation_from_config(cfg.data)
    check_classifier_monitor(cfg)
    teacher = source.model.to(device, memory_format=torch.channels_last if use_channels_last(cfg, device) else torch.contiguous_format).eval()
    cache_root = default_cache_root(cfg.train.cache_dir) if cfg.train.embedding_cache else None

    def embedding_cache(backbone: torch.nn.Module) -> EmbeddingCache:
        spec = {"preprocessing": pre.to_dict(), "backbone": cfg.model.name}  # as graft train's: the two share embeddings
        return EmbeddingCache(backbone, root=cache_root, spec=spec, device=device, batch_size=max(32, cfg.solver.batch_size), workers=workers, max_pixels=cfg.data.max_pixels)

    source_cache = embedding_cache(teacher.backbone)
    if payload is None:
        splits, spec = distributed.on_main(lambda: gather_data(cfg, source, source_cache, say))
    old, new = spec["old_classes"], spec["new_classes"]
    k = len(old)

    model = copy.deepcopy(source.model)
    added = surgery.widen_head(model, len(new), seed=cfg.solver.seed)
    # Fine-tuning on a few new classes must not re-estimate the normalisation the old classes rely on.
    model.bn_inference = True
    if payload is not None:
        model.load_state_dict(payload["model"])
    phases = plan_phases(cfg, model)
    if job.replace and distributed.is_main():
        stash_run(run_dir)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        tidy_run_folder(run_dir, cfg.train.cache_dir)
        inherit_weights_report(source.dir, str(source.dir), run_dir)
    tell_data(warnings=splits.warnings, skipped=splits.skipped, listed_in=str(run_dir / "metrics.json"))
    say(f"expanding {source.dir} ({k} classes) with {len(new)} new: {', '.join(new)}; mode {cfg.expand.mode}; "
        f"{len(splits.train)} training images ({sum(s.label < k for s in splits.train)} of old classes), {len(splits.val)} held out; device {device}")

    amp = cfg.train.amp if isinstance(cfg.train.amp, bool) else device.type == "cuda"
    stats = source.stats.select([c for c in old if c in source.stats.classes]) if source.stats is not None else None
    static = {"config": cfg.to_dict(), "classes": splits.classes, "splits": splits.to_json(), "preprocessing": pre.to_dict(), "weights_source": str(source.dir), "expand": spec}
    if distributed.is_main():
        write_text(run_dir / "config.yaml", dump_yaml(cfg))
        write_json(run_dir / "splits.json", static["splits"])
    trainer = Trainer(
        model,
        phases,
        solver=cfg.solver,
        train_data=ImageDataset(splits.train, train_transform(pre, aug), seed=cfg.solver.seed, max_pixels=cfg.data.max_pixels),
        val_data=ImageDataset(splits.val, eval_transform(pre), max_pixels=cfg.data.max_pixels),
        device=device,
        amp=amp,
        workers=workers,
        freeze_patterns=cfg.model.freeze,
        lr_rules=cfg.model.lr_mult,
        task=ClassificationTask(),
        hooks=run_hooks(run_dir, cfg, static, quiet=quiet, extra=hooks),
        data_for_phase=PhaseSources(cfg, model, teacher, splits, pre, source_cache, stats, say).phase_data,
        channels_last=use_channels_last(cfg, device),
        sync_bn=cfg.train.sync_bn,
    )
    if payload is None:
        seed_everything(cfg.solver.seed)
    state = trainer.fit(resume=payload)
    # Calibrated, evaluated and written once (rank 0); every rank returns the figures.
    metrics, result = distributed.on_main(lambda: _finish(job, cfg, source, run_dir, splits, spec, model, teacher, source_cache, embedding_cache, stats, phases, added, trainer, state, device, amp, workers, pre, say))
    return ExpandResult(run_dir, metrics, state.history, result)


def _finish(job: ExpansionJob, cfg: GraftConfig, source: Any, run_dir: Path, splits: DatasetSplits, spec: dict[str, Any], model: GraftClassifier, teacher: GraftClassifier, source_cache: EmbeddingCache,
            embedding_cache: Any, stats: ClassStats | None, phases: list[Phase], added: dict[str, int], trainer: Trainer, state: Any, device: torch.device, amp: bool, workers: int, pre: Any, say: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate the new rows, then write the model, metrics, expansion figures and report."""
    started, old, new = job.started, spec["old_classes"], spec["new_classes"]
    k = len(old)
    # ------------------------------------------------------------------ calibrate, then report
    # In frozen mode the backbone is the original's: its embeddings are the ones already computed.
    final_cache = source_cache if cfg.expand.mode == "frozen" else embedding_cache(model.backbone)
    original_heldout = set(spec["original_heldout"])
    calibration_samples = [s for s in splits.val if str(s.path) not in original_heldout]
    # Held-out old-class images neither the old nor the new rows trained on: in frozen mode the
    # embeddings stored with the statistics, after fine-tuning the original validation images.
    original_val = [s for s in splits.val if str(s.path) in original_heldout]
    if cfg.expand.mode == "fine-tune":
        calibration_samples += original_val
    calibrated_on_original_val = bool(original_val) and (cfg.expand.mode == "fine-tune" or (stats is not None and bool(stats.anchor_heldout.any())))
    cal = calibrate(cfg, model, final_cache, calibration_samples, stats if cfg.expand.mode == "frozen" else None, splits.classes, k, pre)
    cal.apply(model.head.fc.blocks[-1])
    say(f"calibration ({cal.method}): new logits x{cal.scale:.3g} {cal.shift:+.3g}; of the {cal.old_samples} old-class held-out samples it was fitted on (not the images expand_metrics.json reports), the new rows take "
        + ("n/a" if cal.old_taken is None else f"{100 * cal.old_taken:.2f}% (on new images up to {100 * cal.old_taken_bound:.1f}%, 95% bound)") + "".join(f"; {n}" for n in cal.notes))
    if few_calibration_samples(cal, cfg.expand.max_old_loss):
        warn(f"warning: {cal.old_samples} old-class held-out samples are too few to hold the new rows to {100 * cfg.expand.max_old_loss:g}% of old-class images: "
            f"on new images they may take up to {100 * cal.old_taken_bound:.1f}%. Add held-out images of the old classes to {cfg.data.dir}/<old class>/ "
            f"(a share of them calibrates), or lower expand.max_old_loss to trade new-class accuracy for old")

    def outputs_of(net: GraftClassifier, cache: EmbeddingCache, samples: list[Sample]) -> Outputs:
        emb = cache.embed(samples, eval_transform(pre))
        return collect_outputs(net.head, [(emb, torch.tensor([s.label for s in samples]))] if samples else [], device)

    memo: dict[int, Outputs] = {}

    def expanded_outputs(net: GraftClassifier, samples: list[Sample]) -> Outputs:
        if id(samples) not in memo:
            memo[id(samples)] = outputs_of(net, final_cache, samples)
        return memo[id(samples)]

    info = run_info(cfg, splits.classes, pre, model, phases, str(source.dir))
    lineage = list(source.info.get("expanded_from", []))
    info["expanded_from"] = lineage + [{"run": str(source.dir), "model_sha256": source.digest, "classes_before": k, "new_classes": new, "mode": cfg.expand.mode, "calibration": cal.to_dict()}]
    if cfg.train.class_stats:
        refit = list(splits.train)
        if cfg.expand.mode == "fine-tune" and source.splits is not None:  # the adapted backbone needs the old classes' statistics anew
            have = {s.label for s in refit}
            refit += [s for s in source.splits.train if s.label not in have and s.path.is_file()]
        missing = [c for i, c in enumerate(old) if i not in {s.label for s in refit}] if cfg.expand.mode == "fine-tune" else []
        if missing:
            warn(f"warning: no images of old class(es) {', '.join(missing)} to describe them in the fine-tuned embedding space: expanding this run again will need images of them")
        new_stats = class_statistics(cfg, model, splits, refit, calibration_samples, final_cache, stats, k, pre)
        if new_stats is not None:
            new_stats.save(run_dir / STATS_FILE)
            info["class_stats"] = {"file": STATS_FILE, "classes": new_stats.classes, "backbone": new_stats.backbone}
    seconds = trainer.elapsed() + (time.perf_counter() - started - trainer.session_seconds)
    blocks = [("old", 0, k), ("new", k, k + len(new))]
    metrics = write_results(run_dir, model, info, splits, state.history, device=device, amp=amp, workers=workers, train_seconds=seconds, outputs_for=expanded_outputs, batch_size=cfg.solver.batch_size, blocks=blocks)

    split_name, samples = evaluation_split(splits, k)
    result = expansion_metrics(old, new, samples, outputs_of(teacher, source_cache, [s for s in samples if s.label < k]), expanded_outputs(model, samples), split_name)
    if calibrated_on_original_val and split_name.startswith("old: val"):
        result["note"] = ("the old classes are measured on the original run's validation images, which also calibrated the new rows "
                          "(two numbers fitted): give the original run a test split for an unbiased measure")
    result.update(
        mode=cfg.expand.mode,
        source=str(source.dir),
        parameters=parameter_changes(source.model, model, added),
        calibration=cal.to_dict(),
        negatives=spec["negatives"],
        rehearsal=spec["rehearsal"],
        seconds=round(time.perf_counter() - started, 2),
    )
    write_json(run_dir / "expand_metrics.json", result)
    write_report_after_run(run_dir, REPORT)
    say(f"done: old classes {_pct(result['old_accuracy_before'])} -> {_pct(result['old_accuracy_after'])}, new classes {_pct(result['new_accuracy'])}, "
        f"overall {_pct(result['overall_accuracy'])} ({split_name} images); results in {run_dir}")
    return metrics, result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------- data


def plan_phases(cfg: GraftConfig, model: GraftClassifier) -> list[Phase]:
    """frozen: the new rows learn on cached embeddings, backbone and old rows frozen. fine-tune:
    that, then the backbone's top and the whole head at the lower rate, with distillation."""
    old_blocks = tuple(f"head.fc.blocks.{i}" for i in range(len(model.head.fc.blocks) - 1))
    base = cfg.solver.base_lr
    phases = [Phase("feature-extract", cfg.train.epochs, None, base, freeze=old_blocks)]
    if cfg.expand.mode == "fine-tune":
        at = surgery.resolve_fine_tune_at(model, cfg.train.fine_tune_at)
        phases.append(Phase("fine-tune", cfg.train.fine_tune_epochs, at, base * cfg.train.fine_tune_lr_mult))
    return phases


class PhaseSources:
    """Each expansion phase's data and loss."""

    def __init__(self, cfg: GraftConfig, model: GraftClassifier, teacher: GraftClassifier, splits: DatasetSplits, pre: Any, cache: EmbeddingCache, stats: ClassStats | None, say: Any) -> None:
        self.cfg, self.model, self.teacher, self.splits, self.pre, self.cache, self.stats, self.say = cfg, model, teacher, splits, pre, cache, stats, say
        self.k = teacher.num_classes
        self.num_classes = len(splits.classes)

    def phase_data(self, phase: Phase) -> PhaseData:
        return self._frozen(phase) if phase.backbone_frozen else self._fine_tune()

    def _frozen(self, phase: Phase) -> PhaseData:
        cfg, splits = self.cfg, self.splits
        pre, aug = self.pre, augmentation_from_config(cfg.data)
        started, before = time.perf_counter(), self.cache.computed
        real, val = distributed.on_main(lambda: (training_views(self.cache, splits.train, pre, aug, cfg, phase.epochs), self.cache.embed(splits.val, eval_transform(pre))))
        labels = [s.label for s in splits.train]
        new_counts = torch.bincount(torch.tensor(labels), minlength=self.num_classes)[self.k :]
        anchors = 0
        stat_labels = [splits.classes.index(c) for c in self.stats.classes] if self.stats is not None else []
        if self.stats is not None:  # the old classes' stored training embeddings, as one more view-less image each
            keep = ~self.stats.anchor_heldout
            rows = self.stats.anchors[keep].unsqueeze(1).expand(-1, real.shape[1], -1)
            real = torch.cat([real, rows])
            labels += torch.tensor(stat_labels, dtype=torch.long)[self.stats.anchor_labels[keep]].tolist()
            anchors = len(rows)
        per_class = cfg.expand.negatives_per_class if cfg.expand.negatives_per_class is not None else max(64, int(new_counts.max()))
        train = ExpandEmbeddings(real, labels, stats=self.stats, stat_labels=stat_labels, per_class=per_class, seed=cfg.solver.seed)
        weights = balanced_weights(train.label_counts(self.num_classes))
        self.say(f"new rows: {plural(len(real) - anchors, 'image')} ({plural(self.cache.computed - before, 'image view')} through the backbone, {time.perf_counter() - started:.1f}s), "
                 f"{anchors} stored old-class embeddings, {per_class * len(stat_labels)} old-class samples drawn from class statistics per epoch")

        def loss(logits: torch.Tensor, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
            return weighted_cross_entropy(logits, y, weights)

        return PhaseData(train, EmbeddingDataset(val, [s.label for s in splits.val]), forward=self.model.head, workers=0, loss=loss)

    def _fine_tune(self) -> PhaseData:
        cfg, splits, k = self.cfg, self.splits, self.k
        pre, aug = self.pre, augmentation_from_config(cfg.data)
        train = ImageDataset(splits.train, train_transform(pre, aug), seed=cfg.solver.seed, max_pixels=cfg.data.max_pixels)
        val = ImageDataset(splits.val, eval_transform(pre), max_pixels=cfg.data.max_pixels)
        weights = balanced_weights(torch.bincount(torch.tensor([s.label for s in splits.train]), minlength=self.num_classes).float())
        t, lam, teacher = cfg.expand.distill_temperature, cfg.expand.distill_weight, self.teacher

        def loss(logits: torch.Tensor, y: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            ce = weighted_cross_entropy(logits, y, weights)
            if lam == 0:
                return ce
            with torch.no_grad():
                target = teacher(images).float()[:, :k]
            kd = F.kl_div(F.log_softmax(logits[:, :k] / t, 1), F.log_softmax(target / t, 1), reduction="batchmean", log_target=True)
            return ce + lam * t * t * kd

        return PhaseData(train, val, loss=loss)


# ---------------------------------------------------------------------------- after training


def few_calibration_samples(cal: Calibration, max_old_loss: float) -> bool:
    """Whether the guard's estimate is too loose to promise ``max_old_loss``: its 95% bound is more
    than twice that (and above 2%)."""
    return cal.old_taken_bound is not None and cal.old_taken_bound > max(2 * max_old_loss, 0.02)


def calibrate(cfg: GraftConfig, model: GraftClassifier, cache: EmbeddingCache, samples: list[Sample], stats: ClassStats | None, classes: list[str], k: int, pre: Any) -> Calibration:
    """Fit the new rows' calibration on held-out images of the new data and, in frozen mode, fresh
    draws from the old classes' statistics (the embedding space they describe is unchanged)."""
    emb = cache.embed(samples, eval_transform(pre))
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    if stats is not None and len(stats.classes):
        index = torch.tensor([classes.index(c) for c in stats.classes], dtype=torch.long)
        heldout = stats.anchor_heldout
        if heldout.any():  # real embeddings of images neither the old nor the new rows trained on
            extra, which = stats.anchors[heldout], stats.anchor_labels[heldout]
        else:
            g = torch.Generator().manual_seed(cfg.solver.seed + 0xCA1)
            which = torch.arange(len(stats.classes)).repeat_interleave(CALIBRATION_DRAWS)
            extra = stats.sample(which, g)
        emb = torch.cat([emb.reshape(-1, stats.dim), extra])
        labels = torch.cat([labels, index[which]])
    fc = model.head.fc  # no dropout here: the head's dropout sits before it
    with torch.no_grad():
        logits = fc(emb.to(fc.blocks[0].weight.device)).float().cpu() if len(emb) else torch.zeros(0, fc.out_features)
    old_weight = torch.cat([b.weight for b in fc.blocks[:-1]])
    scale = norm_ratio(old_weight, fc.blocks[-1].weight) if cfg.expand.calibrate != "none" else 1.0
    return fit_calibration(logits[:, :k], logits[:, k:], labels, method=cfg.expand.calibrate, norm_scale=scale, max_old_loss=cfg.expand.max_old_loss, guard_confidence=cfg.expand.guard_confidence)


def class_statistics(cfg: GraftConfig, model: GraftClassifier, splits: DatasetSplits, train: list[Sample], heldout: list[Sample], cache: EmbeddingCache, old_stats: ClassStats | None, k: int, pre: Any) -> ClassStats | None:
    """The expanded run's statistics, so it can be expanded again: in frozen mode the old classes'
    stored ones (the backbone did not change) plus the new classes' from their images; after
    fine-tuning, all from the training images of the adapted backbone."""
    fingerprint = backbone_fingerprint(model.backbone)
    frozen = cfg.expand.mode == "frozen"
    fit_on = [s for s in train if s.label >= k or not frozen or old_stats is None or splits.classes[s.label] not in old_stats.classes]
    names = sorted({s.label for s in fit_on})
    fitted = None
    if fit_on:
        emb = cache.embed(fit_on, eval_transform(pre))
        remap = {label: i for i, label in enumerate(names)}
        held = [s for s in heldout if s.label in remap]
        fitted = ClassStats.fit(
            emb, torch.tensor([remap[s.label] for s in fit_on]), [splits.classes[i] for i in names], fingerprint,
            heldout=cache.embed(held, eval_transform(pre)), heldout_labels=torch.tensor([remap[s.label] for s in held], dtype=torch.long),
        )
    if frozen and old_stats is not None:
        keep = old_stats.select([c for c in old_stats.classes if fitted is None or c not in fitted.classes])
        merged = keep.merge(fitted) if fitted is not None else keep
        order = [c for c in splits.classes if c in merged.classes]
        return merged.select(order)
    return fitted


def expansion_metrics(old: list[str], new: list[str], samples: list[Sample], before: Outputs, after: Outputs, split: str) -> dict[str, Any]:
    k = len(old)
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    preds = torch.as_tensor(after.preds) if len(samples) else torch.zeros(0, dtype=torch.long)
    is_old = labels < k
    old_before = torch.as_tensor(before.preds) if is_old.any() else torch.zeros(0, dtype=torch.long)

    def acc(mask: torch.Tensor) -> float | None:
        return float((preds[mask] == labels[mask]).double().mean()) if mask.any() else None

    before_acc = float((old_before == labels[is_old]).double().mean()) if is_old.any() else None
    after_acc = acc(is_old)
    return {
        "split": split,
        "old_classes": old,
        "new_classes": new,
        "old_images": int(is_old.sum()),
        "new_images": int((~is_old).sum()),
        "old_accuracy_before": before_acc,
        "old_accuracy_after": after_acc,
        "forgetting": None if before_acc is None or after_acc is None else before_acc - after_acc,
        "old_predictions_kept": float((preds[is_old] == old_before).double().mean()) if is_old.any() else None,
        "old_taken_by_new": float((preds[is_old] >= k).double().mean()) if is_old.any() else None,
        "new_accuracy": acc(~is_old),
        "new_taken_by_old": float((preds[~is_old] < k).double().mean()) if (~is_old).any() else None,
        "overall_accuracy": acc(torch.ones_like(is_old)),
    }


def parameter_changes(original: GraftClassifier, expanded: GraftClassifier, added: dict[str, int]) -> dict[str, int]:
    """Counted by comparing tensors: the old parameters whose value changed, and the new ones."""
    plain_head = not hasattr(original.head.fc, "blocks")  # the widening made the old layer block 0
    return surgery.parameter_changes(original, expanded, added["new_parameters"], old_name=lambda n: n.replace("head.fc.blocks.0.", "head.fc.") if plain_head else n)
