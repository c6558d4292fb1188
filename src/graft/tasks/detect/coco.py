"""COCO JSON boxes: one or more annotation files (per split, or one for all), categories sorted by
id, ``[x, y, width, height]`` boxes; images found beside the files or under their split's folder.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from graft.errors import DataError
from graft.tasks.detect.boxes import RawImage
from graft.tasks.detect.formats import Found, Source, clipped, exists, is_coco_json, leaves_folder, number, shown, split_of


def read_coco(root: Path) -> Found:
    if root.is_file():
        files, base = [root], root.parent
    elif (root / "annotations").is_dir():
        files, base = sorted(p for p in (root / "annotations").glob("*.json") if is_coco_json(p)), root
    else:
        files, base = sorted(p for p in root.glob("*.json") if is_coco_json(p)), root
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
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits())
        raise DataError(f"{path}: holds a number too long to read ({str(e).split(';')[0]})") from None
    lists = isinstance(d, dict) and isinstance(d.get("images"), list) and isinstance(d.get("categories"), list) and isinstance(d.get("annotations", []), list)
    if not lists:
        raise DataError(f"{path}: not a COCO annotation file (it needs 'images', 'annotations' and 'categories' lists)")
    return d


def _coco_classes(loaded: list[tuple[Path, dict[str, Any]]]) -> list[tuple[int, str]]:
    """(category id, name) sorted by id; every file must agree."""
    first: list[tuple[int, str]] | None = None
    for path, d in loaded:
        cats: dict[int, str] = {}
        for c in d["categories"]:
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                raise DataError(f"{path}: category {shown(c)} needs an integer 'id' and a 'name'")
            if c["id"] in cats:
                raise DataError(f"{path}: category id {shown(c['id'])} is defined twice ({shown(cats[c['id']])} and {shown(c['name'])})")
            cats[c["id"]] = c["name"]
        names = list(cats.values())
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"{path}: category name {shown(dup[0])} is used by two category ids; names must be unique")
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
        if not isinstance(img, dict) or _id(img.get("id")) is None or not isinstance(img.get("file_name"), str):
            src.problems.append(f"{path}: image entry {shown(img)} needs an 'id' (a number or a string) and a 'file_name'; left out")
            continue
        if leaves_folder(img["file_name"]):
            src.problems.append(f"{path}: image id {shown(img['id'])}: file_name {shown(img['file_name'])} leaves the data folder (an absolute path or '..'); left out")
            continue
        if img["id"] in by_id:
            src.problems.append(f"{path}: image id {shown(img['id'])} appears twice ({by_id[img['id']].path.name} and {clipped(img['file_name'])}); the second is left out")
            continue
        file = _resolve(img["file_name"], folders, homes)
        size = (int(img["width"]), int(img["height"])) if isinstance(img.get("width"), int) and isinstance(img.get("height"), int) else None
        by_id[img["id"]] = RawImage(file or Path(img["file_name"]), str(img["id"]), np.zeros((0, 4)), [], [], size=size)
        if file is None:
            missing.append(by_id[img["id"]])
    _place_missing(missing, homes, folders)
    boxes: dict[Any, list[tuple[list[float], int, str, bool]]] = {k: [] for k in by_id}
    for a in d.get("annotations", []):
        where = f"annotation id {shown(a['id']) if isinstance(a, dict) and 'id' in a else '?'}"
        if not isinstance(a, dict):
            src.problems.append(f"{path}: {where}: not an object; left out")
            continue
        image_id, category_id = _id(a.get("image_id")), _id(a.get("category_id"))
        if image_id not in by_id:
            src.problems.append(f"{path}: {where}: image id {shown(a.get('image_id'))} is not among the images; left out")
            continue
        if category_id not in label_of:
            src.problems.append(f"{path}: {where}: unknown category id {shown(a.get('category_id'))}; left out")
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) or v is None for v in bbox)):
            src.problems.append(f"{path}: {where}: 'bbox' must be [x, y, width, height], not {shown(bbox)}; left out")
            continue
        values = [number(v) for v in bbox]  # null, or an integer beyond float range: NaN, a box dropped by name
        boxes[image_id].append((values, label_of[category_id], where, bool(a.get("iscrowd", 0))))
    for key, r in by_id.items():
        got = boxes[key]
        r.boxes = np.array([b for b, _, _, _ in got], dtype=np.float64).reshape(-1, 4)
        r.labels = [label for _, label, _, _ in got]
        r.where = [w for _, _, w, _ in got]
        r.crowd = np.array([c for _, _, _, c in got], dtype=bool)
        src.images.append(r)
    return src


def _id(value: Any) -> int | float | str | None:
    """An image or category id as a key: a JSON number or string; None for anything else (null,
    a list, an object), which is no image's or category's id."""
    return value if isinstance(value, (int, float, str)) else None


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
        if exists(candidate):  # False for a name the OS cannot look up (too long): a missing image, skipped by name
            homes[folder] += 1
            return candidate.resolve()
    return None


def _place_missing(missing: list[RawImage], homes: Counter[Path], folders: list[Path]) -> None:
    """A missing image is reported where it belongs: in the folder that holds the JSON's other
    images (or the first candidate folder that exists), not in the first folder graft looked in."""
    home = homes.most_common(1)[0][0] if homes else next((f for f in folders if f.is_dir()), folders[0])
    for r in missing:
        r.path = (home / r.path).absolute()
