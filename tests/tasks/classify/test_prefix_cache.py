"""The frozen-prefix cache: fine-tuning the top without augmentation runs only the top each epoch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from graft.configuration import ModelConfig, parse_config
from graft.models.backbones import build_model
from graft.tasks.classify.prefix import backbone_units, chain_matches
from graft.pipeline.train import train
from helpers import make_class_folders, tiny_config


@pytest.mark.parametrize("name, supported", [("test_efficientnet", True), ("test_resnet", True), ("tf_efficientnet_lite0", True), ("test_vit", False)])
def test_known_block_structures_are_recognised_and_checked(name, supported):
    model, _ = build_model(ModelConfig(name=name, weights="none"), 2)
    units = backbone_units(model.backbone)
    assert (units is not None and chain_matches(model.backbone, units, 64)) == supported


def test_a_chain_that_differs_from_the_forward_is_rejected():
    model, _ = build_model(ModelConfig(name="test_resnet", weights="none"), 2)
    units = backbone_units(model.backbone)
    assert chain_matches(model.backbone, units, 64)
    assert not chain_matches(model.backbone, units[:-1], 64)  # pooling left out
    assert not chain_matches(model.backbone, units[:5] + units[6:], 64)  # a residual block left out


def fine_tune(data, tmp_path, name, *, prefix_cache=True, augment="none", budget=1024, hooks=(), **train_opts):
    cfg = tiny_config(data, model={"name": "test_resnet"}, data={"augment": augment}, train={"strategy": "fine-tune", "epochs": 3, "fine_tune_at": -6, "prefix_cache": prefix_cache, "prefix_cache_mb": budget, **train_opts}, solver={"base_lr": 0.01})
    return train(parse_config(cfg), tmp_path / name, hooks=list(hooks))


@pytest.fixture
def data(tmp_path):
    return make_class_folders(tmp_path / "data", per_class=8)


def test_prefix_cache_trains_like_the_whole_network(data, tmp_path, capsys):
    fast = fine_tune(data, tmp_path, "fast")
    log = capsys.readouterr().err
    slow = fine_tune(data, tmp_path, "slow", prefix_cache=False)
    assert "prefix cache:" in log and "computed once" in log
    assert fast.metrics["val_accuracy"] == slow.metrics["val_accuracy"]
    for a, b in zip(fast.history, slow.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2, abs=2e-3)
    wf, ws = load_file(str(fast.run_dir / "model.safetensors")), load_file(str(slow.run_dir / "model.safetensors"))
    assert torch.equal(wf["backbone.conv1.0.weight"], ws["backbone.conv1.0.weight"])  # the frozen bottom is untouched in both
    torch.testing.assert_close(wf["head.fc.weight"], ws["head.fc.weight"], atol=5e-3, rtol=5e-2)  # fp16 activations: close, not equal


def test_over_budget_falls_back_to_the_whole_network(data, tmp_path, capsys):
    result = fine_tune(data, tmp_path, "b", budget=0.001)
    assert "exceed train.prefix_cache_mb" in capsys.readouterr().err
    assert result.metrics["val_accuracy"] is not None


def test_never_used_with_augmentation_beyond_flips(data, tmp_path, capsys):
    fine_tune(data, tmp_path, "aug", augment="flip-rotate")
    assert "prefix cache:" not in capsys.readouterr().err


def test_with_flips_each_outcome_is_cached_once_and_epochs_draw_both(data, tmp_path, capsys, monkeypatch):
    """A flip has two outcomes: the prefix's activations of each are computed once (the second is
    the prefix of the mirrored image, not a mirrored activation) and each epoch draws one per
    image, both over the run, as a random flip would."""
    from torch import nn

    from graft.data.dataset import ImageDataset
    from graft.data.transforms import flipped_transform
    from graft.tasks.classify.prefix import PrefixActivations

    built = []
    real = PrefixActivations.phase_data
    monkeypatch.setattr(PrefixActivations, "phase_data", lambda self, phase: built.append((self, real(self, phase))) or built[-1][1])
    result = fine_tune(data, tmp_path, "flip", augment="flip")
    assert "(2 flips each)" in capsys.readouterr().err and result.metrics["val_accuracy"] is not None
    source, phase_data = built[0]
    train = phase_data.train
    assert train.embeddings.shape[:2] == (len(source.splits.train), 2) and train.embeddings.dtype == torch.float16
    assert {train.view(i, epoch) for i in range(len(train)) for epoch in range(3)} == {0, 1}
    prefix = nn.Sequential(*[u for _, u in source.units[: source.cut]]).eval()  # frozen: unchanged by training
    for view, hflip in ((0, False), (1, True)):
        image, _ = ImageDataset(source.splits.train[:1], flipped_transform(source.pre, hflip, False))[0]
        with torch.inference_mode():
            expected = prefix(image[None])[0]
        torch.testing.assert_close(train.embeddings[0, view].float(), expected, atol=2e-2, rtol=2e-2)


def test_resume_with_the_prefix_cache_is_exact(data, tmp_path):
    full = fine_tune(data, tmp_path, "full")
    resumed = train(None, tmp_path / "resumed", resume=full.run_dir / "snapshots" / "epoch-0001", quiet=True)
    a, b = load_file(str(full.run_dir / "model.safetensors")), load_file(str(resumed.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_trains_to_the_same_result(data, tmp_path):
    """The memory format (on by default on CUDA) changes layout, not what is learned."""
    a = fine_tune(data, tmp_path, "cl", prefix_cache=False, channels_last=True)
    b = fine_tune(data, tmp_path, "nchw", prefix_cache=False, channels_last=False)
    wa, wb = load_file(str(a.run_dir / "model.safetensors")), load_file(str(b.run_dir / "model.safetensors"))
    torch.testing.assert_close(wa["head.fc.weight"], wb["head.fc.weight"], atol=1e-4, rtol=1e-3)
    assert a.metrics["val_accuracy"] == b.metrics["val_accuracy"]


def test_over_budget_final_metrics_do_not_build_activations(data, tmp_path, monkeypatch):
    from graft.tasks.classify.prefix import PrefixActivations

    built = []
    real = PrefixActivations._activations
    monkeypatch.setattr(PrefixActivations, "_activations", lambda self, *a, **k: built.append(1) or real(self, *a, **k))
    result = fine_tune(data, tmp_path, "nb", budget=0.001)
    assert built == [] and result.metrics["val_accuracy"] is not None


def test_class_statistics_after_fine_tuning_come_from_the_prefix_and_match_a_full_pass(data, tmp_path):
    """With the prefix cached, the class statistics of the fine-tuned model run only its top; they
    must describe the same embeddings a full inference pass of the final model gives."""
    from graft.data.transforms import eval_transform
    from graft.pipeline.predict import load_run
    from graft.tasks.classify.class_stats import FILE_NAME, ClassStats
    from graft.tasks.classify.embeddings import EmbeddingCache

    fast = fine_tune(data, tmp_path, "fast")
    stats = ClassStats.load(fast.run_dir / FILE_NAME)
    run = load_run(fast.run_dir, device="cpu")
    from graft.data.samples import DatasetSplits
    import json

    splits = DatasetSplits.from_json(json.loads((fast.run_dir / "splits.json").read_text()))
    full = EmbeddingCache(run.model.backbone, root=None, spec={}, device=torch.device("cpu")).embed(splits.train, eval_transform(run.preprocessing))
    labels = torch.tensor([s.label for s in splits.train])
    for c in range(len(splits.classes)):
        torch.testing.assert_close(stats.mean[c].float(), full[labels == c].mean(0), atol=2e-2, rtol=2e-2)
