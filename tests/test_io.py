"""Atomic writes: the new file complete or the old one, and the rename itself made durable."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from graft import io


def test_an_atomic_write_syncs_the_file_then_its_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    io.write_text(tmp_path / "a" / "x.txt", "new")
    assert synced == ["file", "folder"]
    assert (tmp_path / "a" / "x.txt").read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        io.atomic_write(target, failing)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
