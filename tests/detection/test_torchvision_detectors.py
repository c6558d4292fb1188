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
from graft.detection.torchvision_models import _freeze_batchnorm

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
