"""The decoded-image cache: each file decoded once, outputs bit-identical to decoding again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graft.data.decoded as decoded_module
from graft.data.dataset import ImageDataset
from graft.data.decoded import DecodedImages
from graft.data.folder import scan_folder
from graft.data.transforms import PRESETS, Preprocessing, eval_transform, train_transform
from helpers import make_class_folders

PRE = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


@pytest.fixture
def samples(tmp_path):
    return scan_folder(make_class_folders(tmp_path / "d", per_class=3), val_fraction=0.0).train


@pytest.mark.parametrize("preset", ["none", "flip-rotate"])
def test_cached_images_give_bit_identical_tensors(samples, preset, tmp_path):
    tf = train_transform(PRE, PRESETS[preset])
    plain = ImageDataset(samples, tf, seed=3)
    cached = ImageDataset(samples, tf, seed=3, decoded=DecodedImages(samples, PRE, budget_mb=100, disk_dir=tmp_path, max_pixels=None).fill())
    for i in range(len(samples)):
        assert torch.equal(plain[(i, 2)][0], cached[(i, 2)][0])
        assert torch.equal(eval_transform(PRE)(cached.decoded[i]), ImageDataset(samples, eval_transform(PRE))[i][0])


def test_each_file_is_decoded_once_over_many_epochs(samples, tmp_path, monkeypatch):
    calls = []
    real = decoded_module.load_image
    monkeypatch.setattr(decoded_module, "load_image", lambda p, **k: calls.append(p) or real(p, **k))
    cache = DecodedImages(samples, PRE, budget_mb=100, disk_dir=tmp_path, max_pixels=None).fill(threads=1)
    ds = ImageDataset(samples, train_transform(PRE, PRESETS["flip-rotate"]), decoded=cache)
    for epoch in range(3):
        for i in range(len(ds)):
            ds[(i, epoch)]
    assert len(calls) == len(samples)


def test_over_budget_images_go_to_disk_and_read_back_identically(samples, tmp_path):
    in_memory = DecodedImages(samples, PRE, budget_mb=100, disk_dir=None, max_pixels=None).fill()
    spilled = DecodedImages(samples, PRE, budget_mb=0, disk_dir=tmp_path, max_pixels=None).fill()
    assert spilled.memory_bytes == 0 and spilled.on_disk == len(samples)
    assert len(list((tmp_path / "decoded").glob("*.npy"))) == len(samples)
    for i in range(len(samples)):
        assert np.array_equal(np.asarray(in_memory[i]), np.asarray(spilled[i]))
    short = min(in_memory[0].size)
    assert short == int(32 / 0.875)  # stored already resized to the pipeline's resize


def test_no_budget_and_no_disk_decodes_on_demand(samples):
    cache = DecodedImages(samples, PRE, budget_mb=0, disk_dir=None, max_pixels=None).fill()
    assert cache.memory_bytes == 0 and cache.on_disk == 0
    assert cache[0].size[0] >= 36


def test_a_damaged_disk_entry_is_decoded_again(samples, tmp_path):
    cache = DecodedImages(samples, PRE, budget_mb=0, disk_dir=tmp_path, max_pixels=None).fill()
    reference = np.asarray(cache[0]).copy()
    cache.items[0].write_bytes(b"broken")
    assert np.array_equal(np.asarray(cache[0]), reference)
