"""Turning a user's folder of images into classes and train/val/test samples.

Two layouts are understood: ``DATA/CLASS/...`` ("class-folders", split here with a seeded,
stratified split) and ``DATA/{train,val,test}/CLASS/...`` ("split-folders", the user's own split).
Every image is decoded once while scanning, so a file that cannot be used is reported here, with
its reason, instead of crashing training hours later. The result is deterministic: the same folder
and seed always give the same classes, labels and splits.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from graft.console import plural
from graft.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_image
from graft.data.samples import VAL_ALIASES, DatasetSplits, Sample, Skipped, split_sizes
from graft.errors import DataError

_SPLIT_FOLDERS = frozenset({"train", "test", *VAL_ALIASES})
_STRICT_LIST = 5  # how many skipped files a --strict error spells out


def scan_folder(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    min_classes: int = 2,
    empty_ok: bool = True,
    known_classes: Iterable[str] = (),
) -> DatasetSplits:
    """Scan a training folder (either layout), check every image, and split it.

    ``min_classes``: fewer usable classes is a DataError. ``empty_ok=False``: a class folder
    without usable images is a DataError instead of a warning (classes being added on purpose).
    ``known_classes``: classes a trained model already has (an expansion's old classes); they may
    have images in ``val/`` or ``test/`` alone, to be measured rather than learned.

    Unusable files are listed in ``skipped`` (or, with ``strict``, raise DataError). With
    class-folders, val/test are a stratified split seeded by ``seed``; with split-folders, ``val/``
    and ``test/`` are used as given, and only a missing ``val/`` is split off ``train/``.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise DataError(f"{name} must be at least 0 and below 1, not {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must stay below 1 so that some images are left "
            f"for training, not {val_fraction} + {test_fraction}"
        )
    root = _check_root(root)
    subdirs = [p.name for p in _children(root) if p.is_dir()]
    if "train" in subdirs and set(subdirs) <= _SPLIT_FOLDERS:
        return _scan_split_folders(
            root, subdirs, val_fraction, test_fraction, seed, strict, max_pixels, workers,
            min_classes, empty_ok, frozenset(known_classes),
        )

    listing = _list_class_folders(root)
    skipped = _validate([listing], max_pixels, workers)
    _raise_if_strict(strict, skipped)
    classes = _usable_classes(root, listing, min_classes, empty_ok)
    train, val, test = _stratified_split(
        classes, listing, val_fraction, test_fraction, seed, listing.warnings
    )
    return DatasetSplits(
        root, "class-folders", classes, train, val, test, skipped, listing.warnings
    )


def scan_class_folders(
    root: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> tuple[list[str], list[Sample], list[Skipped], list[str]]:
    """Scan a folder of class folders for evaluation; returns (classes, samples, skipped, warnings).

    With ``classes`` given (a trained model's), labels index into it, a class folder the model
    doesn't know is a DataError, and model classes missing from the folder are only a warning.
    Without it, the folder's own classes are used, as for training.
    """
    root = _check_root(root)
    listing = _list_class_folders(root)
    split_note = None
    if classes is not None and set(listing.files) & _SPLIT_FOLDERS and not set(listing.files) & set(classes):
        # train/ val/ test/ as graft train takes them: evaluate the held-out split, as eval does for boxes
        chosen = next(d for d in ("test", *VAL_ALIASES, "train") if d in listing.files)
        split_note = f"{root} holds splits: evaluating {chosen}/"
        root = root / chosen
        listing = _list_class_folders(root)
    if classes is not None:
        for name in [n for n, files in listing.files.items() if not files and n not in classes]:
            del listing.files[name]  # an empty folder, as in training: a warning, not an unknown class
            listing.warnings.append(f"ignoring empty folder {root / name}")
        unknown = sorted(set(listing.files) - set(classes))
        if unknown:
            raise DataError(
                f"class folder {root / unknown[0]} is not one of the model's classes "
                f"({', '.join(classes)}); rename or remove it"
                + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
            )
    skipped = _validate([listing], max_pixels, workers)
    _raise_if_strict(strict, skipped)
    if classes is None:
        classes = _usable_classes(root, listing)
    else:
        classes = list(classes)
        _drop_unusable(listing)
        if not listing.files:
            raise DataError(_no_images(listing))
        for name in classes:
            if name not in listing.files:
                listing.warnings.append(f"no images of class {name!r} in {root}")
    index = {name: i for i, name in enumerate(classes)}
    samples = [Sample(p, index[name]) for name in classes for p in listing.files.get(name, [])]
    return classes, samples, skipped, ([split_note] if split_note else []) + listing.warnings


# --- listing -------------------------------------------------------------------------------------


@dataclass
class _Listing:
    """Candidate image files per class folder of one folder, before and after validation."""

    folder: Path
    files: dict[str, list[Path]]  # class name -> image-extension files, sorted by relative path
    skipped: list[Skipped]
    warnings: list[str]


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(root)))
    if not path.exists():
        raise DataError(f"data folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"data folder {path} is not a folder")
    return path


def _ignored(name: str) -> bool:
    """Hidden files/folders and macOS zip residue: skipped silently, never reported."""
    return name.startswith(".") or name == "__MACOSX"


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not _ignored(p.name))
    except OSError as e:
        raise DataError(f"cannot read folder {folder}: {e.strerror or e}") from e


def _list_class_folders(folder: Path, *, required: bool = True) -> _Listing:
    """Each subfolder of ``folder`` is a class; its files (recursively) are the class's candidates.

    No class folders at all is a DataError when ``required``, else a warning.
    """
    listing = _Listing(folder, {}, [], [])
    for child in _children(folder):
        if child.is_dir():
            files: list[Path] = []
            for path in _walk_files(child, listing.warnings):
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(path)
                else:
                    ext = f"extension {path.suffix}" if path.suffix else "no extension"
                    listing.skipped.append(Skipped(path, f"not an image file ({ext})"))
            listing.files[child.name] = sorted(files, key=lambda p: p.relative_to(child).as_posix())
        else:
            listing.warnings.append(
                f"ignoring {child}: it is not inside a class folder (put images in {folder}/CLASS/)"
            )
    if not listing.files and not required:
        listing.warnings.append(f"{folder} has no class folders; it is not used")
    elif not listing.files:
        raise DataError(
            f"no class folders in {folder}: put each class's images in its own subfolder, "
            f"e.g. {folder / 'cat'}/*.jpg and {folder / 'dog'}/*.jpg"
        )
    return listing


def _walk_files(top: Path, warnings: list[str]) -> Iterator[Path]:
    """Files under ``top``, following symlinks, each real folder visited once (no symlink loops)."""
    seen: set[str] = set()

    def report(e: OSError) -> None:
        warnings.append(f"cannot read folder {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(top, onerror=report, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        for name in filenames:
            if not _ignored(name):
                yield Path(dirpath, name)


# --- validation ----------------------------------------------------------------------------------


def _validate(
    listings: Iterable[_Listing], max_pixels: int | None, workers: int | None
) -> list[Skipped]:
    """Decode every candidate once (in threads); drop failures from the listings, return them."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 1:
        raise DataError(f"workers must be at least 1, not {workers}")
    listings = list(listings)
    paths = [p for listing in listings for files in listing.files.values() for p in files]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = dict(zip(paths, pool.map(lambda p: _problem(p, max_pixels), paths)))
    skipped: list[Skipped] = []
    for listing in listings:
        for name, files in listing.files.items():
            listing.files[name] = [p for p in files if reasons[p] is None]
            listing.skipped.extend(Skipped(p, reasons[p]) for p in files if reasons[p] is not None)
        listing.skipped.sort(key=lambda s: s.path.as_posix())
        skipped.extend(listing.skipped)
    return skipped


def _problem(path: Path, max_pixels: int | None) -> str | None:
    """Why ``path`` can't be used (the reason alone, as Skipped wants it), or None."""
    try:
        load_image(path, max_pixels=max_pixels, draft_size=64)
    except ImageError as e:
        return e.reason
    return None


def _raise_if_strict(strict: bool, skipped: list[Skipped]) -> None:
    if strict and skipped:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:_STRICT_LIST])
        more = f" (and {len(skipped) - _STRICT_LIST} more)" if len(skipped) > _STRICT_LIST else ""
        raise DataError(
            f"{plural(len(skipped), 'file')} cannot be used: {shown}{more}; "
            "fix or remove them, or run without --strict to skip them"
        )


def _drop_unusable(listing: _Listing, *, warn: bool = True) -> None:
    """Remove class folders left without usable images, with a warning naming each if ``warn``."""
    for name in sorted(listing.files):
        if not listing.files[name]:
            del listing.files[name]
            if warn:
                listing.warnings.append(
                    f"class folder {listing.folder / name} has no usable images; "
                    f"class {name!r} is left out"
                )


def _no_images(listing: _Listing) -> str:
    msg = f"no usable images in {listing.folder}"
    if listing.skipped:
        first = listing.skipped[0]
        msg += f" ({plural(len(listing.skipped), 'file')} skipped, e.g. {first.path}: {first.reason})"
    return msg


def _usable_classes(root: Path, listing: _Listing, min_classes: int = 2, empty_ok: bool = True) -> list[str]:
    """The sorted classes that have usable images; DataError unless there are ``min_classes``."""
    if not empty_ok:
        empty = sorted(name for name, files in listing.files.items() if not files)
        if empty:
            folder = listing.folder / empty[0]
            bad = [s for s in listing.skipped if folder in s.path.parents]
            detail = f" ({plural(len(bad), 'file')} skipped, e.g. {bad[0].path.name}: {bad[0].reason})" if bad else ""
            raise DataError(f"class folder {folder} has no usable images{detail}; add images to it or remove it")
    _drop_unusable(listing)
    classes = sorted(listing.files)
    if not classes:
        raise DataError(_no_images(listing))
    if len(classes) < min_classes:
        raise DataError(
            f"graft needs at least 2 classes; found only {classes[0]!r} in {root} "
            f"(add a folder of images for each other class)"
        )
    return classes


# --- splitting -----------------------------------------------------------------------------------


def _stratified_split(
    classes: list[str],
    listing: _Listing,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    warnings: list[str],
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Per class, a seeded shuffle then val/test/train cuts: no class's split depends on another."""
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label, name in enumerate(classes):
        if name not in listing.files:  # a known class measured in val/ or test/ alone
            continue
        order = {p: i for i, p in enumerate(listing.files[name])}  # sorted by relative path
        files = list(order)
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val, n_test = split_sizes(len(files), val_fraction, test_fraction)
        short = [s for s, frac, k in (("val", val_fraction, n_val), ("test", test_fraction, n_test))
                 if frac > 0 and k == 0]
        if short:
            warnings.append(
                f"class folder {listing.folder / name} has only {plural(len(files), 'usable image')}, "
                f"too few to split: none go to {' or '.join(short)}"
            )
        cuts = (files[:n_val], files[n_val : n_val + n_test], files[n_val + n_test :])
        for out, cut in zip((val, test, train), cuts):
            out.extend(Sample(p, label) for p in sorted(cut, key=order.__getitem__))
    return train, val, test


# --- split-folders layout ------------------------------------------------------------------------


def _scan_split_folders(
    root: Path,
    subdirs: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    strict: bool,
    max_pixels: int | None,
    workers: int | None,
    min_classes: int = 2,
    empty_ok: bool = True,
    known: frozenset[str] = frozenset(),
) -> DatasetSplits:
    """DATA/train (required), DATA/val|valid|validation and DATA/test (optional): class folders.
    A class of ``known`` may have images in val/ or test/ alone."""
    val_dirs = [d for d in VAL_ALIASES if d in subdirs]
    if len(val_dirs) > 1:
        raise DataError(
            f"{root} has both {' and '.join(d + '/' for d in val_dirs)}: keep one validation folder"
        )
    warnings = [f"ignoring {p}: it is not a folder" for p in _children(root) if not p.is_dir()]
    train = _list_class_folders(root / "train")
    others = {}
    if val_dirs:
        others["val"] = _list_class_folders(root / val_dirs[0], required=False)
    if "test" in subdirs:
        others["test"] = _list_class_folders(root / "test", required=False)
    for listing in others.values():
        _require_in_train(listing, set(train.files) | known, root / "train")

    skipped = _validate([train, *others.values()], max_pixels, workers)
    _raise_if_strict(strict, skipped)
    classes = _usable_classes(root / "train", train, min_classes, empty_ok)
    for listing in others.values():
        _drop_unusable(listing, warn=False)  # reported below as classes missing from that split
        _require_in_train(listing, set(classes) | known, root / "train")
    measured_only = {n for listing in others.values() for n in listing.files if n in known} - set(classes)
    classes = sorted(set(classes) | measured_only)
    warnings += train.warnings + [w for listing in others.values() for w in listing.warnings]

    index = {name: i for i, name in enumerate(classes)}

    def samples(listing: _Listing) -> list[Sample]:
        return [Sample(p, index[name]) for name in classes for p in listing.files.get(name, [])]

    if "val" in others:
        train_samples, val_samples = samples(train), samples(others["val"])
    else:
        train_samples, val_samples, _ = _stratified_split(
            classes, train, val_fraction, 0.0, seed, warnings
        )
    if "test" not in others and test_fraction > 0:
        warnings.append(
            f"{root} has no test/ folder: test_fraction applies only to a folder of class folders"
        )
    test_samples = samples(others["test"]) if "test" in others else []
    for listing in others.values():
        missing = [name for name in classes if name not in listing.files]
        if missing:
            warnings.append(f"{listing.folder} has no images of class(es) {', '.join(missing)}")
    return DatasetSplits(
        root, "split-folders", classes, train_samples, val_samples, test_samples, skipped, warnings
    )


def _require_in_train(listing: _Listing, train_classes: set[str], train_dir: Path) -> None:
    """DataError for a class with images in val/ or test/ but none in train/ (can't be learned)."""
    extra = sorted(n for n, files in listing.files.items() if files and n not in train_classes)
    if extra:
        folder = listing.folder / extra[0]
        raise DataError(
            f"class {extra[0]!r} has images in {folder} but none usable in {train_dir}: every "
            f"class needs training images (add them to {train_dir / extra[0]}/ or remove {folder})"
        )
