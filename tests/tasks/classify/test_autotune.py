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
from graft.tasks.classify.autotune import AUTO_AUGMENTS, HEAD_LRS
from graft.pipeline.train import train
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
        model={"name": "test_resnet", "dropout": 0.2},
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
    assert {(t["augment"], t["lr"]) for t in decided["trials"]} == {(a, lr) for a in ("none", "flip") for lr in HEAD_LRS}


def _search_parts(tmp_path: Path, dropout: float = 0.0):
    import torch

    from graft.data.folder import scan_folder
    from graft.data.transforms import preprocessing_for
    from graft.models.backbones import build_model
    from graft.tasks.classify.caches import embedding_cache

    data = make_class_folders(tmp_path / "data", per_class=8)
    cfg = parse_config(auto_config(data, tmp_path))
    cfg.model.dropout = dropout
    splits = scan_folder(data, val_fraction=0.3, seed=0)
    model, _ = build_model(cfg.model, 3, load_weights=False)
    pre = preprocessing_for(model.backbone)
    pre = type(pre)(**{**pre.to_dict(), "input_size": cfg.data.img_size})
    cache = embedding_cache(cfg, model, pre, torch.device("cpu"), 0, stored=False)
    return cfg, model, splits, pre, cache


def test_deciding_costs_at_most_one_extra_backbone_pass(tmp_path):
    """Both candidates and every head rate are tried, and the backbone sees each training image
    twice (its own view and the flipped one) and each validation image once: the run needs the
    first view and the validation images anyway."""
    import torch

    from graft.tasks.classify import autotune

    cfg, model, splits, pre, cache = _search_parts(tmp_path)
    d = autotune.decide(cfg, model, splits, pre, cache, device=torch.device("cpu"), has_head_phase=True, say=lambda m: None)
    assert {(t.augment, t.lr) for t in d.trials} == {(a, lr) for a in AUTO_AUGMENTS for lr in HEAD_LRS}
    assert cache.computed == 2 * len(splits.train) + len(splits.val)


def test_every_head_rate_learns_in_one_pass_as_it_would_alone(tmp_path):
    """The head copies of one pass share batches and the dropout mask but no parameter: each
    scores exactly what a run of its rate alone scores (dropout on, so the mask matters)."""
    import copy

    import torch

    from graft.data.transforms import eval_transform
    from graft.tasks.classify.autotune import _train_heads
    from graft.tasks.classify.embeddings import EmbeddingDataset

    cfg, model, splits, pre, cache = _search_parts(tmp_path, dropout=0.5)
    train = EmbeddingDataset(cache.embed(splits.train, eval_transform(pre)), [s.label for s in splits.train], seed=0)
    val = EmbeddingDataset(cache.embed(splits.val, eval_transform(pre)), [s.label for s in splits.val])
    head = copy.deepcopy(model.head.state_dict())
    cpu = torch.device("cpu")
    together = _train_heads(cfg, model, head, train, val, "none", (1e-3, 3e-2), 3, cpu)
    alone = [_train_heads(cfg, model, head, train, val, "none", (lr,), 3, cpu)[0] for lr in (1e-3, 3e-2)]
    assert [(t.lr, t.val_accuracy, t.epoch) for t in together] == [(t.lr, t.val_accuracy, t.epoch) for t in alone]
    assert [t.val_loss for t in together] == pytest.approx([t.val_loss for t in alone], rel=1e-6)
    assert together[0].val_loss != pytest.approx(together[1].val_loss)  # the rates did differ


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
    assert decided["augment"] in AUTO_AUGMENTS and len(decided["trials"]) == len(AUTO_AUGMENTS) * len(HEAD_LRS)
    assert plan["phases"][0]["lr"] == decided["head_lr"]  # the phases are planned with the decision
    assert main(["plan", "--config", str(cfg_file), "--decide"]) == 0
    assert "auto: augmentation" in capsys.readouterr().out


def test_a_tie_goes_to_the_earlier_weaker_candidate():
    """Equal validation figures are no evidence that more augmentation helps: the earlier candidate
    wins, so the search stops there (classifiers and detectors alike)."""
    from graft.tasks.detect.autotune import DetectionTrial, best_trial
    from graft.tasks.classify.autotune import Trial, _best

    none, flip = Trial("none", 1e-3, 0.9, 0.3, 5), Trial("flip", 1e-3, 0.9, 0.3, 5)
    assert _best([none, flip]) is none and _best([none, Trial("flip", 1e-3, 0.9, 0.2, 5)]).augment == "flip"
    zero = [DetectionTrial(name, 0.0, 0.0, 1) for name in ("none", "flip")]
    assert best_trial(zero) is zero[0] and best_trial([zero[0], DetectionTrial("flip", 0.01, 0.0, 1)]).augment == "flip"


def test_under_early_stopping_each_rate_is_scored_on_the_epoch_the_run_would_keep(tmp_path):
    """With patience, a head copy stops counting once the run would have stopped, and is scored on
    its best epoch: the chosen trial's epoch and figures are those the run restores."""
    data = make_mirrored_classes(tmp_path / "data", per_class=10)
    cfg = auto_config(data, tmp_path, epochs=8, early_stopping=1, early_stopping_monitor="val_accuracy")
    cfg["data"]["augment"] = "none"
    result = train(parse_config(cfg), tmp_path / "run", quiet=True)
    decided, stopping = result.metrics["decided"], result.metrics["early_stopping"]["phases"][0]
    assert stopping["stopped_early"] and all(t["epoch"] < 8 for t in decided["trials"])  # the copies stopped too
    chosen = next(t for t in decided["trials"] if t["lr"] == decided["head_lr"])
    assert chosen["epoch"] == stopping["best_epoch"]
    row = result.history[stopping["best_epoch"] - 1]
    assert chosen["val_accuracy"] == row["val_accuracy"]
    assert chosen["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5)
