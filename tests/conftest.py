"""Shared fixtures. Tests never reach the network: timm and huggingface_hub are told so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Caches (embeddings) go to a throwaway folder, never the user's ~/.cache, removed when the tests end.
if "GRAFT_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["GRAFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="graft-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GRAFT_CACHE_DIR"], ignore_errors=True)

from helpers import make_class_folders  # noqa: E402


@pytest.fixture
def colour_data(tmp_path: Path) -> Path:
    """DATA/CLASS/*.png with three classes of 12 images."""
    return make_class_folders(tmp_path / "colours")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1.2 MB tmpfs, for a real full disk (ENOSPC). Mounting needs root, which CI has; elsewhere
    the test skips, and the RLIMIT_FSIZE tests (tests/test_disk_full.py) cover the same paths."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a file a test left open does not hold it
