"""``auto`` decided from the data: augmentation and the head's rate, on the validation split only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from graft.cli import main
from graft.configuration import parse_config
from graft.train.autotune import AUTO_AUGMENTS, HEAD_LRS
from graft.train.runner import train
from helpers import make_class_folders, tiny_config


def make_mirrored_classes(root: Path, per_class: int = 14, seed: int = 0) -> Path:
    """Two classes that are mirror images of each other (stripes rising '/' vs falling '\\'): a
    horizontal flip turns one class into the other, as it turns a 'b' into a 'd'."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:40]
    for name, sign in (("rising", 1), ("falling", -1)):
        for i in range(per_class):
            stripes = np.sin((x + sign * y) * 2 * np.pi / 8 + rng.uniform(0, 2 * np.pi))
            pixels = 128 + 90 * stripes[..., None] + rng.normal(0, 20, size=(40, 40, 3))
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def auto_config(data: Path, tmp_path: Path, **train_keys) -> dict:
    return tiny_config(
        data,
        data={"augment": "auto", "val_fraction": 0.3},
        model={"name": "test_resnet", "dropout": 0.0},
        train={"strategy": "feature-extract", "epochs": 2, "cache_dir": str(tmp_path / "cache"), **train_keys},
    )


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mirrored")
    data = make_mirrored_classes(tmp / "data")
    result = train(parse_config(auto_config(data, tmp)), tmp / "run", quiet=True)
    return tmp, data, result


def test_a_flip_that_turns_one_class_into_another_is_not_chosen(mirrored_run):
    _, _, result = mirrored_run
    decided = result.metrics["decided"]
    best_loss = {a: min(t["val_loss"] for t in decided["trials"] if t["augment"] == a) for a in ("none", "flip")}
    assert decided["augment"] == "none"
    assert best_loss["flip"] > best_loss["none"]  # flipped views carry the other class's label
    # flip was no better than none, so the stronger flip-rotate was not tried
    assert {(t["augment"], t["lr"]) for t in decided["trials"]} == {(a, lr) for a in ("none", "flip") for lr in HEAD_LRS}


@pytest.mark.parametrize("flip_helps, tried", [(True, AUTO_AUGMENTS), (False, ("none", "flip"))])
def test_a_stronger_augmentation_is_tried_only_while_augmenting_helps(monkeypatch, tmp_path, flip_helps, tried):
    import torch

    from graft.data.folder import scan_folder
    from graft.data.transforms import preprocessing_for
    from graft.models.backbones import build_model
    from graft.train import autotune, caches
    from graft.train.autotune import Trial

    score = {"none": 0.8, "flip": 0.9 if flip_helps else 0.7, "flip-rotate": 0.85}
    monkeypatch.setattr(caches, "training_views", lambda cache, samples, *a, **k: torch.zeros(len(samples), 1, 8))
    monkeypatch.setattr(autotune, "_trial", lambda cfg, m, h, tr, va, aug, lr, ep, dev: Trial(aug, lr, score[aug] + lr, 0.5, ep))

    class Cache:
        def embed(self, samples, transform, **kw):
            return torch.zeros(len(samples), 8)

    data = make_class_folders(tmp_path / "data", per_class=5)
    cfg = parse_config(auto_config(data, tmp_path))
    splits = scan_folder(data, val_fraction=0.3, seed=0)
    model, _ = build_model(cfg.model, 3, load_weights=False)
    d = autotune.decide(cfg, model, splits, preprocessing_for(model.backbone), Cache(), device=torch.device("cpu"), has_head_phase=True, say=lambda m: None)
    assert tuple(dict.fromkeys(t.augment for t in d.trials)) == tried
    assert d.augment == ("flip" if flip_helps else "none") and d.head_lr == max(HEAD_LRS)


def test_the_decision_is_stored_in_config_metrics_and_model(mirrored_run):
    tmp, _, result = mirrored_run
    run = tmp / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    decided = result.metrics["decided"]
    assert saved["data"]["augment"] == decided["augment"] == "none"
    assert saved["train"]["head_lr"] == decided["head_lr"] in HEAD_LRS
    assert json.loads((run / "model.json").read_text())["decided"] == decided
    assert json.loads((run / "metrics.json").read_text())["decided"] == decided


def test_the_chosen_trial_is_exactly_the_runs_frozen_phase(mirrored_run):
    """The search trains the head as phase 1 trains it: same init, seed, data and rate."""
    _, _, result = mirrored_run
    decided = result.metrics["decided"]
    chosen = [t for t in decided["trials"] if t["augment"] == decided["augment"] and t["lr"] == decided["head_lr"]]
    last = result.history[-1]
    assert last["lr"] == decided["head_lr"] or result.history[0]["lr"] == decided["head_lr"]
    assert chosen[0]["val_accuracy"] == last["val_accuracy"]
    assert chosen[0]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_a_resumed_run_does_not_decide_again(mirrored_run, tmp_path, capsys):
    tmp, _, result = mirrored_run
    assert main(["train", "--resume", str(tmp / "run" / "snapshots" / "epoch-0001"), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "auto:" not in err
    again = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert again["decided"] == result.metrics["decided"]  # carried by the snapshot
    assert again["val_accuracy"] == result.metrics["val_accuracy"]


def test_what_the_user_set_is_not_searched(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=6)
    cfg = auto_config(data, tmp_path)
    cfg["data"]["augment"] = "flip"
    result = train(parse_config(cfg), tmp_path / "a")
    decided = result.metrics["decided"]
    assert decided["augment"] is None and {t["augment"] for t in decided["trials"]} == {"flip"}
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["data"]["augment"] == "flip"
    assert "auto: head lr" in capsys.readouterr().err

    cfg = auto_config(data, tmp_path, head_lr=0.02)
    result = train(parse_config(cfg), tmp_path / "b", quiet=True)
    decided = result.metrics["decided"]
    assert decided["head_lr"] is None and {t["lr"] for t in decided["trials"]} == {0.02}
    assert result.history[0]["lr"] == pytest.approx(0.02)

    cfg = auto_config(data, tmp_path, head_lr=0.02)
    cfg["data"]["augment"] = "none"
    result = train(parse_config(cfg), tmp_path / "c", quiet=True)
    assert "decided" not in result.metrics  # nothing was auto

    cfg = auto_config(data, tmp_path)  # head lr auto, but no frozen-base phase to use a head rate in
    cfg["data"]["augment"] = "none"
    cfg["train"].update(strategy="fine-tune", epochs=1)
    capsys.readouterr()
    result = train(parse_config(cfg), tmp_path / "d")
    assert result.metrics["decided"]["trials"] == [] and "auto:" not in capsys.readouterr().err


def test_without_validation_images_auto_falls_back_to_no_augmentation(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=4)
    cfg = auto_config(data, tmp_path)
    cfg["data"]["val_fraction"] = 0.0
    result = train(parse_config(cfg), tmp_path / "a")
    assert result.metrics["decided"]["augment"] == "none"
    assert result.metrics["decided"]["head_lr"] == pytest.approx(cfg["solver"]["base_lr"])
    assert result.metrics["decided"]["trials"] == []
    assert "no validation images to decide on" in capsys.readouterr().err


def test_plan_shows_what_is_auto_and_decides_on_request(tmp_path, capsys):
    data = make_mirrored_classes(tmp_path / "data", per_class=8)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(auto_config(data, tmp_path)))
    assert main(["plan", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "augmentation: auto, decided when training starts" in out and "head lr: auto" in out
    assert main(["plan", "--config", str(cfg_file), "--decide", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    decided = plan["auto"]["decided"]
    assert decided["augment"] in AUTO_AUGMENTS and len(decided["trials"]) in (2 * len(HEAD_LRS), 3 * len(HEAD_LRS))
    assert plan["phases"][0]["lr"] == decided["head_lr"]  # the phases are planned with the decision
    assert main(["plan", "--config", str(cfg_file), "--decide"]) == 0
    assert "auto: augmentation" in capsys.readouterr().out


def test_a_tie_goes_to_the_earlier_weaker_candidate():
    """Equal validation figures are no evidence that more augmentation helps: the earlier candidate
    wins, so the search stops there (classifiers and detectors alike)."""
    from graft.detection.autotune import DetectionTrial, best_trial
    from graft.train.autotune import Trial, _best

    none, flip = Trial("none", 1e-3, 0.9, 0.3, 5), Trial("flip", 1e-3, 0.9, 0.3, 5)
    assert _best([none, flip]) is none and _best([none, Trial("flip", 1e-3, 0.9, 0.2, 5)]).augment == "flip"
    zero = [DetectionTrial(name, 0.0, 0.0, 1) for name in ("none", "flip")]
    assert best_trial(zero) is zero[0] and best_trial([zero[0], DetectionTrial("flip", 0.01, 0.0, 1)]).augment == "flip"
