"""YOLO boxes: a ``data.yaml`` naming the classes and the image folders of each split, and one
``.txt`` of ``class cx cy w h`` lines (0..1 of the image) per image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from graft.console import plural
from graft.errors import DataError
from graft.tasks.detect.boxes import RawImage
from graft.tasks.detect.formats import IMAGE_SUFFIXES, Found, Source


def read_yolo(root: Path) -> Found:
    cfg_path = root if root.is_file() else next(root / n for n in ("data.yaml", "data.yml", "dataset.yaml") if (root / n).is_file())
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{cfg_path}: cannot read it as YAML: {e}") from None
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise DataError(f"{cfg_path}: a YOLO data.yaml needs 'names' (the class names) and 'train' (to train; 'val' or 'test' are enough to evaluate)")
    names = cfg["names"]
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DataError(f"{cfg_path}: 'names' must map 0, 1, 2, ... to class names, not {keys[:6]}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise DataError(f"{cfg_path}: 'names' must be a list of class names")
    names = [str(n) for n in names]
    if len(set(names)) < len(names):
        raise DataError(f"{cfg_path}: class names must be unique")
    # 'path' (optional) is the dataset root; relative to the YAML's folder, as split entries are to it.
    base = (cfg_path.parent / str(cfg.get("path") or ".")).resolve()
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
        p = Path(str(e))
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else (p.parent / q))
        else:
            raise DataError(f"{cfg_path}: {split} entry {e!r} is neither an image folder nor a .txt list ({p} does not exist)")
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
    if label_file.is_file():  # no label file: an image without objects (a negative)
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
                src.problems.append(f"{label_file}: line {n}: {line.strip()!r} is not numbers; left out")
                continue
            if len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0):
                src.problems.append(f"{label_file}: line {n}: expected 'class cx cy w h', got {len(values)} numbers; left out")
                continue
            cls = values[0]
            if cls != int(cls) or not 0 <= cls < len(names):
                src.problems.append(f"{label_file}: line {n}: class index {fields[0]} is beyond the {len(names)} names of data.yaml (0..{len(names) - 1}); left out")
                continue
            if len(values) > 5:  # a segment polygon: its bounding box, as Ultralytics does
                xs, ys = values[1::2], values[2::2]
                values = [cls, (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
            boxes.append(values[1:])
            labels.append(int(cls))
            where.append(at)
    return RawImage(image, image.stem, np.array(boxes, dtype=np.float64).reshape(-1, 4), labels, where)
