"""YOLO boxes: a ``data.yaml`` naming the classes and the image folders of each split, and one
``.txt`` of ``class cx cy w h`` lines (0..1 of the image) per image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from graft.configuration import check_expansion
from graft.console import plural
from graft.errors import ConfigError, DataError
from graft.tasks.detect.boxes import RawImage
from graft.tasks.detect.formats import IMAGE_SUFFIXES, Found, Source, clipped, exists, shown


def read_yolo(root: Path) -> Found:
    cfg_path = root if root.is_file() else next(root / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (root / n).is_file())
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read it as YAML: {e}") from None
    except RecursionError:
        raise DataError(f"{cfg_path}: cannot read it as YAML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # PyYAML's own constructors: an int of 5000 digits, a date like 2001-13-45
        raise DataError(f"{cfg_path}: cannot read it as YAML: a value it cannot hold ({e})") from None
    try:
        check_expansion(cfg, cfg_path)  # the config files' bound on aliases of aliases (a "billion laughs")
    except ConfigError as e:
        raise DataError(str(e).removeprefix("config file ")) from None
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise DataError(f"{cfg_path}: a YOLO data.yaml needs 'names' (the class names) and 'train' (to train; 'val' or 'test' are enough to evaluate)")
    names = cfg["names"]
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) for k in keys) or sorted(keys) != list(range(len(keys))):
            raise DataError(f"{cfg_path}: 'names' must map 0, 1, 2, ... to class names, not {shown(keys[:6])}")
        names = [names[k] for k in sorted(keys)]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DataError(f"{cfg_path}: 'names' must be a list of class names")
    names = [str(n) for n in names]
    if len(set(names)) < len(names):
        raise DataError(f"{cfg_path}: class names must be unique")
    # 'path' (optional) is the dataset root; relative to the YAML's folder, as split entries are to it.
    path = cfg.get("path") or "."
    if not isinstance(path, str) or "\0" in path:
        raise DataError(f"{cfg_path}: 'path' must be the dataset's folder, not {shown(path)}")
    base = (cfg_path.parent / path).resolve()
    if not any(cfg.get(split) not in (None, "", []) for split in ("train", "val", "test")):
        raise DataError(f"{cfg_path}: no 'train', 'val' or 'test' entry (the images' folders)")
    sources = []
    for split in ("train", "val", "test"):
        entry = cfg.get(split)
        if entry in (None, "", []):
            continue
        images = _yolo_images(entry, base, cfg_path, split)
        src = Source(split, [], "cxcywh normalised", f"{cfg_path} ({split})")
        for image in images:
            src.images.append(_yolo_labels(image, names, src))
        sources.append(src)
    return Found("yolo", f"YOLO ({cfg_path.name}, {plural(len(names), 'class', 'classes')})", names, sources)


def _yolo_images(entry: Any, base: Path, cfg_path: Path, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for e in entries:
        if not isinstance(e, str):  # never str() of it: it may be an alias of aliases
            raise DataError(f"{cfg_path}: {split} entries must name image folders or .txt lists, not {shown(e)}")
        p = Path(e)
        p = p if p.is_absolute() else base / p
        if exists(p, "dir"):
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
        elif exists(p, "file") and p.suffix == ".txt":
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"{p}: cannot read this {split} image list (from {cfg_path.name}): {err}") from None
            for line in lines:
                if line.strip():
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else (p.parent / q))
        else:
            raise DataError(f"{cfg_path}: {split} entry {shown(e)} is neither an image folder nor a .txt list ({clipped(str(p))} does not exist)")
    return [p.absolute() for p in out]


def yolo_label_path(image: Path) -> Path:
    """YOLO's rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _yolo_labels(image: Path, names: list[str], src: Source) -> RawImage:
    label_file = yolo_label_path(image)
    boxes, labels, where = [], [], []
    if exists(label_file, "file"):  # no label file: an image without objects (a negative)
        try:
            lines = label_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            src.problems.append(f"{label_file}: cannot read: {e}; its image is left out")
            return RawImage(image, image.stem, np.full((1, 4), math.nan), [0], [f"{label_file.name}"])
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            at = f"{label_file.name} line {n}"
            try:
                values = [float(v) for v in fields]
            except ValueError:
                src.problems.append(f"{label_file}: line {n}: {shown(line.strip())} is not numbers; left out")
                continue
            if len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0):
                src.problems.append(f"{label_file}: line {n}: expected 'class cx cy w h', got {len(values)} numbers; left out")
                continue
            cls = values[0]
            if not math.isfinite(cls) or cls != int(cls) or not 0 <= cls < len(names):
                src.problems.append(f"{label_file}: line {n}: class index {clipped(fields[0])} is beyond the {len(names)} names of data.yaml (0..{len(names) - 1}); left out")
                continue
            if len(values) > 5 and any(math.isnan(v) for v in values[1:]):  # min() and max() would pass over a NaN
                values = [cls, math.nan, math.nan, math.nan, math.nan]  # a box dropped by name, as other NaN coordinates
            elif len(values) > 5:  # a segment polygon: its bounding box, as Ultralytics does
                xs, ys = values[1::2], values[2::2]
                values = [cls, (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
            boxes.append(values[1:])
            labels.append(int(cls))
            where.append(at)
    return RawImage(image, image.stem, np.array(boxes, dtype=np.float64).reshape(-1, 4), labels, where)
