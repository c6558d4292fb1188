"""A benchmark's work folder: its own temporary folder (under ``--work`` when given), deleted at the
end unless ``--keep``, so benchmark runs never pile up on the disk."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def make(prefix: str, parent: Path | None = None) -> Path:
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def release(work: Path, keep: bool) -> None:
    if keep:
        print(f"kept {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
