"""The embedding cache: computed once, reused across runs, invalidated by exactly what changes it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from graft.configuration import ModelConfig, parse_config
from graft.data.folder import scan_folder
from graft.data.transforms import Preprocessing, eval_transform
from graft.models.backbones import build_model
from graft.tasks.classify.embeddings import EmbeddingCache, EmbeddingDataset, EmbeddingStore
from graft.pipeline.train import train
from helpers import make_class_folders, tiny_config


@pytest.fixture
def setup(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=5)
    splits = scan_folder(data, val_fraction=0.0)
    model, _ = build_model(ModelConfig(name="test_resnet", weights="none"), 3)
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0)
    return tmp_path, data, splits.train, model, pre


def make_cache(model, root, pre) -> EmbeddingCache:
    return EmbeddingCache(model.backbone, root=root, spec={"preprocessing": pre.to_dict()}, device=torch.device("cpu"))


def test_second_cache_computes_nothing_and_returns_the_same_rows(setup):
    tmp, _, samples, model, pre = setup
    first = make_cache(model, tmp / "c", pre)
    a = first.embed(samples, eval_transform(pre))
    assert first.computed == len(samples) and a.shape == (len(samples), model.num_features)
    second = make_cache(model, tmp / "c", pre)
    b = second.embed(samples, eval_transform(pre))
    assert second.computed == 0
    assert torch.equal(a, b)


def test_rows_match_the_backbone_run_directly(setup):
    tmp, _, samples, model, pre = setup
    rows = make_cache(model, tmp / "c", pre).embed(samples[:4], eval_transform(pre))
    model.eval()
    from graft.data.images import load_image

    with torch.inference_mode():
        direct = model.backbone(torch.stack([eval_transform(pre)(load_image(s.path)) for s in samples[:4]]))
    torch.testing.assert_close(rows, direct)


def test_changed_weights_or_preprocessing_recompute_everything(setup):
    tmp, _, samples, model, pre = setup
    make_cache(model, tmp / "c", pre).embed(samples, eval_transform(pre))
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.01)
    changed_weights = make_cache(model, tmp / "c", pre)
    changed_weights.embed(samples, eval_transform(pre))
    assert changed_weights.computed == len(samples)
    pre48 = Preprocessing(48, pre.mean, pre.std, pre.interpolation, pre.crop_pct)
    changed_pre = make_cache(model, tmp / "c", pre48)
    changed_pre.embed(samples, eval_transform(pre48))
    assert changed_pre.computed == len(samples)


def test_a_changed_file_is_recomputed_alone_and_a_copy_is_reused(setup):
    tmp, data, samples, model, pre = setup
    make_cache(model, tmp / "c", pre).embed(samples, eval_transform(pre))
    from helpers import make_image
    import numpy as np

    make_image(samples[0].path, (10, 10, 10), np.random.default_rng(99))  # new content, same path
    copy = tmp / "copy.png"
    copy.write_bytes(samples[1].path.read_bytes())  # same content, new path
    from graft.data.samples import Sample

    cache = make_cache(model, tmp / "c", pre)
    cache.embed([*samples, Sample(copy, 0)], eval_transform(pre))
    assert cache.computed == 1


@pytest.mark.parametrize("damage", ["garbage", "tampered"])
def test_a_corrupt_store_file_is_rebuilt_not_used(setup, damage):
    tmp, _, samples, model, pre = setup
    cache = make_cache(model, tmp / "c", pre)
    good = cache.embed(samples, eval_transform(pre))
    path = cache.store.path(cache.key(0, None, 0))
    if damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:  # a valid file whose numbers were altered: only the checksum catches it
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        tensors["embeddings"][0, 0] += 1.0
        save_file(tensors, str(path), metadata=meta)
    again = make_cache(model, tmp / "c", pre)
    rows = again.embed(samples, eval_transform(pre))
    assert again.computed == len(samples)
    assert torch.equal(rows, good)
    assert EmbeddingStore(tmp / "c").load(again.key(0, None, 0))  # rebuilt and valid again


def test_augmented_views_differ_and_each_epoch_draws_deterministically(setup):
    tmp, _, samples, model, pre = setup
    from graft.data.transforms import Augmentation, train_transform

    aug = Augmentation(hflip=True, rotation=40.0)
    cache = make_cache(model, tmp / "c", pre)
    views = torch.stack([cache.embed(samples, train_transform(pre, aug), view=v, augmentation=aug.__dict__, seed=0) for v in (1, 2, 3)], 1)
    assert not torch.equal(views[:, 0], views[:, 1])
    ds = EmbeddingDataset(views, [s.label for s in samples], seed=0)
    drawn = [ds[(0, epoch)][0] for epoch in range(12)]
    assert torch.equal(ds[(0, 5)][0], drawn[5])
    assert len({tuple(d[:3].tolist()) for d in drawn}) > 1  # different epochs draw different views


def test_a_flips_only_augmentation_caches_each_outcome_once(setup):
    """flip: the unflipped view (the evaluation embedding, shared) and the mirrored one, exactly;
    random draws would compute some outcomes twice and miss others."""
    tmp, _, samples, model, pre = setup
    from graft.data.images import load_image
    from graft.data.transforms import Augmentation
    from graft.tasks.classify.caches import training_views

    cache = make_cache(model, tmp / "c", pre)
    plain = cache.embed(samples, eval_transform(pre))
    cfg = parse_config({})
    views = training_views(cache, samples, pre, Augmentation(hflip=True), cfg, epochs=10)
    assert views.shape[1] == 2 and cache.computed == 2 * len(samples)  # one more pass per image, not cache_views
    assert torch.equal(views[:, 0], plain)
    model.eval()
    with torch.inference_mode():
        mirrored = model.backbone(torch.stack([eval_transform(pre)(load_image(s.path)).flip(-1) for s in samples]))
    torch.testing.assert_close(views[:, 1], mirrored)
    both = training_views(cache, samples, pre, Augmentation(hflip=True, vflip=True), cfg, epochs=10)
    assert both.shape[1] == 4 and torch.equal(both[:, :2], views)  # the outcomes already cached are reused
    ds = EmbeddingDataset(views, [s.label for s in samples], seed=0)
    drawn = [int(torch.equal(ds[(i, e)][0], views[i, 1])) for i in range(len(samples)) for e in range(8)]
    assert 0.3 < sum(drawn) / len(drawn) < 0.7  # each epoch flips about half of the images
    rotate = training_views(cache, samples, pre, Augmentation(hflip=True, rotation=30.0), cfg, epochs=10)
    assert rotate.shape[1] == cfg.train.cache_views  # anything else random: random views as before


def test_head_on_cached_embeddings_matches_the_slow_way(tmp_path):
    """Feature extraction with and without the cache: same accuracy, (nearly) the same head."""
    data = make_class_folders(tmp_path / "data", per_class=10)
    results = {}
    for cached in (True, False):
        cfg = tiny_config(data, model={"name": "test_resnet"}, data={"augment": "none"}, train={"strategy": "feature-extract", "epochs": 4, "embedding_cache": cached, "cache_dir": str(tmp_path / "cache")}, solver={"base_lr": 0.05})
        results[cached] = train(parse_config(cfg), tmp_path / f"run-{cached}", quiet=True)
    fast, slow = results[True], results[False]
    assert fast.metrics["val_accuracy"] == slow.metrics["val_accuracy"]
    assert [r["train_accuracy"] for r in fast.history] == [r["train_accuracy"] for r in slow.history]
    wf = load_file(str(fast.run_dir / "model.safetensors"))["head.fc.weight"]
    ws = load_file(str(slow.run_dir / "model.safetensors"))["head.fc.weight"]
    torch.testing.assert_close(wf, ws, atol=1e-4, rtol=1e-4)


def test_a_second_run_reuses_the_stored_embeddings(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=6)
    # Nothing left to decide (auto would embed everything before the run's own cache line).
    cfg = tiny_config(data, model={"name": "test_resnet"}, train={"strategy": "feature-extract", "epochs": 2, "cache_dir": str(tmp_path / "cache"), "head_lr": 0.01})
    train(parse_config(cfg), tmp_path / "a")
    first = capsys.readouterr().err
    train(parse_config(cfg), tmp_path / "b")
    second = capsys.readouterr().err
    assert "embedding cache: 0 image views through the backbone" in second
    assert "embedding cache: 0 image views" not in first


def test_random_resized_crops_give_the_same_run_with_or_without_the_decoded_cache(tmp_path):
    """The strong preset crops from the full-resolution file: caching must not change the result."""
    data = make_class_folders(tmp_path / "data", per_class=6)
    histories = []
    for mb in (2048, 0):
        cfg = tiny_config(data, model={"name": "test_resnet", "dropout": 0.0}, data={"augment": "strong", "decode_cache_mb": mb}, train={"strategy": "two-phase", "epochs": 2, "fine_tune_epochs": 2, "cache_dir": str(tmp_path / f"cache-{mb}")})
        histories.append([{k: v for k, v in r.items() if k != "seconds"} for r in train(parse_config(cfg), tmp_path / f"run-{mb}", quiet=True).history])
    assert histories[0] == histories[1]


def test_swapped_rows_in_a_store_file_are_detected(setup):
    """The checksum covers which row belongs to which file, not only the numbers."""
    tmp, _, samples, model, pre = setup
    cache = make_cache(model, tmp / "c", pre)
    cache.embed(samples, eval_transform(pre))
    path = cache.store.path(cache.key(0, None, 0))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    digests = json.loads(meta["digests"])
    digests[0], digests[1] = digests[1], digests[0]
    meta["digests"] = json.dumps(digests)
    save_file(load_file(str(path)), str(path), metadata=meta)
    assert EmbeddingStore(tmp / "c").load(cache.key(0, None, 0)) == {}


def test_a_rewritten_file_with_its_old_timestamp_gets_a_new_digest(tmp_path):
    import os

    from graft.io import file_digest

    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    first = file_digest(f)
    stat = os.stat(f)
    f.write_bytes(b"two")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -a do
    assert file_digest(f) != first
