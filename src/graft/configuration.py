"""The run config: typed, validated strictly, saved resolved with every run.

Sections follow Caffe's split between the net (``model``) and the solver (``solver``), with
``data`` and ``train`` (the transfer-learning recipe) beside them. Solver keys use Caffe's names
where Caffe has one (``base_lr``, ``lr_policy``, ``gamma``, ``stepsize``, ``stepvalue``,
``momentum``, ``weight_decay``, ``max_iter``, ``snapshot``, ``snapshot_prefix``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graft.errors import ConfigError

AugmentPreset = Literal["auto", "none", "flip", "flip-rotate", "flip-scale", "strong"]
Strategy = Literal["feature-extract", "fine-tune", "two-phase"]
Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
LRPolicy = Literal["fixed", "step", "multistep", "cosine", "one-cycle", "plateau"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dir: str | None = Field(None, description="Folder of class folders, or of train/val/test folders.")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of each class held out for validation when there is no val/ folder.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of each class held out for the final test when there is no test/ folder.")
    img_size: int | None = Field(None, ge=16, le=4096, description="Input size in pixels; default: the backbone's.")
    mean: tuple[float, float, float] | None = Field(None, description="Normalisation mean; default: the backbone's.")
    std: tuple[float, float, float] | None = Field(None, description="Normalisation std; default: the backbone's.")
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = Field(None, description="Resize interpolation; default: the backbone's.")
    crop_pct: float | None = Field(None, gt=0.0, le=1.0, description="Evaluation centre-crop fraction; default: the backbone's.")
    augment: AugmentPreset = Field("auto", description="auto (try none and flip on the validation split, keep the best) | none | flip (horizontal) | flip-rotate (the Keras tutorial's) | strong (random-resized-crop, flip, colour jitter). Detectors: auto (try none and flip by validation mAP after the frozen phase's first 2 epochs; the winner's epochs are the run's) | none | flip | flip-scale (flip, zoom 0.6-1.4) | strong (flip, zoom 0.5-1.6, colour); boxes move with the pixels.")
    hflip: bool | None = Field(None, description="Override the preset: random horizontal flip.")
    vflip: bool | None = Field(None, description="Override the preset: random vertical flip.")
    rotation: float | None = Field(None, ge=0.0, le=180.0, description="Override the preset: max rotation in degrees.")
    crop_scale: tuple[float, float] | None = Field(None, description="Override the preset: random-resized-crop area range, e.g. [0.35, 1.0].")
    color_jitter: float | None = Field(None, ge=0.0, le=1.0, description="Override the preset: brightness/contrast/saturation jitter.")
    strict: bool = Field(False, description="Fail on any unreadable file instead of skipping and listing it.")
    max_pixels: int | None = Field(89_478_485, ge=1, description="Decompression-bomb guard: refuse images with more pixels; null disables.")
    num_workers: int | None = Field(None, ge=0, description="DataLoader worker processes; default: chosen for the machine.")
    decode_cache_mb: float = Field(2048, ge=0, description="Memory for decoded, resized images (each file decoded once per run); beyond it they go to disk. 0 disables.")

    @field_validator("crop_scale")
    @classmethod
    def _scale_order(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0.0 < v[0] <= v[1] <= 1.0):
            raise ValueError("must be [min, max] with 0 < min <= max <= 1")
        return v


class LayerRule(_Strict):
    """Caffe's per-layer ``lr_mult``/``decay_mult``, by name pattern (glob, or a name prefix)."""

    pattern: str
    lr_mult: float = Field(1.0, ge=0.0, description="Multiplies the phase's learning rate; 0 freezes.")
    decay_mult: float = Field(1.0, ge=0.0, description="Multiplies the weight decay.")


class ModelConfig(_Strict):
    name: str = Field("tf_efficientnet_lite0", description="timm model name of the backbone.")
    weights: str = Field("bundled", description="bundled (offline EfficientNet-Lite0) | hub (timm pretrained=True) | none | PATH (.safetensors, torch checkpoint, or a graft run folder).")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before the new linear layer.")
    freeze: list[str] = Field(default_factory=list, description="Parameter name patterns frozen in every phase.")
    lr_mult: list[LayerRule] = Field(default_factory=list, description="Per-layer multipliers; the first matching rule applies.")
    reinit: list[str] = Field(default_factory=list, description="Module name patterns re-initialised after loading weights (Caffe: rename a layer).")
    frozen_bn_eval: bool = Field(True, description="Keep BatchNorm layers of frozen parts in inference mode during training.")
    bn_inference: bool = Field(True, description="Keep every BatchNorm layer in inference mode while fine-tuning, trainable ones too (the Keras tutorial's advice: batch statistics of small new batches undo what the head learned); false: unfrozen BatchNorm layers use batch statistics.")


class TrainConfig(_Strict):
    strategy: Strategy = Field("two-phase", description="feature-extract | fine-tune | two-phase (the first, then the second).")
    epochs: int = Field(5, ge=0, description="Epochs of the first (frozen-base) phase; the only phase of a single-phase strategy.")
    fine_tune_epochs: int = Field(5, ge=0, description="Epochs of the fine-tuning phase of two-phase.")
    fine_tune_at: int | str | None = Field(None, description="First backbone layer that learns when fine-tuning: an index into `graft plan`'s layer list (negative counts from the end) or a module name; default: the last third of the layers.")
    fine_tune_lr_mult: float = Field(0.1, gt=0.0, description="Fine-tuning learning rate = solver.base_lr * this.")
    head_lr: float | Literal["auto"] | None = Field("auto", description="Learning rate of the frozen-base phase (the new head): auto (a range test on cached embeddings, scored on the validation split) | a number | null (solver.base_lr).")
    early_stopping: int | None = Field(None, ge=1, description="Patience: end a phase after this many epochs without a better validation score, and restore the best weights (Keras EarlyStopping(restore_best_weights=True)); null: off.")
    early_stopping_monitor: Literal["val_loss", "val_accuracy", "val_map", "val_map50"] = Field("val_loss", description="What early stopping and the best epoch are judged by (detectors: val_map or val_map50; val_loss means val_map there).")

    @field_validator("head_lr")
    @classmethod
    def _positive_lr(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not v > 0:
            raise ValueError("must be a positive number, auto or null")
        return v
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    embedding_cache: bool = Field(True, description="Train frozen-backbone phases on cached backbone embeddings (computed once per image, stored on disk).")
    cache_views: int = Field(4, ge=1, le=64, description="With augmentation: augmented views per training image in the embedding (or detection feature) cache; each epoch draws one. An augmentation that only flips caches its 2 or 4 outcomes instead, each once.")
    prefix_cache: bool = Field(True, description="Fine-tuning without augmentation: compute the frozen layers' activations once and run only the layers that learn.")
    prefix_cache_mb: float = Field(1024, ge=0, description="Memory limit for those activations (half precision); over it, the whole network runs each epoch.")
    class_stats: bool = Field(True, description="Store per-class statistics of the trained model's embeddings in the run (class_stats.safetensors), so `graft expand` can add classes later without the old images.")
    cache_dir: str | None = Field(None, description="Where caches live; default $GRAFT_CACHE_DIR, else ~/.cache/graft.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    amp: bool | Literal["auto"] = Field("auto", description="Mixed precision; auto = on for CUDA.")
    channels_last: bool | Literal["auto"] = Field("auto", description="Channels-last memory format for convolutions; auto = on for classifiers (faster on CPUs too: Lite0 1.3x at 96 px, 2.4x at 224 px), on CUDA only for detectors.")
    sync_bn: bool = Field(False, description="With several processes (torchrun, --devices): BatchNorm layers that train normalise over the whole global batch (SyncBatchNorm; GPUs only) instead of each process's part of it.")
    tensorboard: bool = Field(False, description="Also log every history column per epoch to RUNDIR/tensorboard/ (needs the tensorboard package: pip install 'graft[tensorboard]').")


class SolverConfig(_Strict):
    type: Optimizer = Field("adamw", description="sgd | adam | adamw | rmsprop")
    base_lr: float = Field(1e-3, gt=0.0)
    lr_policy: LRPolicy = Field("cosine", description="fixed | step | multistep | cosine | one-cycle | plateau")
    gamma: float = Field(0.1, gt=0.0, description="LR factor of step, multistep and plateau.")
    stepsize: int = Field(3, ge=1, description="step: epochs between LR drops.")
    stepvalue: list[int] = Field(default_factory=list, description="multistep: epochs (within the phase) at which the LR drops.")
    plateau_patience: int = Field(2, ge=0, description="plateau: epochs without val-loss improvement before a drop.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up at the start of each phase.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD/RMSprop momentum; Adam beta1.")
    weight_decay: float = Field(0.01, ge=0.0)
    no_decay_bias_norm: bool = Field(True, description="No weight decay on biases and normalisation layers.")
    max_iter: int | None = Field(None, ge=1, description="Cap on iterations per phase (Caffe's max_iter); epochs still bound it.")
    batch_size: int = Field(32, ge=1)
    snapshot: int = Field(1, ge=0, description="Keep a snapshot every N epochs (0: only `last`).")
    snapshot_prefix: str = Field("epoch", description="Snapshot file names: snapshots/PREFIX-0001, ...")
    keep_snapshots: int = Field(3, ge=0, description="Keep the newest N numbered snapshots (older ones are deleted once a newer one is written); snapshots/last and snapshots/best (the epoch with the best validation figure, by train.early_stopping_monitor) are always kept. A large N keeps them all.")
    seed: int = Field(0, ge=0)

    @field_validator("snapshot_prefix")
    @classmethod
    def _plain_prefix(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith(".") or v == "last":
            raise ValueError("must be a plain file-name prefix (no '/', not starting with '.', not 'last')")
        return v


class ExpandConfig(_Strict):
    """How `graft expand` adds classes to a trained run (ignored by `graft train`)."""

    mode: Literal["frozen", "fine-tune"] = Field("frozen", description="frozen: backbone and old rows unchanged (old logits bit-identical), only the new rows learn | fine-tune: then also adapt the backbone's top, keeping the old classes by distillation.")
    exemplars: int | None = Field(None, ge=0, description="Old-class images kept per class for rehearsal, chosen by herding: from old-class folders in the new data, else from the original run's training images; null: every old-class image given, none taken from the original run.")
    negatives_per_class: int | None = Field(None, ge=0, description="Samples drawn per old class and epoch from the stored class statistics; null: as many as the largest new class has training views, at least 64.")
    calibrate: Literal["bias", "norm", "none"] = Field("bias", description="bias: align weight norms, then fit a scale and shift of the new logits on held-out data | norm: align weight norms only | none.")
    max_old_loss: float = Field(0.01, ge=0.0, le=1.0, description="Calibration guard: the new rows may take at most this share of the old-class held-out samples the old rows classify correctly (1%: one such sample per hundred; with 0, the one old sample nearest a new class can silence it); raise it to trade old-class accuracy for new-class accuracy.")
    guard_confidence: float = Field(0.5, ge=0.0, le=1.0, description="Calibration guard: only old-class held-out samples the old rows classify correctly, with at least this fraction of the median correct sample's probability, count.")
    detector_block: Literal["branch", "widen"] = Field("branch", description="Detectors: branch: the new classes get their own neck and heads (copied from the old ones) over the shared backbone | widen: new outputs of the last classification layer only (no extra inference cost; the new classes use the old features and box regression).")
    pseudo_labels: bool = Field(True, description="Detectors: first train the new block on the new data alone, then box the new classes it finds in the original run's training images still on disk (score >= pseudo_label_score, not on an object the original's data boxed) and train it on both for pseudo_label_epochs; false: the new data alone.")
    pseudo_label_score: float = Field(0.5, gt=0.0, lt=1.0, description="Detectors: the score at which a new-class detection in the original's training images becomes a box.")
    pseudo_label_epochs: int = Field(5, ge=1, description="Detectors: epochs on the new data plus the pseudo-labelled images, after train.epochs on the new data alone.")
    distill_weight: float = Field(1.0, ge=0.0, description="fine-tune mode: weight of the distillation loss (classifiers: on the old classes' outputs; detectors: on the old detector's neck features, relative squared error).")
    distill_temperature: float = Field(2.0, gt=0.0, description="fine-tune mode: softmax temperature of the distillation (classifiers).")
    source: str | None = Field(None, description="The run being expanded (set by graft expand).")


class DetectConfig(_Strict):
    """Object detection (``task: detect``; ignored by classifiers)."""

    head: Literal["fcos", "retinanet", "fasterrcnn"] = Field("fcos", description="Detector over a timm backbone (model.name): fcos | retinanet | fasterrcnn. A torchvision detector named by model.name brings its own.")
    levels: int = Field(3, ge=1, le=5, description="Backbone feature levels the FPN takes, counted from the deepest (3: strides 8, 16, 32).")
    level_sizes: list[float] | Literal["auto"] = Field("auto", description="Object size (pixels of the input) each pyramid level answers for, smallest first; auto: 4x the level's stride (FCOS, which assigns boxes to levels by their extent); for the anchor-based heads shrunk by powers of two to fit the data's smallest boxes.")
    head_convs: int = Field(2, ge=1, le=4, description="FCOS: convolutions per head tower (torchvision uses 4; 2 halves the head's cost on a CPU).")
    score_thresh: float = Field(0.05, ge=0.0, lt=1.0, description="Detections below this score are dropped before NMS (low, for mAP).")
    nms_iou: float = Field(0.5, gt=0.0, le=1.0, description="IoU above which NMS suppresses a lower-scoring box of the same class.")
    max_detections: int = Field(100, ge=1, description="Detections kept per image.")
    conf: float = Field(0.3, ge=0.0, lt=1.0, description="Confidence at which metrics report precision and recall, and `graft predict` keeps boxes.")
    cache_mb: float = Field(2048, ge=0, description="Memory for the frozen phase's cached backbone features (half precision); beyond it they go to a file in the cache folder.")


class GraftConfig(_Strict):
    task: Literal["auto", "classify", "detect"] = Field("auto", description="auto: detect when the data holds box annotations (COCO, YOLO, Pascal VOC), else classify.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    expand: ExpandConfig = Field(default_factory=ExpandConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)

    @model_validator(mode="after")
    def _phases_have_epochs(self) -> GraftConfig:
        t = self.train
        if t.strategy == "two-phase" and t.epochs + t.fine_tune_epochs == 0:
            raise ValueError("train.epochs and train.fine_tune_epochs are both 0: nothing to train")
        if t.strategy != "two-phase" and t.epochs == 0:
            raise ValueError(f"train.epochs is 0 with strategy {t.strategy}: nothing to train")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading and overriding


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_model(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    import typing

    model: type[BaseModel] = GraftConfig
    for part in path:
        if isinstance(part, int):  # an index into a list of sub-configs (model.lr_mult.0)
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if typing.get_origin(ann) is list:
            ann = typing.get_args(ann)[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return None
    return model


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _section_model(loc[:-1])
            allowed = _allowed_keys(parent) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key '{key}'"
            if hint:
                msg += f" (did you mean '{'.'.join(str(p) for p in loc[:-1] + (hint[0],))}'?)"
            if allowed:
                msg += f"; allowed here: {', '.join(allowed)}"
        else:
            got = e.get("input")
            msg = f"'{key}': {e['msg']}"
            if got is not None and not isinstance(got, dict):
                msg += f" (got {got!r})"
        lines.append(msg)
    return f"invalid config ({source}): " + "; ".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "config") -> GraftConfig:
    """Validate a nested dict; unknown keys and wrong types raise ConfigError naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({source}): the top level must be a mapping of sections (data, model, train, solver, expand)")
    try:
        return GraftConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a second ``train:`` section would drop the first one's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': merged (and overridden) by the safe loader
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key ('? [a, b]'): the safe loader refuses it, naming the line
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1}); merge them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is not valid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as err:  # PyYAML's own constructors: an int of 5000 digits, a date like 2001-13-45
        raise ConfigError(f"config file {path} is not valid YAML: a value it cannot hold ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections (data, model, train, solver, expand)")
    check_expansion(data, path)
    return data


YAML_MAX_VALUES = 10_000
"""The most values a config file may hold with its aliases expanded: a config has a few hundred,
and nine nested aliases of nine (a "billion laughs") would otherwise make error messages of gigabytes."""


def check_expansion(data: Any, path: Path) -> None:
    """ConfigError when ``data`` holds more than YAML_MAX_VALUES values counting every alias in
    full, or an alias inside its own anchor (which never ends)."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > YAML_MAX_VALUES:
            raise ConfigError(f"config file {path}: its anchors and aliases expand to more than {YAML_MAX_VALUES} values "
                              "(aliases of aliases, or an alias inside its own anchor); write the values out")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)


def set_key(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b=value`` override in place; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects KEY=VALUE, e.g. solver.base_lr=0.001; got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    top = [name for name, f in GraftConfig.model_fields.items() if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))]
    if len(parts) == 1 and parts[0] in top:  # a top-level key (task)
        data[parts[0]] = yaml.safe_load(raw) if raw.strip() else None
        return
    if len(parts) != 2 or not all(parts):
        sections = ", ".join(_allowed_keys(GraftConfig))
        raise ConfigError(f"--set key must be SECTION.KEY (sections: {sections}); got {key!r}")
    section, name = parts
    if section not in GraftConfig.model_fields:
        hint = difflib.get_close_matches(section, _allowed_keys(GraftConfig), n=1)
        raise ConfigError(
            f"unknown config section '{section}' in --set {key}"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; sections: {', '.join(_allowed_keys(GraftConfig))}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"config section '{section}' must be a mapping")
    target[name] = value


def resolve_config(
    config_file: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> GraftConfig:
    """Defaults < ``base`` (e.g. the config of the run being expanded) < config file < ``--set``
    overrides < explicit command-line flags (``{"solver.seed": 3}``)."""
    import copy

    data = copy.deepcopy(base) if base else {}
    for section, values in (read_yaml(config_file) if config_file else {}).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    source = str(config_file) if config_file else "command line"
    for assignment in overrides:
        set_key(data, assignment)
    for key, value in (flags or {}).items():
        if value is not None and "." not in key:  # a top-level key (task)
            data[key] = value
        elif value is not None:
            section, name = key.split(".")
            data.setdefault(section, {})[name] = value
    return parse_config(data, source)


def dump_yaml(cfg: GraftConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe(model: type[BaseModel] = GraftConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every key: the config reference in the README comes from here."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
            continue
        default = field.default_factory() if field.default_factory else field.default
        rows.append((key, yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("..."
        ).strip(), field.description or ""))
    return rows
