"""The three box formats users bring (COCO JSON, YOLO and Pascal VOC): which one a folder holds,
and what their readers (``coco``, ``yolo``, ``voc``) return.

Each reader turns a dataset folder into ``Source`` records (one per split the folder gives, or one
unsplit source) in the format's own box convention, with classes mapped to contiguous indices
deterministically: COCO categories sorted by id, YOLO ``names`` in order, VOC object names sorted.
The background label is not theirs to know about: index 0 is the first real class.

Problems in the annotation files are collected as messages naming the file, line or annotation
id; ``strict`` turns them into errors later, in one place (``graft.tasks.detect.data``).
"""

from __future__ import annotations

import math
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from graft.data.samples import VAL_ALIASES
from graft.tasks.detect.boxes import RawImage

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
    if any(is_coco_json(p) for p in sorted(root.glob("*.json"))):
        return "coco"
    return None


def is_coco_json(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return '"images"' in head or '"annotations"' in head or '"categories"' in head


def leaves_folder(name: str) -> bool:
    """Does an annotation's image name point outside the data folder (an absolute path, a drive,
    or a ``..`` part)? Such a name is refused, never followed: annotation files can come from
    anyone."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return posix.is_absolute() or bool(windows.drive) or windows.is_absolute() or ".." in posix.parts or ".." in windows.parts


# Annotation files come from anyone: what the readers take from them is checked with these.

QUOTE_MAX = 100  # characters of a file's text that a message quotes
_quote = reprlib.Repr()
_quote.maxlevel, _quote.maxstring, _quote.maxother = 3, QUOTE_MAX, QUOTE_MAX


def shown(value: object) -> str:
    """``repr(value)`` for a message, at most QUOTE_MAX characters ("..." in place of the rest; a
    nested list or object is cut short before it is written out): a name of a megabyte would
    otherwise make a message of a megabyte."""
    return clipped(_quote.repr(value))


def clipped(text: str) -> str:
    """``text`` for a message, at most QUOTE_MAX characters ("..." in place of the rest)."""
    return text if len(text) <= QUOTE_MAX else text[: QUOTE_MAX - 3] + "..."


def number(value: str | float | None) -> float:
    """``value`` (a number or its text) as a float; NaN for what a float cannot hold (None, text
    that is no number, an integer beyond float range), which the box checks drop by name."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (ValueError, OverflowError):
        return math.nan


def exists(path: Path, kind: str = "") -> bool:
    """Is there a file (``kind`` "file"), a folder ("dir") or either at ``path``? False, rather
    than an OSError or ValueError, also for a name the OS cannot look up: longer than the file
    system allows, a NUL in it, or in a folder graft may not search."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(mode) if kind == "file" else stat.S_ISDIR(mode) if kind == "dir" else True
