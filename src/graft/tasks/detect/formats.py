"""Readers for the three box formats users bring: COCO JSON, YOLO and Pascal VOC.

Each reader turns a dataset folder into ``Source`` records (one per split the folder gives, or one
unsplit source) in the format's own box convention, with classes mapped to contiguous indices
deterministically: COCO categories sorted by id, YOLO ``names`` in order, VOC object names sorted.
The background label is not theirs to know about: index 0 is the first real class.

Problems in the annotation files are collected as messages naming the file, line or annotation
id; ``strict`` turns them into errors later, in one place (``graft.tasks.detect.data``).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from graft.console import plural
from graft.data.folder import VAL_ALIASES
from graft.tasks.detect.boxes import RawImage
from graft.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
FORMATS = ("coco", "yolo", "voc")


@dataclass
class Source:
    """The images of one split (``split`` None: not split by the data) as one format states them."""

    split: str | None
    images: list[RawImage]
    convention: str  # box convention the format declares
    where: str  # the annotation file or folder, for messages
    problems: list[str] = field(default_factory=list)  # annotation problems (the affected boxes are left out)
    missing: list[tuple[Path, str]] = field(default_factory=list)  # (image path, what refers to it) not on disk


@dataclass
class Found:
    """A dataset folder's format, classes and sources."""

    format: str
    description: str  # what was found, in words
    classes: list[str]
    sources: list[Source]


def split_of(name: str) -> str | None:
    """"train2017" -> "train", "valid" -> "val"; None for a name that is no split."""
    n = name.lower()
    for split, aliases in (("train", ("train",)), ("val", (*VAL_ALIASES, "val")), ("test", ("test",))):
        if any(n.startswith(a) for a in aliases):
            return split
    return None


def detect_format(root: Path) -> str | None:
    """The box format of ``root`` (``coco``, ``yolo``, ``voc``), or None: not detection data."""
    if root.is_file():
        return "yolo" if root.suffix in (".yaml", ".yml") else "coco" if root.suffix == ".json" else None
    if (root / "Annotations").is_dir():
        return "voc"
    if any((root / n).is_file() for n in ("data.yaml", "data.yml", "dataset.yaml")):
        return "yolo"
    if (root / "annotations").is_dir() and any(p.suffix == ".json" for p in (root / "annotations").iterdir()):
        return "coco"
    if any(_coco_json(p) for p in sorted(root.glob("*.json"))):
        return "coco"
    return None


def read(root: Path, fmt: str) -> Found:
    return {"coco": read_coco, "yolo": read_yolo, "voc": read_voc}[fmt](root)


# --------------------------------------------------------------------------------------- COCO


def _coco_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return '"images"' in head or '"annotations"' in head or '"categories"' in head


def read_coco(root: Path) -> Found:
    if root.is_file():
        files, base = [root], root.parent
    elif (root / "annotations").is_dir():
        files, base = sorted(p for p in (root / "annotations").glob("*.json") if _coco_json(p)), root
    else:
        files, base = sorted(p for p in root.glob("*.json") if _coco_json(p)), root
    if not files:
        raise DataError(f"{root}: no COCO annotation file (annotations/instances_<split>.json or one *.json)")
    loaded = [(f, _load_json(f)) for f in files]
    splits = [split_of(f.stem.removeprefix("instances_")) for f, _ in loaded]
    if len(files) > 1 and (None in splits or len(set(splits)) < len(splits)):
        named = ", ".join(f.name for f in files)
        raise DataError(f"{root}: several COCO annotation files ({named}); name them instances_train*.json, instances_val*.json and instances_test*.json, one each")
    if len(files) == 1 and splits[0] is None:
        splits = [None]
    classes = _coco_classes(loaded)
    sources = [_coco_source(f, d, split, base, classes) for (f, d), split in zip(loaded, splits)]
    described = ", ".join(str(f.relative_to(base) if f.is_relative_to(base) else f) for f, _ in loaded)
    return Found("coco", f"COCO JSON ({described})", [name for _, name in classes], sources)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("images"), list) or not isinstance(d.get("categories"), list):
        raise DataError(f"{path}: not a COCO annotation file (it needs 'images', 'annotations' and 'categories' lists)")
    return d


def _coco_classes(loaded: list[tuple[Path, dict[str, Any]]]) -> list[tuple[int, str]]:
    """(category id, name) sorted by id; every file must agree."""
    first: list[tuple[int, str]] | None = None
    for path, d in loaded:
        cats: dict[int, str] = {}
        for c in d["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise DataError(f"{path}: category {c!r} needs an integer 'id' and a 'name'")
            if c["id"] in cats:
                raise DataError(f"{path}: category id {c['id']} is defined twice ({cats[c['id']]!r} and {c['name']!r})")
            cats[c["id"]] = c["name"]
        names = list(cats.values())
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"{path}: category name {dup[0]!r} is used by two category ids; names must be unique")
        pairs = sorted(cats.items())
        if not pairs:
            raise DataError(f"{path}: no categories")
        if first is None:
            first, first_path = pairs, path
        elif pairs != first:
            raise DataError(f"{path}: its categories differ from those of {first_path}; every split must define the same ones")
    return first


def _coco_source(path: Path, d: dict[str, Any], split: str | None, base: Path, classes: list[tuple[int, str]]) -> Source:
    label_of = {cid: i for i, (cid, _) in enumerate(classes)}
    src = Source(split, [], "xywh", str(path))
    folders = _coco_image_folders(path, split, base)
    by_id: dict[Any, RawImage] = {}
    missing: list[RawImage] = []
    homes: Counter[Path] = Counter()  # the folders the found images are in
    for img in d["images"]:
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            src.problems.append(f"{path}: image entry {str(img)[:80]} needs an 'id' and a 'file_name'; left out")
            continue
        if img["id"] in by_id:
            src.problems.append(f"{path}: image id {img['id']} appears twice ({by_id[img['id']].path.name} and {img['file_name']}); the second is left out")
            continue
        file = _resolve(img["file_name"], folders, homes)
        size = (int(img["width"]), int(img["height"])) if isinstance(img.get("width"), int) and isinstance(img.get("height"), int) else None
        by_id[img["id"]] = RawImage(file or Path(img["file_name"]), str(img["id"]), np.zeros((0, 4)), [], [], size=size)
        if file is None:
            missing.append(by_id[img["id"]])
    _place_missing(missing, homes, folders)
    boxes: dict[Any, list[tuple[list[float], int, str, bool]]] = {k: [] for k in by_id}
    for a in d.get("annotations", []):
        aid = a.get("id", "?") if isinstance(a, dict) else "?"
        where = f"annotation id {aid}"
        if not isinstance(a, dict):
            src.problems.append(f"{path}: {where}: not an object; left out")
            continue
        if a.get("image_id") not in by_id:
            src.problems.append(f"{path}: {where}: image id {a.get('image_id')!r} is not among the images; left out")
            continue
        if a.get("category_id") not in label_of:
            src.problems.append(f"{path}: {where}: unknown category id {a.get('category_id')!r}; left out")
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) or v is None for v in bbox)):
            src.problems.append(f"{path}: {where}: 'bbox' must be [x, y, width, height], not {bbox!r}; left out")
            continue
        values = [math.nan if v is None else float(v) for v in bbox]
        boxes[a["image_id"]].append((values, label_of[a["category_id"]], where, bool(a.get("iscrowd", 0))))
    for key, r in by_id.items():
        got = boxes[key]
        r.boxes = np.array([b for b, _, _, _ in got], dtype=np.float64).reshape(-1, 4)
        r.labels = [label for _, label, _, _ in got]
        r.where = [w for _, _, w, _ in got]
        r.crowd = np.array([c for _, _, _, c in got], dtype=bool)
        src.images.append(r)
    return src


def _coco_image_folders(path: Path, split: str | None, base: Path) -> list[Path]:
    """Where a COCO file's ``file_name`` may be relative to: the split's image folder as COCO 2017
    ships it (``train2017/`` beside ``annotations/``), an ``images/`` folder, or the JSON's folder."""
    stem = path.stem.removeprefix("instances_")
    out = [base / stem, base / "images" / stem, base / "images", base, path.parent]
    if split is not None:
        out += [p for p in sorted(base.iterdir()) if p.is_dir() and split_of(p.name) == split and p not in out]
    return list(dict.fromkeys(out))


def _resolve(name: str, folders: list[Path], homes: Counter[Path]) -> Path | None:
    for folder in folders:
        candidate = folder / name
        if candidate.exists():
            homes[folder] += 1
            return candidate.resolve()
    return None


def _place_missing(missing: list[RawImage], homes: Counter[Path], folders: list[Path]) -> None:
    """A missing image is reported where it belongs: in the folder that holds the JSON's other
    images (or the first candidate folder that exists), not in the first folder graft looked in."""
    home = homes.most_common(1)[0][0] if homes else next((f for f in folders if f.is_dir()), folders[0])
    for r in missing:
        r.path = (home / r.path).absolute()


# --------------------------------------------------------------------------------------- YOLO


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


# ---------------------------------------------------------------------------------- Pascal VOC


def read_voc(root: Path) -> Found:
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    xmls = sorted(p for p in ann_dir.glob("*.xml") if not p.name.startswith("."))
    if not xmls:
        raise DataError(f"{ann_dir}: no .xml annotation files")
    problems: list[str] = []
    parsed = {p.stem: _voc_parse(p, img_dir, problems) for p in xmls}
    parsed = {k: v for k, v in parsed.items() if v is not None}
    classes = sorted({name for _, objects, _ in parsed.values() for name, *_ in objects})
    if not classes:
        raise DataError(f"{ann_dir}: no objects in any annotation file")
    index = {c: i for i, c in enumerate(classes)}
    lists = _voc_image_sets(root)
    groups: list[tuple[str | None, list[str]]] = lists or [(None, sorted(parsed))]
    sources = []
    for split, ids in groups:
        src = Source(split, [], "xyxy", str(ann_dir), problems=list(problems) if not sources else [])
        for image_id in ids:
            if image_id not in parsed:
                src.problems.append(f"{root / 'ImageSets' / 'Main'}: {split} lists {image_id!r}, which has no usable Annotations/{image_id}.xml; left out")
                continue
            path, objects, size = parsed[image_id]
            b = np.array([o[1] for o in objects], dtype=np.float64).reshape(-1, 4)
            b[:, :2] -= 1.0  # VOC pixels are 1-based (as detectron2 reads them)
            src.images.append(RawImage(
                path, image_id, b, [index[o[0]] for o in objects], [f"Annotations/{image_id}.xml object {i + 1} ({o[0]})" for i, o in enumerate(objects)],
                difficult=np.array([o[2] for o in objects], dtype=bool), size=size,
            ))
        sources.append(src)
    sets = f", ImageSets/Main: {', '.join(s for s, _ in lists)}" if lists else ""
    return Found("voc", f"Pascal VOC ({len(xmls)} annotation files{sets})", classes, sources)


def _voc_parse(path: Path, img_dir: Path, problems: list[str]) -> tuple[Path, list[tuple[str, list[float], bool]], tuple[int, int] | None] | None:
    try:
        tree = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        problems.append(f"{path}: not readable XML ({e}); left out")
        return None
    filename = (tree.findtext("filename") or "").strip()
    image = img_dir / filename if filename else None
    if image is None or not image.exists():
        stem_matches = sorted(p for p in img_dir.glob(path.stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES) if img_dir.is_dir() else []
        image = stem_matches[0] if stem_matches else (image or img_dir / (path.stem + ".jpg"))
    size = None
    w, h = tree.findtext("size/width"), tree.findtext("size/height")
    try:
        if w and h and int(float(w)) > 0 and int(float(h)) > 0:
            size = (int(float(w)), int(float(h)))
    except ValueError:
        pass
    objects = []
    for i, obj in enumerate(tree.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            problems.append(f"{path}: object {i} has no name or no bndbox; left out")
            continue
        try:
            values = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            problems.append(f"{path}: object {i} ({name}): bndbox needs numeric xmin, ymin, xmax, ymax; left out")
            continue
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
        objects.append((name, values, difficult))
    return image.absolute(), objects, size


def _voc_image_sets(root: Path) -> list[tuple[str, list[str]]]:
    main = root / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    found = {}
    for name in ("train", "val", "trainval", "test"):
        f = main / f"{name}.txt"
        if f.is_file():
            found[name] = [line.split()[0] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if "train" in found:
        found.pop("trainval", None)
    elif "trainval" in found:
        found["train"] = found.pop("trainval")
    return [(s, found[s]) for s in ("train", "val", "test") if s in found]

