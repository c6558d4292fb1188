"""The frozen phase's backbone-feature cache (graft.tasks.detect.cache)."""

from __future__ import annotations

import pytest
import torch

from box_data import three_splits, write_voc
from graft.configuration import parse_config
from graft.tasks.detect.build import build_detection_model
from graft.tasks.detect.cache import build_feature_cache
from graft.tasks.detect.data import scan_detection
from graft.tasks.detect.dataset import BoxAugment, BoxDataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_voc(tmp_path_factory.mktemp("boxes") / "voc", three_splits(n_train=6, n_val=2, n_test=2))
    splits = scan_detection(root, val_fraction=0.0, test_fraction=0.0, seed=0)
    cfg = parse_config({"task": "detect", "model": {"name": "test_efficientnet", "weights": "none"}, "data": {"img_size": 64}})
    model, _ = build_detection_model(cfg, len(splits.classes), seed=0)
    return splits.train, model.eval()


def cache_of(model, dataset, views, tmp_path):
    return build_feature_cache(model, dataset, views=views, seed=0, device=torch.device("cpu"), amp=False, budget_mb=64, cache_dir=tmp_path)


def test_a_flips_only_augmentation_caches_each_outcome_once(setup, tmp_path) -> None:
    """flip: the unflipped and the mirrored image, boxes mirrored with it, each once; random draws
    (cache_views of them) would compute some outcomes twice and miss others."""
    samples, model = setup
    plain = BoxDataset(samples, 64)
    cache = cache_of(model, BoxDataset(samples, 64, BoxAugment(hflip=True)), 4, tmp_path)
    assert cache.views == 2 and len(cache.flat) == 2 * len(samples)
    image, target = plain[0]
    with torch.no_grad():
        direct = model.backbone_features(image[None])
        mirrored = model.backbone_features(image.flip(-1)[None])
    for key, expected in (((0, 0), direct), ((0, 1), mirrored)):  # FeatureCache rows by (image, view)
        index, view = key
        row = cache.flat[index * cache.views + view]
        got = torch.cat([m.flatten() for m in expected]).half()
        torch.testing.assert_close(row, got, atol=2e-3, rtol=2e-3)
    boxes, flipped = target["boxes"], cache.targets[1]["boxes"]
    assert torch.equal(cache.targets[0]["boxes"], boxes)
    torch.testing.assert_close(flipped, torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], 1))
    drawn = [cache[(i, e)][1]["boxes"] for i in range(len(samples)) for e in range(8)]
    share = sum(not torch.equal(b, cache.targets[2 * (k // 8)]["boxes"]) for k, b in enumerate(drawn)) / len(drawn)
    assert 0.25 < share < 0.75  # each epoch flips about half of the images


def test_other_augmentations_keep_random_views(setup, tmp_path) -> None:
    samples, model = setup
    cache = cache_of(model, BoxDataset(samples, 64, BoxAugment(hflip=True, scale=(0.8, 1.2))), 3, tmp_path)
    assert cache.views == 3
    assert cache_of(model, BoxDataset(samples, 64), 4, tmp_path).views == 1


def test_a_spill_without_room_on_the_disk_keeps_the_features_in_memory(setup, small_disk, capsys) -> None:
    """Over detect.cache_mb the features go to a file whose blocks are reserved first: on a full
    disk that fails cleanly (a memory-mapped write would die of SIGBUS) and the run goes on."""
    samples, model = setup
    dataset = BoxDataset(samples, 64)
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # the disk, full to the last block
        try:
            while True:
                filler.write(bytes(4096))
        except OSError:
            pass
    spilled = build_feature_cache(model, dataset, views=1, seed=0, device=torch.device("cpu"), amp=False, budget_mb=0, cache_dir=small_disk / "features")
    assert "feature cache: no room on disk in" in capsys.readouterr().err
    assert spilled.file is None and list((small_disk / "features").iterdir()) == []
    in_memory = cache_of(model, dataset, 1, small_disk)
    assert torch.equal(spilled.flat, in_memory.flat)
    spilled.close()
    in_memory.close()
