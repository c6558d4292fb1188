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


def test_a_written_file_is_as_readable_as_any_file_even_when_the_writer_replaced_the_temp(tmp_path: Path) -> None:
    """safetensors writes its own 0600 file over the temporary one: the result is still 0644 under umask 022."""
    from safetensors.torch import save_file
    import torch

    old = os.umask(0o022)
    try:
        io.atomic_write(tmp_path / "m.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
        io.write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o644
