"""torchvision's detectors by name, with ``--weights coco`` tested offline: a weights file written
where torchvision's weights enum looks for it (the torch hub cache) is what a user's first
download would have left there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision.models import get_model, get_model_weights

from box_data import three_splits, write_yolo
from graft.cli import main
from graft.tasks.detect.torchvision_models import _freeze_batchnorm

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture
def coco_file(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A COCO-shaped state dict (91 classes, frozen BatchNorm body) in a private torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    model = get_model(NAME, weights=None, weights_backbone=None, num_classes=91)
    _freeze_batchnorm(model.backbone.body)
    state = model.state_dict()
    url = get_model_weights(NAME).DEFAULT.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


def test_coco_weights_load_from_the_hub_cache_and_the_predictor_is_replaced(coco_file, tmp_path, capsys) -> None:
    data = write_yolo(tmp_path / "data", three_splits(n_train=6, n_val=2, n_test=0))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--model", NAME, "--weights", "coco", "--img-size", "64", "--epochs", "1", "--fine-tune-epochs", "0",
                 "--batch-size", "2", "--set", "data.num_workers=0", "--set", "train.device=cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "weights_report.json").read_text())
    assert report["source"].startswith(f"torchvision:{NAME}")
    trained = load_file(str(out / "model.safetensors"))
    # the frozen body kept COCO's weights exactly; the class predictor is new and sized for 2 classes + background
    body = [k for k in coco_file if k.startswith("backbone.body.")]
    assert body and all(torch.equal(trained[k], coco_file[k]) for k in body)
    assert trained["detector.roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    assert coco_file["roi_heads.box_predictor.cls_score.weight"].shape[0] == 91
    info = json.loads((out / "model.json").read_text())
    assert info["detector"]["head"] == "fasterrcnn" and info["detector"]["frozen_bn"] is True
    code = main(["eval", str(out), "--data", str(data), "--device", "cpu"])  # the run loads back
    assert code == 0


def test_ssdlite_by_name_loads_coco_weights_keeps_the_backbone_and_trains(tmp_path, monkeypatch, capsys) -> None:
    """SSDlite has no FPN: its MobileNetV3 stages become graft's backbone, its extra layers the
    neck; the COCO classification head is replaced (softmax with background, added by graft)."""
    name = "ssdlite320_mobilenet_v3_large"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    coco = get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()
    target = Path(torch.hub.get_dir()) / "checkpoints" / get_model_weights(name).DEFAULT.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(coco, target)
    data = write_yolo(tmp_path / "data", three_splits(n_train=6, n_val=2, n_test=0))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--model", name, "--weights", "coco", "--img-size", "96", "--epochs", "1", "--fine-tune-epochs", "1",
                 "--augment", "none", "--batch-size", "2", "--set", "data.num_workers=0", "--set", "train.device=cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    trained = load_file(str(out / "model.safetensors"))
    stages = [k for k in coco if k.startswith("backbone.features.") and "running" not in k and "num_batches" not in k]
    assert stages and all(torch.equal(trained["backbone." + k.removeprefix("backbone.")], coco[k]) for k in stages[:40])  # early stages stay frozen
    cls = [k for k in trained if k.startswith("detector.head.classification_head.") and k.endswith("weight") and trained[k].ndim == 4]
    # the last conv of each level's classifier: 6 anchors x (2 classes + background) outputs (COCO's had 6 x 91)
    assert trained[cls[-1]].shape[0] == 6 * 3 and coco[cls[-1].removeprefix("detector.")].shape[0] == 6 * 91
    assert any(k.startswith("detector.backbone.fpn.extra.") for k in trained)  # the extra layers sit in the neck
    info = json.loads((out / "model.json").read_text())
    assert info["detector"]["head"] == "ssd" and info["detector"]["label_offset"] == 1
    assert main(["predict", str(out), str(data / "images" / "val"), "--format", "csv", "--conf", "0.0", "--device", "cpu"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("path,label,score") and len(rows) > 1 and all(r.split(",")[1] in ("disc", "square") for r in rows[1:])
