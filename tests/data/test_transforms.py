"""Preprocessing that follows the backbone, augmentation presets, and random draws that are a
function of (seed, epoch, index) only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from graft.configuration import DataConfig
from graft.data.dataset import EpochBatchSampler, ImageDataset
from graft.data.samples import Sample
from graft.data.transforms import (
    PRESETS,
    Augmentation,
    Preprocessing,
    augmentation_from_config,
    eval_transform,
    preprocessing_for,
    train_transform,
)
from graft.models.backbones import create_backbone

SMALL = Preprocessing(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=0.875)


def noise(h: int = 40, w: int = 56, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0")


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    out = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        noise(40 + i, 50, seed=i).save(path)
        out.append(Sample(path=path, label=i % 2))
    return out


# ------------------------------------------------------------------------------ preprocessing


def test_preprocessing_follows_the_backbone(lite0):
    pre = preprocessing_for(lite0)
    assert pre.input_size == 224
    assert pre.mean == (0.5, 0.5, 0.5)
    assert pre.std == (0.5, 0.5, 0.5)
    assert pre.interpolation == "bicubic"
    assert pre.crop_pct == pytest.approx(0.875)

    other = preprocessing_for(create_backbone("test_efficientnet"))
    assert other.input_size == 160
    assert other.mean == pytest.approx((0.485, 0.456, 0.406))
    assert other.std == pytest.approx((0.229, 0.224, 0.225))
    assert other.crop_pct == pytest.approx(0.95)


def test_preprocessing_default_data_config_changes_nothing(lite0):
    assert preprocessing_for(lite0, DataConfig()) == preprocessing_for(lite0)


def test_preprocessing_overrides(lite0):
    cfg = DataConfig(img_size=96, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear", crop_pct=1.0)
    pre = preprocessing_for(lite0, cfg)
    assert pre == Preprocessing(input_size=96, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear", crop_pct=1.0)
    partial = preprocessing_for(lite0, DataConfig(img_size=128))
    assert partial.input_size == 128
    assert partial.mean == (0.5, 0.5, 0.5) and partial.interpolation == "bicubic"


def test_preprocessing_dict_round_trip():
    pre = Preprocessing(input_size=64, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), interpolation="nearest", crop_pct=0.9)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert Preprocessing.from_dict({"input_size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}).crop_pct == pytest.approx(0.875)


# ------------------------------------------------------------------------------ eval transform


def test_eval_transform_shape_dtype_and_normalisation(lite0):
    pre = preprocessing_for(lite0)
    grey = Image.new("RGB", (300, 200), (128, 128, 128))
    x = eval_transform(pre)(grey)
    assert x.shape == (3, 224, 224)
    assert x.dtype == torch.float32
    expected = (128 / 255 - 0.5) / 0.5
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-4)
    assert float(x.abs().max()) < 0.01


def test_eval_transform_per_channel_normalisation():
    pre = Preprocessing(input_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = eval_transform(pre)(Image.new("RGB", (20, 30), (255, 0, 128)))
    assert x.shape == (3, 16, 16)
    for c, value in enumerate((1.0, 0.0, 128 / 255)):
        assert torch.allclose(x[c], torch.tensor((value - pre.mean[c]) / pre.std[c]), atol=1e-4)


def test_eval_transform_resizes_then_centre_crops():
    """Short side to floor(32 / 0.5) = 64, then the central 32x32: a centred square survives alone."""
    pre = Preprocessing(input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="nearest", crop_pct=0.5)
    im = Image.new("RGB", (128, 64), (0, 0, 0))
    im.paste((255, 255, 255), (32, 16, 96, 48))  # the central half of the resized 128x64 image
    x = eval_transform(pre)(im)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, torch.ones_like(x))


def test_eval_transform_is_deterministic():
    im = noise()
    t = eval_transform(SMALL)
    torch.manual_seed(1)
    a = t(im)
    torch.manual_seed(2)
    assert torch.equal(a, t(im))


# ------------------------------------------------------------------------------ augmentation


def aug(**kwargs) -> Augmentation:
    return augmentation_from_config(DataConfig(**kwargs))


def test_preset_none_is_the_eval_transform():
    im = noise()
    assert aug(augment="none").is_identity
    train = train_transform(SMALL, aug(augment="none"))
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.equal(train(im), eval_transform(SMALL)(im))


def test_flip_rotate_changes_pixels():
    a = aug(augment="flip-rotate")
    assert a == PRESETS["flip-rotate"]
    assert a.hflip and a.rotation == pytest.approx(72.0) and not a.is_identity
    im = noise()
    train, base = train_transform(SMALL, a), eval_transform(SMALL)(im)
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        out = train(im)
        assert out.shape == base.shape and out.dtype == torch.float32
        assert not torch.equal(out, base)
        outs.append(out)
    assert not torch.equal(outs[0], outs[1])


def test_overrides_on_a_preset():
    assert aug(augment="flip-rotate", hflip=False, rotation=0) == Augmentation()
    assert aug(augment="flip-rotate", hflip=False, rotation=0).is_identity
    im = noise()
    torch.manual_seed(0)
    out = train_transform(SMALL, aug(augment="flip-rotate", hflip=False, rotation=0))(im)
    assert torch.equal(out, eval_transform(SMALL)(im))

    only_flip = aug(augment="flip-rotate", rotation=0)
    assert only_flip == Augmentation(hflip=True)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = train_transform(SMALL, only_flip)(im)
        base = eval_transform(SMALL)(im)
        assert torch.equal(out, base) or torch.equal(out, base.flip(-1))
        flips.add(torch.equal(out, base))
    assert flips == {True, False}  # both outcomes occur over 8 seeds

    assert aug(augment="none", vflip=True) == Augmentation(vflip=True)
    strong = aug(augment="strong", crop_scale=(0.5, 1.0), color_jitter=0.0)
    assert strong == Augmentation(hflip=True, rotation=15.0, crop_scale=(0.5, 1.0), color_jitter=0.0)


def test_strong_preset_output_shape():
    torch.manual_seed(0)
    x = train_transform(SMALL, aug(augment="strong"))(noise(80, 60))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


# ------------------------------------------------------------------------------ ImageDataset


def test_dataset_same_key_same_augmentation(samples):
    ds = ImageDataset(samples, train_transform(SMALL, PRESETS["flip-rotate"]), seed=7)
    assert len(ds) == 4
    a, label = ds[(2, 3)]
    torch.manual_seed(999)  # the global RNG has no say
    b, _ = ds[(2, 3)]
    assert label == samples[2].label
    assert torch.equal(a, b)
    # a fresh dataset with the same seed agrees
    c, _ = ImageDataset(samples, train_transform(SMALL, PRESETS["flip-rotate"]), seed=7)[(2, 3)]
    assert torch.equal(a, c)


def test_dataset_differs_across_epochs_and_seeds(samples):
    t = train_transform(SMALL, PRESETS["flip-rotate"])
    ds = ImageDataset(samples, t, seed=7)
    epochs = [ds[(1, e)][0] for e in range(3)]
    assert not torch.equal(epochs[0], epochs[1])
    assert not torch.equal(epochs[1], epochs[2])
    other_seed = ImageDataset(samples, t, seed=8)[(1, 0)][0]
    assert not torch.equal(epochs[0], other_seed)


def test_dataset_does_not_disturb_global_rng(samples):
    ds = ImageDataset(samples, train_transform(SMALL, PRESETS["flip-rotate"]), seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[(0, 0)]
    assert torch.equal(torch.rand(3), expected)


def test_dataset_plain_index_uses_eval_pipeline(samples):
    ds = ImageDataset(samples, eval_transform(SMALL))
    x, label = ds[3]
    assert x.shape == (3, 32, 32) and label == 1
    assert torch.equal(x, ds[(3, 5)][0])


# ------------------------------------------------------------------------------ EpochBatchSampler


def batches(sampler: EpochBatchSampler) -> list[list[tuple[int, int]]]:
    return list(iter(sampler))


def test_sampler_same_seed_and_epoch_same_batches():
    a = EpochBatchSampler(20, 4, seed=3)
    b = EpochBatchSampler(20, 4, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert batches(a) == batches(b)
    assert batches(a) == batches(a)
    c = EpochBatchSampler(20, 4, seed=4)
    c.set_epoch(2)
    assert batches(c) != batches(a)


def test_sampler_epochs_differ_and_carry_the_epoch():
    s = EpochBatchSampler(20, 4, seed=3)
    s.set_epoch(0)
    first = batches(s)
    s.set_epoch(1)
    second = batches(s)
    assert [[i for i, _ in b] for b in first] != [[i for i, _ in b] for b in second]
    assert all(e == 0 for b in first for _, e in b)
    assert all(e == 1 for b in second for _, e in b)


@pytest.mark.parametrize("n, batch_size", [(10, 4), (12, 4), (7, 7), (9, 3), (13, 5)])
def test_sampler_covers_every_index_once(n, batch_size):
    s = EpochBatchSampler(n, batch_size, seed=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        got = batches(s)
        flat = [i for b in got for i, _ in b]
        assert sorted(flat) == list(range(n))
        assert all(len(b) == batch_size for b in got[:-1])
        assert len(s) == len(got)


def test_sampler_drops_a_trailing_batch_of_one():
    s = EpochBatchSampler(9, 4, seed=1)
    got = batches(s)
    assert [len(b) for b in got] == [4, 4]
    assert len(s) == 2
    flat = [i for b in got for i, _ in b]
    assert len(flat) == len(set(flat)) == 8
    # a single batch of one is kept: there is nothing else to train on
    assert [len(b) for b in batches(EpochBatchSampler(1, 4, seed=1))] == [1]
    # a trailing batch of two is kept
    assert [len(b) for b in batches(EpochBatchSampler(10, 4, seed=1))] == [4, 4, 2]


def test_sampler_without_shuffle_is_in_order():
    s = EpochBatchSampler(7, 3, seed=0, shuffle=False)
    s.set_epoch(5)
    assert [[i for i, _ in b] for b in batches(s)] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_sampler_start_batch_resumes_exactly(start):
    s = EpochBatchSampler(21, 4, seed=2)
    s.set_epoch(4)
    full = batches(s)
    assert len(full) == 5
    resumed = EpochBatchSampler(21, 4, seed=2)
    resumed.set_epoch(4, start_batch=start)
    assert batches(resumed) == full[start:]
    # the next epoch starts from the beginning again
    resumed.set_epoch(5)
    s.set_epoch(5)
    assert batches(resumed) == batches(s)
