"""A detection dataset folder, scanned: format found, images checked, boxes cleaned, split.

``scan_detection`` is the detection counterpart of ``graft.data.folder.scan_folder``: it says
which format it found, uses the splits the data gives (validation split from train, seeded, when
there is none; test only for the final metrics), and lists every problem with the file or
annotation it concerns. Images that cannot be read are skipped as the classifier skips them;
``strict`` turns any problem into a DataError instead.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from graft.console import plural
from graft.data.samples import Skipped
from graft.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from graft.tasks.detect.boxes import BoxReport, BoxSample, RawImage, check_convention, clean_boxes, exif_boxes, to_xyxy
from graft.tasks.detect.coco import read_coco
from graft.tasks.detect.formats import Found, Source, detect_format
from graft.tasks.detect.voc import read_voc
from graft.tasks.detect.yolo import read_yolo
from graft.errors import DataError

STRICT_LIST = 5  # problems a --strict error spells out


@dataclass
class DetectionSplits:
    root: Path
    format: str  # coco | yolo | voc
    description: str  # what was found, in words ("COCO JSON (annotations/instances_train.json)")
    classes: list[str]
    train: list[BoxSample]
    val: list[BoxSample]
    test: list[BoxSample]
    skipped: list[Skipped] = field(default_factory=list)  # images left out
    problems: list[str] = field(default_factory=list)  # annotations left out, boxes dropped or clipped
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Boxes per class in each split (crowd regions not counted), and images."""
        out: dict[str, dict[str, int]] = {}
        for split in ("train", "val", "test"):
            samples = getattr(self, split)
            labels = np.concatenate([s.labels[~s.crowd] for s in samples]) if samples else np.zeros(0, np.int64)
            per = np.bincount(labels, minlength=len(self.classes))
            out[split] = {"images": len(samples), **{c: int(n) for c, n in zip(self.classes, per)}}
        return out


    def to_json(self) -> dict[str, Any]:
        """Everything a snapshot needs to rebuild the splits exactly (boxes included); paths
        relative to ``root`` where they lie below it, so moved data can be found again."""

        def rel(path: Path) -> str:
            p = Path(path)
            return p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else str(p)

        def sample(s: BoxSample) -> dict[str, Any]:
            return {"path": rel(s.path), "id": s.image_id, "size": [s.width, s.height], "boxes": s.boxes.tolist(), "labels": s.labels.tolist(), "crowd": s.crowd.tolist(), "difficult": s.difficult.tolist()}

        return {
            "root": str(self.root), "format": self.format, "description": self.description, "classes": list(self.classes),
            "counts": self.counts(), **{split: [sample(s) for s in getattr(self, split)] for split in ("train", "val", "test")},
            "skipped": [{"path": rel(s.path), "reason": s.reason} for s in self.skipped], "problems": list(self.problems), "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], root: str | os.PathLike | None = None) -> DetectionSplits:
        base = Path(os.path.abspath(root if root is not None else d["root"]))

        def sample(x: dict[str, Any]) -> BoxSample:
            n = len(x["labels"])
            return BoxSample(
                base / x["path"], str(x["id"]), int(x["size"][0]), int(x["size"][1]),
                np.array(x["boxes"], np.float32).reshape(-1, 4), np.array(x["labels"], np.int64), np.array(x["crowd"], bool).reshape(n), np.array(x["difficult"], bool).reshape(n),
            )

        return cls(
            base, d["format"], d["description"], list(d["classes"]), *[[sample(x) for x in d[split]] for split in ("train", "val", "test")],
            [Skipped(base / x["path"], x["reason"]) for x in d.get("skipped", [])], list(d.get("problems", [])), list(d.get("warnings", [])),
        )


def is_detection_data(root: str | os.PathLike) -> bool:
    return detect_format(Path(root)) is not None


def scan_detection(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> DetectionSplits:
    """Training's scan: a training split with boxes is required, and a validation split is carved
    out of it (seeded) when the data gives none."""
    root, found = _read(root)
    by_split, skipped, problems = _checked(root, found.sources, strict, max_pixels, workers)
    if None not in by_split and "train" not in by_split:
        given = " and ".join(s for s in ("val", "test") if s in by_split)
        raise DataError(f"{root}: {found.description} gives {given} images but no training split; training needs one "
                        "(graft eval evaluates data like this as it is)")
    warnings: list[str] = []
    train, val, test = _splits(by_split, val_fraction, test_fraction, seed, warnings)
    if not train:
        raise DataError(f"{root}: no usable training images" + (f" ({len(skipped)} skipped, e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ""))
    if not any(len(s.labels) for s in train):
        raise DataError(f"{root}: the training images have no boxes")
    return DetectionSplits(root.absolute(), found.format, found.description, found.classes, train, val, test, skipped, problems, warnings)


def scan_evaluation(
    root: str | os.PathLike,
    *,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> tuple[str, list[BoxSample], DetectionSplits]:
    """Evaluation's scan: the split to evaluate exactly as the data gives it (test, else val, else
    the only one; no training split needed, nothing carved out), only its images looked at, so the
    problems reported are those of the images evaluated. Returns (split name, its samples, the
    scan with that split's skipped files and problems)."""
    root, found = _read(root)
    given = {src.split: src for src in found.sources}
    name = next((s for s in ("test", "val") if s in given and given[s].images), None)
    src = given[name] if name else next((s for s in found.sources if s.images), found.sources[0])
    by_split, skipped, problems = _checked(root, [src], strict, max_pixels, workers)
    samples = by_split[src.split]
    if not samples:
        raise DataError(f"{root}: no usable images to evaluate" + (f" ({len(skipped)} skipped, e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ""))
    split = src.split or "all"
    scan = DetectionSplits(root.absolute(), found.format, found.description, found.classes, [], [], [], skipped, problems, [])
    return split, samples, scan


def _read(root: str | os.PathLike) -> tuple[Path, Found]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    fmt = detect_format(root)
    if fmt is None:
        raise DataError(f"{root}: no detection annotations found (COCO annotations/*.json, a YOLO data.yaml, or Pascal VOC Annotations/)")
    return root, read(root, fmt)


def _checked(root: Path, sources: list[Source], strict: bool, max_pixels: int | None, workers: int | None) -> tuple[dict[str | None, list[BoxSample]], list[Skipped], list[str]]:
    """``sources``' images looked at and their boxes cleaned, per split; --strict applied."""
    skipped: list[Skipped] = []
    problems: list[str] = []
    by_split: dict[str | None, list[BoxSample]] = {}
    for src in sources:
        by_split[src.split] = _finalise(src, max_pixels, workers, skipped, problems)
    if strict and (skipped or problems):
        listed = [f"{s.path}: {s.reason}" for s in skipped] + problems
        more = f" (and {len(listed) - STRICT_LIST} more)" if len(listed) > STRICT_LIST else ""
        raise DataError(f"{plural(len(listed), 'problem')} in {root}: " + "; ".join(listed[:STRICT_LIST]) + more + "; fix them, or run without --strict to skip them")
    return by_split, skipped, problems


def _finalise(src: Source, max_pixels: int | None, workers: int | None, skipped: list[Skipped], problems: list[str]) -> list[BoxSample]:
    problems.extend(src.problems)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        looks = list(pool.map(lambda r: _look(r.path, max_pixels), src.images))
    usable: list[tuple[RawImage, _Look]] = []
    for r, look in zip(src.images, looks):
        if isinstance(look, str):
            skipped.append(Skipped(r.path, look))
        else:
            usable.append((r, look))
    # Which pixels the boxes refer to: the stored ones when the annotation records the stored size
    # of an image that EXIF turns sideways; otherwise the upright ones.
    oriented = [(r, look, look.stored_frame(r.size)) for r, look in usable]
    check_convention([(r, *(look.stored if stored else look.upright)) for r, look, stored in oriented], src.convention, src.where)
    report = BoxReport()
    samples = []
    for r, look, stored in oriented:
        w, h = look.stored if stored else look.upright
        b = to_xyxy(r.boxes, src.convention, w, h)
        if stored:
            b = exif_boxes(b, look.orientation, w, h)
        samples.append(clean_boxes(r, b, *look.upright, report))
    problems.extend(report.messages)
    return samples


@dataclass(frozen=True)
class _Look:
    upright: tuple[int, int]
    stored: tuple[int, int]
    orientation: int

    def stored_frame(self, recorded: tuple[int, int] | None) -> bool:
        return recorded is not None and self.orientation in (5, 6, 7, 8) and tuple(recorded) == self.stored and self.stored != self.upright


def _look(path: Path, max_pixels: int | None) -> _Look | str:
    """The image's upright and stored sizes and EXIF orientation, or why it can't be used."""
    try:
        im = load_image(path, max_pixels=max_pixels, draft_size=64)
        with Image.open(path) as raw:
            stored = raw.size
            try:
                orientation = int(raw.getexif().get(0x0112, 1))
            except Exception:
                orientation = 1
    except ImageError as e:
        return e.reason
    except OSError as e:
        return f"cannot read file: {e}"
    del im  # decoded (at draft scale) only to prove the file is usable
    upright = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
    return _Look(upright, stored, orientation)


def _splits(by_split: dict[str | None, list[BoxSample]], val_fraction: float, test_fraction: float, seed: int, warnings: list[str]) -> tuple[list[BoxSample], list[BoxSample], list[BoxSample]]:
    """Given splits as given; a missing val split (or everything, when nothing is split) seeded."""
    if None in by_split:
        pool, test_given = by_split[None], None
    else:
        pool, test_given = by_split["train"], by_split.get("test")
    val_given = by_split.get("val")
    if val_given is not None and test_given is not None:
        return pool, val_given, test_given
    order = sorted(range(len(pool)), key=lambda i: (pool[i].image_id, str(pool[i].path)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_given is not None else max(1, round(len(pool) * val_fraction)) if val_fraction > 0 and len(pool) > 1 else 0
    n_test = 0 if test_given is not None or None not in by_split else round(len(pool) * test_fraction)
    if n_val + n_test >= len(pool):
        n_test = max(0, len(pool) - 1 - n_val)
    val_idx, test_idx = set(order[:n_val]), set(order[n_val:n_val + n_test])
    train = [s for i, s in enumerate(pool) if i not in val_idx and i not in test_idx]
    val = val_given if val_given is not None else [pool[i] for i in sorted(val_idx)]
    test = test_given if test_given is not None else [pool[i] for i in sorted(test_idx)]
    if n_val:
        warnings.append(f"no validation split given: {n_val} of {plural(len(pool), 'image')} held out for validation (seed {seed})")
    return train, val, test


def describe(splits: DetectionSplits) -> str:
    """One line for the user: what was found and how it splits."""
    boxes = {name: sum(int((~s.crowd).sum()) for s in getattr(splits, name)) for name in ("train", "val", "test")}
    parts = [f"{name} {plural(len(getattr(splits, name)), 'image')} / {plural(boxes[name], 'box', 'boxes')}" for name in ("train", "val", "test") if getattr(splits, name)]
    return f"{splits.description}: {plural(len(splits.classes), 'class', 'classes')}; " + ", ".join(parts)


def read(root: Path, fmt: str) -> Found:
    """The folder's boxes, by the reader of its format (``formats.detect_format``)."""
    return {"coco": read_coco, "yolo": read_yolo, "voc": read_voc}[fmt](root)
