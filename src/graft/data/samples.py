"""What a scanned image dataset is: samples with labels in train/val/test, the files left out,
and the record of it that a run keeps (``splits.json``), so the split can be rebuilt exactly."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.errors import DataError


SPLIT_NAMES = ("train", "val", "test")


VAL_ALIASES = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    """One usable image and its class."""

    path: Path  # absolute
    label: int  # index into classes


@dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, and why (e.g. "zero-byte file")."""

    path: Path
    reason: str


@dataclass
class DatasetSplits:
    """A scanned dataset: class names (their order defines the labels) and each split's samples."""

    root: Path
    layout: str  # "class-folders" or "split-folders"
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, every class listed (zeros included)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLIT_NAMES:
            per_class = dict.fromkeys(self.classes, 0)
            for s in getattr(self, split):
                per_class[self.classes[s.label]] += 1
            out[split] = per_class
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record of the scan; paths are posix strings relative to ``root``."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": list(self.classes),
            "counts": self.counts(),
            **{
                split: [[self._rel(s.path), s.label] for s in getattr(self, split)]
                for split in SPLIT_NAMES
            },
            "skipped": [{"path": self._rel(s.path), "reason": s.reason} for s in self.skipped],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], root: str | os.PathLike | None = None) -> DatasetSplits:
        """Rebuild what :meth:`to_json` wrote; ``root`` (data moved) overrides the stored one."""
        try:
            base = Path(os.path.abspath(root if root is not None else d["root"]))
            classes = [str(c) for c in d["classes"]]
            splits = {
                split: [Sample(base / p, int(label)) for p, label in d.get(split, [])]
                for split in SPLIT_NAMES
            }
            skipped = [Skipped(base / s["path"], str(s["reason"])) for s in d.get("skipped", [])]
            out = cls(
                root=base,
                layout=str(d["layout"]),
                classes=classes,
                skipped=skipped,
                warnings=[str(w) for w in d.get("warnings", [])],
                **splits,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed dataset record ({type(e).__name__}: {e})") from e
        for split in SPLIT_NAMES:
            for s in getattr(out, split):
                if not 0 <= s.label < len(classes):
                    raise DataError(
                        f"malformed dataset record: {s.path} has label {s.label}, "
                        f"but there are only {len(classes)} classes"
                    )
        return out

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of a class's ``n`` images go to val and to test (at least 1 stays in train)."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    excess = n_val + n_test - (n - 1)
    if excess > 0:  # train keeps at least one; test gives way before val
        cut = min(excess, n_test)
        n_test -= cut
        n_val = max(0, n_val - (excess - cut))
    return n_val, n_test
