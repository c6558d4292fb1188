"""One build path for every weight source, and a report of what each tensor became. Nothing here
touches the network: the hub path is exercised with a local file and with the hub forced offline."""

from __future__ import annotations

import pickle
import socket

import pytest
import torch
from safetensors.torch import save_file

from graft.configuration import ModelConfig
from graft.errors import WeightsError
from graft.models import backbones
from graft.models.backbones import (
    BUNDLED_ARCH,
    GraftClassifier,
    build_model,
    bundled_state_dict,
    create_backbone,
    read_weights_file,
)

NUM_CLASSES = 3


@pytest.fixture
def no_network(monkeypatch):
    """Hub offline the way huggingface_hub reads it (a module constant, read once at import: setting
    only the environment variable in a running process is not enough), an empty hub cache, and any
    attempt to resolve a host name recorded and refused."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert attempts == [], f"tried to reach the network: {attempts}"


def randomized_backbone(name: str = "test_efficientnet", seed: int = 123, **kwargs) -> torch.nn.Module:
    """A timm backbone whose every tensor differs from graft's seed-0 init (buffers included)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, **{"num_classes": 0, **kwargs})
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1 + 0.01)
    return model


def backbone_tensors(model: GraftClassifier) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ bundled


@pytest.fixture(scope="module")
def bundled():
    return bundled_state_dict()


def test_bundled_state_dict_fits_lite0(bundled):
    import timm

    reference = timm.create_model(BUNDLED_ARCH, pretrained=False).state_dict()
    assert len(bundled) == 296
    assert list(bundled) == list(reference)
    for k, v in bundled.items():
        assert v.shape == reference[k].shape, k
    assert bundled["classifier.weight"].shape == (1000, 1280)
    # positions mapped right: BatchNorm variances landed on variances (a few dead channels have 0)
    variances = torch.cat([v for k, v in bundled.items() if k.endswith("running_var")])
    assert bool((variances >= 0).all())
    assert float((variances > 0).float().mean()) > 0.99


def test_build_bundled_report():
    model, report = build_model(ModelConfig(), NUM_CLASSES)
    backbone_keys = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert report.matched == backbone_keys
    assert len(report.matched) == 294
    assert report.reinitialized == ["head.fc.weight", "head.fc.bias"]
    assert report.skipped == ["classifier.weight", "classifier.bias"]
    assert report.to_dict()["counts"] == {"matched": 294, "reinitialized": 2, "skipped": 2}
    assert "294 tensors loaded" in report.summary()
    assert model.head.fc.out_features == NUM_CLASSES
    assert model.num_features == 1280


def test_bundled_weights_recognise_a_cat():
    """The positional key mapping is right only if the ImageNet model still works."""
    import skimage.data as skimage_data  # a pinned dependency: missing means a broken install, not a skip
    from PIL import Image

    from graft.data.transforms import eval_transform, preprocessing_for

    model = backbones.imagenet_model()
    x = eval_transform(preprocessing_for(model))(Image.fromarray(skimage_data.chelsea()))[None]
    with torch.no_grad():
        top = int(model(x).argmax())
    assert 281 <= top <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_bundled_with_other_model_is_an_error():
    with pytest.raises(WeightsError) as info:
        build_model(ModelConfig(name="test_efficientnet", weights="bundled"), NUM_CLASSES)
    msg = str(info.value)
    assert "tf_efficientnet_lite0" in msg and "test_efficientnet" in msg
    assert "model.weights" in msg


# ------------------------------------------------------------------------------ none, determinism


def test_weights_none_report_and_seeded_build():
    a, report = build_model(ModelConfig(name="test_efficientnet", weights="none"), NUM_CLASSES, seed=4)
    b, _ = build_model(ModelConfig(name="test_efficientnet", weights="none"), NUM_CLASSES, seed=4)
    c, _ = build_model(ModelConfig(name="test_efficientnet", weights="none"), NUM_CLASSES, seed=5)
    assert report.reinitialized == list(a.state_dict())
    assert report.matched == [] and report.skipped == []
    assert_same(a.state_dict(), b.state_dict())
    assert not torch.equal(a.head.fc.weight, c.head.fc.weight)
    assert a.head.dropout.p == pytest.approx(0.2)


def test_architecture_only():
    model, report = build_model(ModelConfig(name="test_efficientnet", weights="/does/not/exist.pt"), NUM_CLASSES, load_weights=False)
    assert report.matched == [] and report.reinitialized == []
    assert isinstance(model, GraftClassifier)


# ------------------------------------------------------------------------------ local weights files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_backbone_file_loads(tmp_path, suffix):
    source = randomized_backbone()
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    model, report = build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    assert_same(backbone_tensors(model), state)
    assert report.source == str(path)
    assert report.matched == [f"backbone.{k}" for k in state]
    assert report.reinitialized == ["head.fc.weight", "head.fc.bias"]
    assert report.skipped == []


def test_local_full_timm_model_skips_its_classifier(tmp_path):
    source = randomized_backbone(num_classes=10)
    state = source.state_dict()
    assert "classifier.weight" in state
    path = tmp_path / "full.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, path)
    model, report = build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    assert sorted(report.skipped) == ["classifier.bias", "classifier.weight"]
    assert_same(backbone_tensors(model), {k: v for k, v in state.items() if not k.startswith("classifier.")})


def test_graft_format_same_classes_loads_head(tmp_path):
    source, _ = build_model(ModelConfig(name="test_efficientnet", weights="none"), NUM_CLASSES, seed=99)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    # a graft run folder holding model.safetensors is accepted too
    for weights in (path, tmp_path):
        model, report = build_model(ModelConfig(name="test_efficientnet", weights=str(weights)), NUM_CLASSES, seed=0)
        assert_same(model.state_dict(), source.state_dict())
        assert report.reinitialized == []
        assert "head.fc.weight" in report.matched and "head.fc.bias" in report.matched
        assert report.notes == []


def test_graft_format_other_classes_starts_head_fresh(tmp_path):
    source, _ = build_model(ModelConfig(name="test_efficientnet", weights="none"), 5, seed=99)
    path = tmp_path / "five.pt"
    torch.save(source.state_dict(), path)
    model, report = build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES, seed=0)
    assert_same(backbone_tensors(model), backbone_tensors(source))
    assert report.reinitialized == ["head.fc.weight", "head.fc.bias"]
    assert sorted(report.skipped) == ["head.fc.bias", "head.fc.weight"]
    assert len(report.notes) == 2 and all("starts fresh" in n for n in report.notes)
    assert any("(5, 256)" in n and "(3, 256)" in n for n in report.notes)
    assert model.head.fc.out_features == NUM_CLASSES


def test_wrong_backbone_is_a_weights_error(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in randomized_backbone("test_resnet").state_dict().items()}, str(path))
    with pytest.raises(WeightsError) as info:
        build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    msg = str(info.value)
    assert "test_efficientnet" in msg
    assert "--model" in msg
    assert str(path) in msg
    assert "do not fit" in msg or "do not match" in msg
    assert "Error(s) in loading state_dict" not in msg and "Traceback" not in msg
    assert info.value.__cause__ is None


def test_missing_and_unexpected_tensors_are_a_weights_error(tmp_path):
    state = randomized_backbone().state_dict()
    del state["conv_head.weight"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    msg = str(info.value)
    assert "1 backbone tensors missing (e.g. backbone.conv_head.weight)" in msg
    assert "1 unexpected tensors (e.g. extra.weight)" in msg
    assert "test_efficientnet" in msg and "--model" in msg


def test_wrong_shape_is_a_weights_error(tmp_path):
    state = randomized_backbone().state_dict()
    state["conv_head.weight"] = torch.zeros(7, 7, 1, 1)
    path = tmp_path / "bad_shape.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    msg = str(info.value)
    assert "conv_head.weight" in msg and "(7, 7, 1, 1)" in msg
    assert "test_efficientnet" in msg and "--model" in msg


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="not found") as info:
        build_model(ModelConfig(name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="without model.safetensors") as info:
        read_weights_file(tmp_path)
    assert str(tmp_path) in str(info.value)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.parametrize(
    "name, payload, expected",
    [
        ("strings.pt", "torch", "does not hold a state dict of tensors"),
        ("corrupt.pt", b"PK\x03\x04 this is not a checkpoint", "cannot read weights file"),
        ("corrupt.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "cannot read weights file"),
        ("code.pkl", "pickle", "cannot read weights file"),
    ],
)
def test_unreadable_weights_file_names_it(tmp_path, capsys, name, payload, expected):
    path = tmp_path / name
    if payload == "torch":
        torch.save({"conv_stem.weight": torch.zeros(1), "note": "a string"}, path)
    elif payload == "pickle":
        path.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    else:
        path.write_bytes(payload)
    with pytest.raises(WeightsError, match=expected) as info:
        read_weights_file(path)
    assert str(path) in str(info.value)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_reinit_after_loading_is_reported(tmp_path):
    state = randomized_backbone().state_dict()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    cfg = ModelConfig(name="test_efficientnet", weights=str(path), reinit=["backbone.conv_head", "backbone.blocks.4.*.bn3"])
    model, report = build_model(cfg, NUM_CLASSES)
    again = ["backbone.conv_head.weight"] + [f"backbone.blocks.4.0.bn3.{t}" for t in ("weight", "bias", "running_mean", "running_var")]
    for k in again:
        assert k in report.reinitialized, k
        assert k not in report.matched, k
        assert not torch.equal(model.state_dict()[k], state[k.removeprefix("backbone.")]), k
    assert set(report.matched) | set(report.reinitialized) == set(model.state_dict())
    # everything else is exactly what was loaded
    for k, v in backbone_tensors(model).items():
        if f"backbone.{k}" not in report.reinitialized:
            assert torch.equal(v, state[k]), k
    assert any("backbone.conv_head" in n for n in report.notes)


def test_reinit_pattern_matching_nothing(tmp_path):
    from graft.errors import ConfigError

    with pytest.raises(ConfigError, match="backbone.blocks.42"):
        build_model(ModelConfig(name="test_efficientnet", weights="none", reinit=["backbone.blocks.42"]), NUM_CLASSES)


# ------------------------------------------------------------------------------ hub, kept offline


def test_hub_loader_with_local_file(tmp_path, no_network):
    source = randomized_backbone(num_classes=1000)  # the pretrained_cfg's class count: timm drops the classifier
    state = source.state_dict()
    path = tmp_path / "test_efficientnet.pth"
    torch.save(state, path)
    loaded = create_backbone("test_efficientnet", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))  # offline: HF_HUB_OFFLINE, sockets refused
    expected = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    assert_same(loaded.state_dict(), expected)
    assert loaded.num_classes == 0


def test_hub_offline_is_a_weights_error(no_network):
    with pytest.raises(WeightsError) as info:
        create_backbone("test_efficientnet", pretrained=True)  # offline: HF_HUB_OFFLINE, sockets refused
    msg = str(info.value)
    assert "test_efficientnet" in msg
    assert "download them elsewhere" in msg and "--weights" in msg


def test_build_model_hub_offline_is_a_weights_error(no_network):
    with pytest.raises(WeightsError, match="--weights"):
        build_model(ModelConfig(name="test_efficientnet", weights="hub"), NUM_CLASSES)


def test_unknown_model_name_suggests():
    with pytest.raises(WeightsError) as info:
        create_backbone("test_efficientnett")
    msg = str(info.value)
    assert "unknown backbone 'test_efficientnett'" in msg
    assert "did you mean" in msg and "test_efficientnet" in msg
    with pytest.raises(WeightsError, match="timm.list_models"):
        build_model(ModelConfig(name="qqqqqqqqqqqqqqqqqqqq", weights="none"), NUM_CLASSES)
