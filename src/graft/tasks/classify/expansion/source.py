"""The run being expanded, and the config of its expansion."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.configuration import GraftConfig, resolve_config
from graft.data.samples import DatasetSplits
from graft.data.transforms import Preprocessing, preprocessing_for
from graft.errors import ConfigError, DataError, SnapshotError
from graft.io import read_json
from graft.models.classifier import GraftClassifier
from graft.tasks.classify.class_stats import FILE_NAME as STATS_FILE
from graft.tasks.classify.class_stats import ClassStats
from graft.io import file_digest
from graft.tasks.classify.embeddings import backbone_fingerprint

EXPAND_EPOCHS = 100  # epochs of the new rows on cached embeddings: seconds, even on a CPU
EXPAND_FINE_TUNE_EPOCHS = 5
EXPAND_SNAPSHOT = 25  # keep a numbered snapshot every 25 epochs, not 100 copies of the model


@dataclass
class Source:
    dir: Path
    info: dict[str, Any]  # its model.json
    model: GraftClassifier  # on the CPU, in eval mode
    digest: str  # sha256 of its model.safetensors: a resumed expansion checks it is the same model
    splits: DatasetSplits | None  # its data split (None when splits.json is missing)
    stats: ClassStats | None  # its class statistics (None when it has none)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def name(self) -> str:
        return str(self.dir)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.info["preprocessing"])


def source_from_run(run_dir: Path, trained: Any) -> Source:
    """The finished classifier run ``trained`` (``graft.pipeline.predict.load_run``) at the absolute
    ``run_dir``, with its data split and class statistics, as the source of an expansion."""
    digest = file_digest(run_dir / "model.safetensors")
    splits = None
    if (run_dir / "splits.json").is_file():
        try:
            splits = DatasetSplits.from_json(read_json(run_dir / "splits.json"))
        except (DataError, ValueError):
            splits = None
    stats = None
    if (run_dir / STATS_FILE).is_file():
        stats = ClassStats.load(run_dir / STATS_FILE)
        if stats.backbone != backbone_fingerprint(trained.model.backbone):
            raise SnapshotError(f"{run_dir / STATS_FILE} was computed with another backbone than the model in {run_dir} (its weights differ); remove the file, or restore the run's own")
        unknown = [c for c in stats.classes if c not in trained.classes]
        if unknown:
            raise SnapshotError(f"{run_dir / STATS_FILE} describes class {unknown[0]!r}, which the model in {run_dir} does not have; remove the file, or restore the run's own")
    return Source(run_dir, trained.info, trained.model, digest, splits, stats)


# Keys that define the model's input: an expansion keeps them from the run it expands.
_FIXED_DATA_KEYS = ("img_size", "mean", "std", "interpolation", "crop_pct")


def expand_config(
    source: Source,
    data_dir: str | os.PathLike | None,
    *,
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> GraftConfig:
    """The expansion's config: the source run's, with expansion defaults, then the user's file,
    ``--set`` overrides and flags. The backbone and preprocessing cannot change."""
    base = copy.deepcopy(source.info["config"])
    base["data"]["dir"] = str(data_dir) if data_dir is not None else None
    # The new rows learn against the old classes' statistics, which describe un-augmented images
    # (the evaluation view): their own views must look the same. Trained on the source run's
    # augmentation instead (flip-rotate, say), new digits fell to 65% against 98% (benchmarks/expand.py).
    base["data"].update(augment="none", hflip=None, vflip=None, rotation=None, crop_scale=None, color_jitter=None)
    base["model"].update(weights=str(source.dir), reinit=[])
    base["train"].update(epochs=EXPAND_EPOCHS, fine_tune_epochs=EXPAND_FINE_TUNE_EPOCHS, strategy="feature-extract")
    base["solver"]["snapshot"] = EXPAND_SNAPSHOT  # `last` is still written every epoch
    base["expand"] = {"source": str(source.dir)}
    cfg = resolve_config(config_file, overrides, flags, base=base)
    if cfg.model.name != source.info["backbone"]["name"]:
        raise ConfigError(
            f"model.name is {cfg.model.name!r}, but {source.dir} is a {source.info['backbone']['name']!r} model: "
            "an expansion keeps the backbone of the run it expands (train a new run for another backbone)"
        )
    changed = [k for k in _FIXED_DATA_KEYS if getattr(cfg.data, k) != base["data"].get(k)]
    if changed or preprocessing_for(source.model.backbone, cfg.data).to_dict() != source.preprocessing.to_dict():
        key = changed[0] if changed else "img_size"
        raise ConfigError(f"data.{key} cannot change when expanding: the old classes' rows were trained on the preprocessing of {source.dir}")
    if cfg.model.reinit:
        raise ConfigError("model.reinit cannot be used with graft expand: re-initialising layers would forget the old classes")
    if cfg.expand.source is None or Path(cfg.expand.source).resolve() != source.dir.resolve():
        raise ConfigError(f"expand.source is set by graft expand to the run being expanded ({source.dir}); leave it out of the config")
    if not cfg.data.dir:
        raise ConfigError("no data: pass --data DIR, a folder with a subfolder of images per new class")
    cfg.train.strategy = "feature-extract" if cfg.expand.mode == "frozen" else "two-phase"
    if cfg.expand.mode == "fine-tune" and cfg.train.fine_tune_epochs == 0:
        raise ConfigError("expand.mode is fine-tune but train.fine_tune_epochs is 0: nothing would adapt the backbone; use --mode frozen or give fine-tune epochs")
    if cfg.train.epochs == 0:
        raise ConfigError("train.epochs is 0: the new rows would not learn; give them at least one epoch")
    return cfg
