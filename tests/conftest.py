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
