"""``graft expand`` for detectors: a finished detection run plus boxes of new classes -> one
detector of K+N classes that keeps the old ones.

The new classes enter as a class block (``graft.tasks.detect.widen``): by default a *branch*, a copy
of the detector's neck and heads with a fresh class layer over the shared backbone; or, for
sigmoid heads, a *widened* last classification layer. Old labels and names keep their indices.

Frozen mode (default): backbone, the old detector and its class rows keep their values; only the
new block learns, with the detector's own loss, on cached backbone features. No old images are
needed and the old classes' detections are the original's, bit for bit. There is no background
shift: the new block scores its own classes only, so an old object nobody labelled in a new image
can only teach it that this is not a new class, which is true. Boxes of old classes in the new
data (classes named like old ones) are negatives for the new block too.

Fine-tune mode: that, then a phase in which the backbone's top adapts as well, on images, while
the old detector's neck maps are distilled towards the original's (``graft.tasks.detect.distill``).
The old detections then change a little; ``expand_metrics.json`` says how much.

The expanded run is a detection run like any other (model, snapshots, history, metrics, plots)
plus ``expand_metrics.json``: the old classes' mAP before and after on the original run's held-out
images, the new classes' mAP on the new data's, and the parameters that changed, counted.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graft.configuration import GraftConfig, LayerRule, parse_config, resolve_config
from graft.console import plural, progress, tell_data
from graft.tasks.detect.autotune import FALLBACK
from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.data import DetectionSplits
from graft.tasks.detect.distill import DistillingDetectionTask
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.expand_metrics import expansion_metrics, parameter_changes
from graft.tasks.detect.pseudo_labels import add_pseudo_labelled
from graft.tasks.detect.widen import SIGMOID_HEADS, add_block, block_kinds, branch_class_layer
from graft.errors import ConfigError, DataError, SnapshotError
from graft.data.class_names import refuse_near_twins
from graft.report.html import write_report_after_run
from graft.tasks.detect.report import REPORT
from graft.io import read_json, write_json
from graft.models import surgery
from graft.io import file_digest
from graft.engine import distributed
from graft.engine.loop import Phase
from graft.tasks.interface import ExpansionJob

EXPAND_SNAPSHOT = 10  # numbered snapshots every 10 epochs: a detector is large, only its new block changes

# Keys that define the detector's architecture and input: an expansion keeps the source run's.
FIXED_KEYS = (("model", "name"), ("data", "img_size"), ("detect", "head"), ("detect", "levels"), ("detect", "level_sizes"), ("detect", "head_convs"))


@dataclass
class DetectionSource:
    """The detector being expanded: a finished detection run, or torchvision's COCO model."""

    name: str  # the run folder, or coco:MODEL
    dir: Path | None  # the run folder (None for torchvision's COCO model)
    info: dict[str, Any]  # its model.json (for a COCO model, the same facts)
    model: GraftDetector  # on the CPU, in eval mode
    digest: str  # sha256 of its weights file: a resumed expansion checks it is the same model
    splits: DetectionSplits | None  # its data split, for its held-out images (None without splits.json)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])


def load_detection_source(run_dir: Path, model: GraftDetector, info: dict[str, Any]) -> DetectionSource:
    splits = None
    if (run_dir / "splits.json").is_file():
        try:
            splits = DetectionSplits.from_json(read_json(run_dir / "splits.json"))
        except (DataError, ValueError, KeyError):
            splits = None
    return DetectionSource(str(run_dir), run_dir, info, model.eval(), file_digest(run_dir / "model.safetensors"), splits)


def coco_source(spec: str) -> DetectionSource:
    """``coco:MODEL``: torchvision's detector with its COCO weights and all its COCO classes, at
    graft's detection input size (``--img-size`` changes it). The weights come from torch's hub
    cache, downloaded there on a machine with internet."""
    from graft.tasks.detect.build import input_size
    from graft.tasks.detect.runner import apply_detection_defaults
    from graft.tasks.detect.torchvision_models import DETECTORS, build_torchvision_detector, coco_class_names, coco_weights_file

    name = spec.removeprefix("coco:")
    if name not in DETECTORS:
        raise ConfigError(f"{spec}: coco: takes one of torchvision's detectors ({', '.join(DETECTORS)})")
    cfg = parse_config({"task": "detect", "model": {"name": name, "weights": "coco"}})
    apply_detection_defaults(cfg)
    d = cfg.detect
    classes = coco_class_names(name)
    model, facts = build_torchvision_detector(name, len(classes), weights="coco", size=input_size(cfg), score_thresh=d.score_thresh, nms_thresh=d.nms_iou, detections=d.max_detections, bn_inference=cfg.model.bn_inference, keep_coco_classes=True)
    model.frozen_bn = facts["frozen_bn"]
    info = {
        "task": "detect", "classes": classes, "num_classes": len(classes), "config": cfg.to_dict(),
        "backbone": {"name": name, "weights": facts["source"]},
        "detector": {"head": model.head_kind, "level_sizes": model.level_sizes, "frozen_bn": model.frozen_bn, "class_blocks": [len(classes)]},
    }
    return DetectionSource(spec, None, info, model.eval(), file_digest(coco_weights_file(name)), None)


def with_input_size(source: DetectionSource, size: int) -> None:
    """A COCO model at another input size (a graft run keeps the size it was trained at)."""
    from graft.tasks.detect.model import InputBatch

    t = source.model.detector.transform
    source.model.detector.transform = InputBatch(size, t.image_mean, t.image_std)
    source.model.size = size
    source.info["config"]["data"]["img_size"] = size


def detection_expand_config(source: DetectionSource, data_dir: str | os.PathLike | None, *, config_file: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), flags: dict[str, Any] | None = None) -> GraftConfig:
    """The expansion's config: the source run's, then the user's file, ``--set`` overrides and
    flags. The architecture and input size cannot change."""
    base = copy.deepcopy(source.info["config"])
    base["data"]["dir"] = str(data_dir) if data_dir is not None else None
    if base["data"].get("augment") == "auto":  # a run stores what it decided; an older one may not have
        base["data"]["augment"] = FALLBACK
    base["model"].update(weights=str(source.dir) if source.dir is not None else "coco", reinit=[])
    base["train"]["strategy"] = "feature-extract"
    base["solver"]["snapshot"] = EXPAND_SNAPSHOT  # `last` is still written every epoch
    base["expand"] = {"source": source.name}
    base["task"] = "detect"
    cfg = resolve_config(config_file, overrides, {k: v for k, v in (flags or {}).items() if k != "task"}, base=base)
    for section, key in FIXED_KEYS:
        changed = getattr(getattr(cfg, section), key) != base[section].get(key)
        if changed and source.dir is None and (section, key) == ("data", "img_size"):
            with_input_size(source, cfg.data.img_size)
        elif changed:
            raise ConfigError(f"{section}.{key} cannot change when expanding: the old classes were trained with {source.name}'s ({base[section].get(key)!r}); train a new run for another")
    head = source.model.head_kind
    if head not in SIGMOID_HEADS and cfg.expand.detector_block == "widen":
        raise ConfigError(f"{source.name} is a {head} detector: widening its last layer would change every old class's score (softmax over all classes); "
                          "use expand.detector_block=branch (the default), which scores the new classes with a detector of their own")
    if cfg.expand.mode == "fine-tune" and cfg.train.fine_tune_epochs == 0:
        raise ConfigError("expand.mode fine-tune with train.fine_tune_epochs 0: the backbone would not adapt; give the fine-tuning phase epochs, or use the frozen mode")
    if cfg.expand.exemplars is not None:
        raise ConfigError("--exemplars is for classifier runs; for a detector, put boxes of old classes (named as in the run) in --data to use them as rehearsal")
    if cfg.model.reinit:
        raise ConfigError("model.reinit cannot be used with graft expand: re-initialising layers would forget the old classes")
    if cfg.expand.source != source.name:
        raise ConfigError(f"expand.source is set by graft expand to the detector being expanded ({source.name}); leave it out of the config")
    if not cfg.data.dir:
        raise ConfigError("no data: pass --data DIR with boxes of the new classes (COCO, YOLO or Pascal VOC)")
    if cfg.train.epochs == 0:
        raise ConfigError("train.epochs is 0: the new classes would not learn; give them at least one epoch")
    cfg.train.strategy = "feature-extract"
    return cfg


# ---------------------------------------------------------------------------- data


def gather_boxes(cfg: GraftConfig, source: DetectionSource) -> tuple[DetectionSplits, dict[str, Any]]:
    """The new data with labels in the expanded index (old classes first, as they were), and the
    record of what it holds."""
    from graft.tasks.detect.runner import scan

    scanned = scan(cfg)
    old = source.classes
    new = [c for c in scanned.classes if c not in old]
    refuse_near_twins(old, new, lambda name: f"class {name!r} of {cfg.data.dir}", str(cfg.data.dir), "names boxes")
    if not new:
        raise DataError(f"{cfg.data.dir} only has classes {source.name} already detects ({', '.join(scanned.classes)}): nothing to add. "
                        "Boxes of new classes need names the run does not have")
    classes = old + new
    index = np.asarray([classes.index(c) for c in scanned.classes], dtype=np.int64)

    def relabel(samples: list[BoxSample]) -> list[BoxSample]:
        return [dataclasses.replace(s, labels=index[s.labels] if len(s.labels) else s.labels) for s in samples]

    train, val, test = relabel(scanned.train), relabel(scanned.val), relabel(scanned.test)
    counts = np.bincount(np.concatenate([s.labels[~s.crowd] for s in train]) if train else np.zeros(0, np.int64), minlength=len(classes))
    empty = [c for c in new if counts[classes.index(c)] == 0]
    if empty:
        raise DataError(f"new class {empty[0]!r} has no boxes in the training images of {cfg.data.dir}: it cannot learn. Add boxes of it, or remove it from the class list")
    rehearsal = [c for i, c in enumerate(old) if counts[i]]
    splits = DetectionSplits(scanned.root, scanned.format, scanned.description, classes, train, val, test, scanned.skipped, scanned.problems, scanned.warnings)
    spec = {
        "source_sha256": source.digest,
        "old_classes": old,
        "new_classes": new,
        "rehearsal": {"classes": rehearsal, "boxes": int(sum(counts[i] for i in range(len(old))))},
    }
    return splits, spec


# ---------------------------------------------------------------------------- the run


def old_parameters(model: GraftDetector) -> tuple[str, ...]:
    """Every parameter but the newest class block's: what frozen mode keeps as it was."""
    kinds = block_kinds(model)
    if kinds[-1] == "branch":
        learns = f"branches.{len(model.branches) - 1}."
    else:  # the newest of the base detector's last-layer blocks
        learns = f"detector.head.classification_head.cls_logits.blocks.{sum(k != 'branch' for k in kinds) - 1}."
    return tuple(n for n, _ in model.named_parameters() if not n.startswith(learns))


def expand_detector(job: ExpansionJob, *, data_dir: str | Path | None, quiet: bool, hooks: list[Any]) -> Any:
    """Expand the detector ``job.source`` with the new classes' boxes in ``job.cfg.data.dir`` (or
    continue the snapshot ``job.payload``, its data now under ``data_dir`` if given)."""
    from graft.tasks.detect.runner import augmentation, train_and_report
    from graft.engine.device import select_device
    from graft.engine.run_folder import ExpandResult, inherit_weights_report, opened_run

    cfg, source, run_dir, payload, replace, started = job.cfg, job.source, job.run_dir, job.payload, job.replace, job.started
    say = progress(quiet)
    if payload is not None:
        splits = DetectionSplits.from_json(payload["splits"], root=Path(data_dir) if data_dir else None)
        missing = [s.path for s in splits.train + splits.val + splits.test if not Path(s.path).is_file()]
        if missing:
            raise SnapshotError(f"{plural(len(missing), 'image')} of the snapshot's data split {'is' if len(missing) == 1 else 'are'} gone (e.g. {missing[0]}); if the data moved, pass its new location with --data")
        spec = payload["expand"]
    if source.dir is None and cfg.data.img_size and cfg.data.img_size != source.model.size:
        with_input_size(source, cfg.data.img_size)  # a COCO model at the size the expansion chose
    if payload is None:
        splits, spec = gather_boxes(cfg, source)
    old, new = spec["old_classes"], spec["new_classes"]
    k = len(old)

    model = copy.deepcopy(source.model)
    added = add_block(model, cfg.expand.detector_block, len(new), seed=cfg.solver.seed)
    if payload is not None:
        model.load_state_dict(payload["model"])
    elif cfg.expand.detector_block == "branch":
        # The branch's neck and heads start from trained weights: they are fine-tuned (at
        # train.fine_tune_lr_mult), only its fresh class layer learns at the full rate. Adam's first
        # full-rate steps on a trained box head push every FCOS box distance below zero, for good.
        # Saved in the config, so a resumed expansion uses the same groups; the user's rules come first.
        i = len(model.branches) - 1
        cfg.model.lr_mult = [*cfg.model.lr_mult, LayerRule(pattern=branch_class_layer(model, i), lr_mult=1.0),
                             LayerRule(pattern=f"branches.{i}", lr_mult=cfg.train.fine_tune_lr_mult)]
    frozen = old_parameters(model)
    phases = [Phase("feature-extract", cfg.train.epochs, None, cfg.solver.base_lr, freeze=frozen)]
    _, aug = augmentation(cfg)
    device = select_device(cfg.train.device)
    task = None
    if cfg.expand.mode == "fine-tune":  # then the backbone's top too; the old detector above it stays frozen
        at = surgery.resolve_fine_tune_at(model, cfg.train.fine_tune_at)
        phases.append(Phase("fine-tune", cfg.train.fine_tune_epochs, at, cfg.solver.base_lr * cfg.train.fine_tune_lr_mult, freeze=tuple(n for n in frozen if not n.startswith("backbone."))))
        task = DistillingDetectionTask(splits.val, splits.classes, cfg.detect.conf, teacher=source.model, weight=cfg.expand.distill_weight)
    lineage = list(source.info.get("expanded_from", [])) + [{"run": source.name, "model_sha256": source.digest, "classes_before": k, "new_classes": new, "mode": cfg.expand.mode, "block": cfg.expand.detector_block}]
    with opened_run(run_dir, replace, cfg.train.cache_dir):
        inherit_weights_report(source.dir, source.name, run_dir)
        tell_data(warnings=splits.warnings, problems=splits.problems, skipped=splits.skipped, listed_in=str(run_dir / "metrics.json"))
        rehearsal = spec["rehearsal"]
        how = "a neck and heads of their own (copied from the old ones) learn" if cfg.expand.detector_block == "branch" else "only their outputs of the last layer learn"
        then = f"; then the backbone's top adapts too for {plural(cfg.train.fine_tune_epochs, 'epoch')}, its features for the old detector distilled towards the original's (weight {cfg.expand.distill_weight:g})" if task is not None else ""
        say(f"expanding {source.name} ({plural(k, 'class', 'classes')}, {source.model.head_kind}) with {len(new)} new: {', '.join(new)}; mode {cfg.expand.mode}: the old detector stays as it was, for the new classes {how}{then}"
            + (f"; {plural(rehearsal['boxes'], 'box', 'boxes')} of old classes ({', '.join(rehearsal['classes'])}) are negatives for it" if rehearsal["boxes"] else ""))
        if payload is None and cfg.expand.pseudo_labels:  # the probe trains the new block; the run continues from it
            # Once (rank 0), its labels and the probe's weights handed to every rank.
            splits, spec["pseudo_labels"], probed = distributed.on_main(lambda: (*add_pseudo_labelled(cfg, model, splits, source.splits, k, phases[0], aug, device, say), model.state_dict()))
            model.load_state_dict(probed)
        if spec.get("pseudo_labels", {}).get("used"):
            phases[0] = dataclasses.replace(phases[0], epochs=cfg.expand.pseudo_label_epochs)
        result = train_and_report(cfg, run_dir, payload, splits, model, aug, phases, device, started, say, quiet, list(hooks), extra={"expand": spec, "expanded_from": lineage}, task=task)
        metrics = distributed.on_main(lambda: _write_expansion(source, model, splits, k, cfg, device, rehearsal, spec, added, started, run_dir))
    say(f"done: old classes mAP {_fmt(metrics['old_map_before'])} -> {_fmt(metrics['old_map_after'])} ({metrics['old_split']}), "
        f"new classes mAP {_fmt(metrics['new_map'])} ({metrics['new_split']}; {_fmt(metrics['new_map_new_images'])} on the new images alone), overall {_fmt(metrics['overall_map'])}; results in {run_dir}")
    return ExpandResult(run_dir, result.metrics, result.history, metrics)


def _write_expansion(source: DetectionSource, model: GraftDetector, splits: DetectionSplits, k: int, cfg: GraftConfig, device: Any, rehearsal: dict[str, Any], spec: dict[str, Any], added: Any, started: float, run_dir: Path) -> dict[str, Any]:
    """``expand_metrics.json`` (old classes before and after, new classes) and the report, once."""
    metrics = expansion_metrics(source, model, splits, k, cfg, device)
    metrics.update(mode=cfg.expand.mode, source=source.name, rehearsal=rehearsal, pseudo_labels=spec.get("pseudo_labels"), parameters=parameter_changes(source.model, model, added), seconds=round(time.perf_counter() - started, 2))
    write_json(run_dir / "expand_metrics.json", metrics)
    write_report_after_run(run_dir, REPORT)
    return metrics


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
