"""Shared fixtures. Tests never reach the network: timm and huggingface_hub are told so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import make_class_folders  # noqa: E402


@pytest.fixture
def colour_data(tmp_path: Path) -> Path:
    """DATA/CLASS/*.png with three classes of 12 images."""
    return make_class_folders(tmp_path / "colours")
