"""Pascal VOC boxes: ``Annotations/*.xml`` (one per image, object names sorted into classes),
``JPEGImages/`` and ``ImageSets/Main/*.txt`` for the splits.
"""

from __future__ import annotations

import math
from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as ET

import numpy as np

from graft.errors import DataError
from graft.tasks.detect.boxes import RawImage
from graft.tasks.detect.formats import IMAGE_SUFFIXES, Found, Source, clipped, exists, leaves_folder, number, shown


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
                src.problems.append(f"{root / 'ImageSets' / 'Main'}: {split} lists {shown(image_id)}, which has no usable Annotations/{clipped(image_id)}.xml; left out")
                continue
            path, objects, size = parsed[image_id]
            b = np.array([o[1] for o in objects], dtype=np.float64).reshape(-1, 4)
            b[:, :2] -= 1.0  # VOC pixels are 1-based (as detectron2 reads them)
            src.images.append(RawImage(
                path, image_id, b, [index[o[0]] for o in objects], [f"Annotations/{image_id}.xml object {i + 1} ({clipped(o[0])})" for i, o in enumerate(objects)],
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
    except DefusedXmlException as e:  # entity definitions (a billion laughs), external entities, DTDs
        problems.append(f"{path}: XML with {type(e).__name__} ({e}), which graft does not expand; left out")
        return None
    filename = (tree.findtext("filename") or "").strip()
    if filename and leaves_folder(filename):
        problems.append(f"{path}: <filename> {shown(filename)} leaves the image folder (an absolute path or '..'); left out")
        return None
    image = img_dir / filename if filename else None
    if image is None or not exists(image):  # a name the OS cannot look up (too long) is not there either
        stem_matches = sorted(p for p in img_dir.glob(path.stem + ".*") if p.suffix.lower() in IMAGE_SUFFIXES) if img_dir.is_dir() else []
        image = stem_matches[0] if stem_matches else (image or img_dir / (path.stem + ".jpg"))
    size = None
    w, h = number(tree.findtext("size/width")), number(tree.findtext("size/height"))
    if math.isfinite(w) and math.isfinite(h) and int(w) > 0 and int(h) > 0:
        size = (int(w), int(h))
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
            problems.append(f"{path}: object {i} ({clipped(name)}): bndbox needs numeric xmin, ymin, xmax, ymax; left out")
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
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{f}: cannot read this image set: {e}") from None
            found[name] = [line.split()[0] for line in text.splitlines() if line.strip()]
    if "train" in found:
        found.pop("trainval", None)
    elif "trainval" in found:
        found["train"] = found.pop("trainval")
    return [(s, found[s]) for s in ("train", "val", "test") if s in found]
