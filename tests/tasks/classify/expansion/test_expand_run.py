"""`graft expand` end to end on a tiny model: an original run on three colour classes, expanded
with two new colours. Frozen mode must leave the old logits bit-identical; the new classes must
learn; expansions chain, resume exactly, and reject bad input with one clear line."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import graft
from graft.cli import main
from graft.configuration import parse_config
from graft.tasks.classify.class_stats import ClassStats
from graft.pipeline.train import train
from helpers import COLOURS, make_class_folders, tiny_config

OLD = ["blue", "green", "red"]  # the original run's classes (sorted folder names)
NEW_COLOURS = {"yellow": (220, 220, 40), "purple": (150, 40, 180)}
NEW = sorted(NEW_COLOURS)  # ["purple", "yellow"]: appended after the old classes, sorted
EPOCHS = 4  # of the main expansion; snapshots every epoch


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A feature-extract run on red/green/blue (20 images each) that is clearly above chance,
    and a NEW folder with two new colours."""
    root = tmp_path_factory.mktemp("expand")
    data = make_class_folders(root / "data", per_class=20, seed=0)
    cfg = tiny_config(data, train={"strategy": "feature-extract", "epochs": 15}, data={"augment": "none"})
    result = train(parse_config(cfg), root / "run", quiet=True)
    assert result.metrics["val_accuracy"] >= 0.75, result.metrics["val_accuracy"]  # chance is 1/3
    new = make_class_folders(root / "new", per_class=12, classes=NEW_COLOURS, seed=1)
    return {"root": root, "data": data, "run": root / "run", "new": new}


@pytest.fixture(scope="module")
def expanded(original: dict) -> Path:
    """`graft expand` in frozen mode (the default) through the CLI, with a snapshot every epoch."""
    out = original["root"] / "expanded"
    rc = main(["expand", str(original["run"]), "--data", str(original["new"]), "--out", str(out), "--epochs", str(EPOCHS), "--set", "solver.snapshot=1", "--quiet"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def expanded_twice(original: dict, expanded: Path) -> Path:
    more = make_class_folders(original["root"] / "more", per_class=12, classes={"cyan": (40, 210, 210)}, seed=3)
    out = original["root"] / "expanded2"
    rc = main(["expand", str(expanded), "--data", str(more), "--out", str(out), "--epochs", "3", "--quiet"])
    assert rc == 0
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def probe_images(original: dict) -> list[Image.Image]:
    """A few images of every old and new class."""
    paths = [p for folder in (original["data"], original["new"]) for c in sorted(folder.iterdir()) for p in sorted(c.glob("*.png"))[:3]]
    return [Image.open(p).convert("RGB") for p in paths]


def probe_batch(run, original: dict) -> torch.Tensor:
    """Real images through the run's own transform, then random inputs of its size."""
    real = torch.stack([run.transform(im) for im in probe_images(original)])
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(8, *real.shape[1:], generator=g)
    return torch.cat([real, noise])


@torch.no_grad()
def logits(run, x: torch.Tensor) -> torch.Tensor:
    return run.model.eval()(x)


def history_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_tensors(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def expand_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["expand", *args, "--quiet"])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------- frozen mode


def test_expanded_run_has_every_output(expanded):
    for name in ["model.json", "model.safetensors", "history.csv", "metrics.json", "config.yaml", "splits.json", "class_stats.safetensors",
                 "expand_metrics.json", "learning_curves.png", "confusion_matrix.png", "predictions.png", "weights_report.json", "report.html"]:
        assert (expanded / name).is_file(), name
    assert "graft expand loaded every tensor" in read_json(expanded / "weights_report.json")["inherited_from"]
    page = (expanded / "report.html").read_text(encoding="utf-8")
    assert "earlier run" in page  # an old class's training images are the original's, not "0"
    snaps = sorted(p.name for p in (expanded / "snapshots").iterdir())
    assert snaps == ["best"] + [f"epoch-{i:04d}" for i in range(EPOCHS - 2, EPOCHS + 1)] + ["last"]  # the newest 3 are kept
    assert len(history_rows(expanded)) == EPOCHS


def test_frozen_old_logits_are_bit_identical(original, expanded):
    before = graft.load_run(str(original["run"]), device="cpu")
    after = graft.load_run(str(expanded), device="cpu")
    x = probe_batch(before, original)
    old, new = logits(before, x), logits(after, x)
    assert old.shape == (len(x), len(OLD)) and new.shape == (len(x), len(OLD) + len(NEW))
    assert torch.equal(new[:, : len(OLD)], old)


def test_frozen_backbone_and_old_rows_unchanged(original, expanded):
    before = graft.load_run(str(original["run"]), device="cpu").model
    after = graft.load_run(str(expanded), device="cpu").model
    sb, sa = before.backbone.state_dict(), after.backbone.state_dict()
    assert sb.keys() == sa.keys()
    assert all(torch.equal(sb[k], sa[k]) for k in sb)
    assert torch.equal(after.head.fc.blocks[0].weight, before.head.fc.weight)
    assert torch.equal(after.head.fc.blocks[0].bias, before.head.fc.bias)


def test_frozen_parameter_counts(expanded):
    m = read_json(expanded / "expand_metrics.json")
    d = graft.load_run(str(expanded), device="cpu").model.num_features
    assert m["mode"] == "frozen"
    assert m["parameters"]["old_changed"] == 0
    assert m["parameters"]["added"] == len(NEW) * (d + 1)
    assert m["parameters"]["buffers_changed"] == 0


def test_old_class_names_and_indices_are_kept(expanded):
    info = read_json(expanded / "model.json")
    assert info["classes"] == OLD + NEW
    assert info["num_classes"] == len(OLD) + len(NEW)
    assert info["head"]["blocks"] == [len(OLD), len(NEW)]
    m = read_json(expanded / "expand_metrics.json")
    assert m["old_classes"] == OLD and m["new_classes"] == NEW
    assert read_json(expanded / "metrics.json")["classes"] == OLD + NEW
    assert read_json(expanded / "splits.json")["classes"] == OLD + NEW


def test_new_classes_learn_and_old_ones_are_kept(expanded):
    m = read_json(expanded / "expand_metrics.json")
    assert m["new_accuracy"] >= 0.8  # chance among 5 classes is 0.2
    assert m["old_images"] > 0 and m["new_images"] > 0
    assert m["old_accuracy_before"] >= 0.75
    assert m["old_accuracy_after"] >= m["old_accuracy_before"] - 0.1
    assert m["overall_accuracy"] >= 0.75
    assert m["negatives"]["class_statistics"] is True and m["negatives"]["classes"] == OLD
    assert m["rehearsal"]["images"] == 0


def test_expanded_run_predicts_new_classes(original, expanded):
    run = graft.load_run(str(expanded), device="cpu")
    preds = run.predict([str(original["new"] / "yellow"), str(original["new"] / "purple")])
    labels = [p.label for p in preds]
    assert labels.count("yellow") >= 10 and labels.count("purple") >= 10  # of 12 each


def test_expanded_run_stores_statistics_of_every_class(original, expanded):
    stats = ClassStats.load(expanded / "class_stats.safetensors")
    assert stats.classes == OLD + NEW
    old = ClassStats.load(original["run"] / "class_stats.safetensors")
    assert stats.backbone == old.backbone  # frozen: the same backbone
    assert torch.equal(stats.mean[: len(OLD)], old.mean)  # the old classes' statistics are carried over


def test_calibration_keeps_new_rows_on_the_old_rows_scale(expanded):
    fc = graft.load_run(str(expanded), device="cpu").model.head.fc
    old_norm = fc.blocks[0].weight.norm(dim=1).mean()
    new_norm = fc.blocks[1].weight.norm(dim=1).mean()
    assert new_norm <= 20 * old_norm


def test_old_images_reported_on_were_not_silently_calibrated_on(original, expanded):
    """gather_data: the original run's held-out images "only measure". Calibration uses the class
    statistics' held-out anchors: when those are the embeddings of the very images
    expand_metrics.json reports the old classes on, the report must say so."""
    run = graft.load_run(str(original["run"]), device="cpu")
    stats = ClassStats.load(original["run"] / "class_stats.safetensors")
    calibrated_on = stats.anchors[stats.anchor_heldout]
    splits = read_json(expanded / "splits.json")
    root = Path(splits["root"])
    reported = [root / p for p, label in splits["val"] if label < len(OLD)]
    metrics = read_json(expanded / "expand_metrics.json")
    assert reported and metrics["old_images"] == len(reported)
    with torch.no_grad():
        emb = run.model.backbone(torch.stack([run.transform(Image.open(p).convert("RGB")) for p in reported])).half().float()
    distance = torch.cdist(emb, calibrated_on).min(1).values if len(calibrated_on) else torch.full((len(emb),), float("inf"))
    spacing = torch.cdist(emb, emb).masked_fill(torch.eye(len(emb), dtype=torch.bool), float("inf")).min(1).values
    reused = [str(p) for p, d, s in zip(reported, distance, spacing) if d < 0.01 * s]
    if reused:
        assert "calibrat" in metrics.get("note", ""), f"{len(reused)} of {len(reported)} reported old-class images were calibrated on, and expand_metrics.json does not say so"


# ---------------------------------------------------------------------------- expand again


def test_expand_twice_appends_a_third_block(expanded_twice):
    info = read_json(expanded_twice / "model.json")
    assert info["classes"] == OLD + NEW + ["cyan"]
    assert info["head"]["blocks"] == [len(OLD), len(NEW), 1]
    assert [step["new_classes"] for step in info["expanded_from"]] == [NEW, ["cyan"]]
    m = read_json(expanded_twice / "expand_metrics.json")
    assert m["old_classes"] == OLD + NEW and m["new_classes"] == ["cyan"]
    assert m["parameters"]["old_changed"] == 0


def test_expand_twice_keeps_earlier_logits_bit_identical(original, expanded, expanded_twice):
    once = graft.load_run(str(expanded), device="cpu")
    twice = graft.load_run(str(expanded_twice), device="cpu")
    x = probe_batch(once, original)
    k = len(OLD) + len(NEW)
    a, b = logits(once, x), logits(twice, x)
    assert b.shape[1] == k + 1
    assert torch.equal(b[:, :k], a)
    original_run = graft.load_run(str(original["run"]), device="cpu")
    assert torch.equal(b[:, : len(OLD)], logits(original_run, x))


# ---------------------------------------------------------------------------- rehearsal


@pytest.fixture(scope="module")
def rehearsed(original: dict) -> Path:
    """The Python API with an old class folder ("red") among the new ones; started, as a user
    would, from the folder holding the runs, with relative paths."""
    root = original["root"]
    data = make_class_folders(root / "rehearsal" / "data", per_class=12, classes=NEW_COLOURS, seed=1)
    make_class_folders(data, per_class=6, classes={"red": (200, 40, 40)}, seed=2)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = graft.expand("run", "rehearsal/data", "rehearsal/out", train={"epochs": 3}, quiet=True)
    finally:
        os.chdir(cwd)
    out = root / "rehearsal" / "out"
    assert result.expand_metrics == read_json(out / "expand_metrics.json")
    return out


def test_old_class_folder_is_rehearsal_not_a_new_class(rehearsed):
    m = read_json(rehearsed / "expand_metrics.json")
    assert m["rehearsal"]["classes"] == ["red"]
    assert m["rehearsal"]["images"] > 0
    assert m["new_classes"] == NEW
    info = read_json(rehearsed / "model.json")
    assert info["classes"] == OLD + NEW  # no second "red"
    assert info["head"]["blocks"] == [len(OLD), len(NEW)]
    assert m["parameters"]["old_changed"] == 0
    splits = read_json(rehearsed / "splits.json")
    red = OLD.index("red")
    rehearsal = [path for path, label in splits["train"] if label == red]
    assert rehearsal and all(path.startswith("red/") for path in rehearsal)
    assert m["rehearsal"]["images"] == len(rehearsal)


def test_old_classes_in_test_alone_are_measured_not_rehearsed(original, tmp_path, capsys):
    """DATA/train/ holds the new classes; DATA/test/ holds old and new classes to measure on."""
    data = make_class_folders(tmp_path / "data" / "train", per_class=12, classes=NEW_COLOURS, seed=1).parent
    make_class_folders(data / "test", per_class=4, classes={**COLOURS, **NEW_COLOURS}, seed=5)
    out = tmp_path / "out"
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(data), "--out", str(out), "--epochs", "3")
    assert rc == 0, err
    m = read_json(out / "expand_metrics.json")
    assert m["rehearsal"]["classes"] == [] and m["rehearsal"]["images"] == 0
    assert m["split"] == "old: test, new: test" and m["old_images"] == 4 * len(OLD) and m["new_images"] == 4 * len(NEW)
    assert read_json(out / "model.json")["classes"] == OLD + NEW
    splits = read_json(out / "splits.json")
    assert all(path.startswith("train/") for path, _ in splits["train"])


def test_expansion_started_with_relative_paths_resumes_from_anywhere(rehearsed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["expand", "--resume", str(rehearsed / "snapshots" / "last"), "--out", str(tmp_path / "resumed"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert_same_tensors(rehearsed, tmp_path / "resumed")


# ---------------------------------------------------------------------------- resume


@pytest.mark.parametrize("command", ["expand", "train"])
def test_resumed_expansion_matches_the_uninterrupted_one(original, expanded, tmp_path, command, capsys):
    snapshot = expanded / "snapshots" / "epoch-0002"
    out = tmp_path / f"resumed-{command}"
    capsys.readouterr()
    rc = main([command, "--resume", str(snapshot), "--out", str(out)])  # not quiet: what the console says is checked below
    err = capsys.readouterr().err
    assert rc == 0, err
    assert_same_tensors(expanded, out)
    assert history_rows(out) == history_rows(expanded)
    assert read_json(out / "model.json")["classes"] == OLD + NEW
    m, ref = read_json(out / "expand_metrics.json"), read_json(expanded / "expand_metrics.json")
    for key in ("old_accuracy_before", "old_accuracy_after", "new_accuracy", "overall_accuracy", "calibration", "parameters"):
        assert m[key] == ref[key], key
    # A handful of held-out samples cannot hold the new rows to 1% of old images: the console says
    # how far the measured share may be off, and warns; the report says it too.
    cal = m["calibration"]
    assert cal["old_samples"] < 60 and cal["old_taken_bound"] > max(0.02, cal["old_taken"])
    assert f"up to {100 * cal['old_taken_bound']:.1f}%, 95% bound" in err
    assert f"warning: {cal['old_samples']} old-class held-out samples are too few" in err
    assert "95% bound" in (out / "report.html").read_text(encoding="utf-8")


def test_resume_from_last_snapshot_of_a_finished_expansion(expanded, tmp_path):
    rc = main(["expand", "--resume", str(expanded / "snapshots" / "last"), "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 0
    assert_same_tensors(expanded, tmp_path / "r")


def test_resume_refuses_other_settings(expanded, tmp_path, capsys):
    rc, err = expand_cli(capsys, "--resume", str(expanded / "snapshots" / "last"), "--out", str(tmp_path / "r"), "--epochs", "9")
    assert rc == 2 and "--resume" in err


def test_expand_resume_refuses_a_training_snapshot(original, tmp_path, capsys):
    rc, err = expand_cli(capsys, "--resume", str(original["run"] / "snapshots" / "last"), "--out", str(tmp_path / "r"))
    assert rc == 2 and "graft train --resume" in err


# ---------------------------------------------------------------------------- fine-tune mode


def test_fine_tune_mode_with_exemplars_from_the_original_run(original, capsys):
    out = original["root"] / "fine-tuned"
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(original["new"]), "--out", str(out),
                         "--mode", "fine-tune", "--epochs", "2", "--fine-tune-epochs", "1", "--exemplars", "2")
    assert rc == 0, err
    m = read_json(out / "expand_metrics.json")
    assert m["mode"] == "fine-tune"
    assert m["parameters"]["old_changed"] > 0
    assert m["rehearsal"]["images"] == 2 * len(OLD)
    assert m["rehearsal"]["classes"] == OLD
    assert m["rehearsal"]["from"].endswith("splits.json")
    info = read_json(out / "model.json")
    assert info["classes"] == OLD + NEW and info["head"]["blocks"] == [len(OLD), len(NEW)]
    assert [r["phase"] for r in history_rows(out)] == ["feature-extract"] * 2 + ["fine-tune"]
    # The exemplars are original training images, never its held-out ones.
    src = read_json(original["run"] / "splits.json")
    original_train = {str(Path(src["root"]) / p) for p, _ in src["train"]}
    mine = read_json(out / "splits.json")
    rehearsal = [str(Path(mine["root"]) / p) for p, label in mine["train"] if label < len(OLD)]
    assert len(rehearsal) == 2 * len(OLD) and set(rehearsal) <= original_train
    # The backbone changed, so the statistics are refitted on it (a later expansion checks the fingerprint).
    stats, before = ClassStats.load(out / "class_stats.safetensors"), ClassStats.load(original["run"] / "class_stats.safetensors")
    assert stats.classes == OLD + NEW and stats.backbone != before.backbone
    run = graft.load_run(str(out), device="cpu")
    assert run.predict([str(original["new"] / "yellow" / "yellow_00.png")])[0].error is None


# ---------------------------------------------------------------------------- bad input


def test_no_new_classes_is_an_error(original, tmp_path, capsys):
    data = tmp_path / "only-old"
    shutil.copytree(original["data"] / "red", data / "red")
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(data), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "no new classes" in err and "red" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["empty", "text-file"])
def test_new_class_folder_without_images_is_an_error(original, tmp_path, capsys, content):
    data = tmp_path / "data"
    shutil.copytree(original["new"] / "purple", data / "purple")
    (data / "yellow").mkdir()
    if content == "text-file":
        (data / "yellow" / "notes.txt").write_text("no pictures yet")
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(data), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "yellow" in err and "no usable images" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["Red", "re d", "RED_"])
def test_folder_named_like_an_old_class_up_to_case_or_spacing(original, tmp_path, capsys, name):
    data = tmp_path / "data"
    shutil.copytree(original["new"] / "purple", data / "purple")
    shutil.copytree(original["data"] / "red", data / name)
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(data), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert name in err and "'red'" in err
    assert "case or spacing" in err


def test_missing_data_folder(original, tmp_path, capsys):
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "nowhere" in err and "does not exist" in err


def test_another_backbone_is_refused(original, tmp_path, capsys):
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(original["new"]), "--out", str(tmp_path / "o"), "--set", "model.name=test_resnet")
    assert rc == 2
    assert "test_resnet" in err and "test_efficientnet" in err
    with pytest.raises(SystemExit) as stop:  # expand has no --model flag at all
        main(["expand", str(original["run"]), "--data", str(original["new"]), "--out", str(tmp_path / "o"), "--model", "test_resnet"])
    assert stop.value.code == 2


def test_input_size_cannot_change(original, tmp_path, capsys):
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(original["new"]), "--out", str(tmp_path / "o"), "--set", "data.img_size=64")
    assert rc == 2
    assert "img_size" in err
    assert not (tmp_path / "o").exists()


def test_out_cannot_be_the_run_being_expanded(original, capsys):
    before = (original["run"] / "model.safetensors").read_bytes()
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(original["new"]), "--out", str(original["run"]) + "/")
    assert rc == 2
    assert "--out" in err and "run being expanded" in err
    assert (original["run"] / "model.safetensors").read_bytes() == before
    assert not (original["run"] / "expand_metrics.json").exists()


def test_out_holding_a_run_needs_overwrite(original, expanded, capsys):
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(original["new"]), "--out", str(expanded))
    assert rc == 2 and "--overwrite" in err


def test_training_a_different_backbone_from_an_expanded_run_is_refused(original, expanded, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["train", "--data", str(original["data"]), "--out", str(tmp_path / "t"), "--weights", str(expanded), "--model", "test_resnet",
               "--img-size", "32", "--epochs", "1", "--fine-tune-epochs", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "test_resnet" in err and str(expanded) in err
    assert len(err.strip().splitlines()) == 1


def test_run_without_statistics_or_old_images_explains_the_fix(original, tmp_path, capsys):
    run = tmp_path / "run-without-stats"
    shutil.copytree(original["run"], run, ignore=shutil.ignore_patterns("snapshots"))
    (run / "class_stats.safetensors").unlink()
    rc, err = expand_cli(capsys, str(run), "--data", str(original["new"]), "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "class_stats.safetensors" in err and "--exemplars" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- review regressions


def test_resume_cannot_write_over_the_run_being_expanded(original, expanded, capsys):
    before = (original["run"] / "model.safetensors").read_bytes()
    capsys.readouterr()
    rc = main(["expand", "--resume", str(expanded / "snapshots" / "epoch-0002"), "--out", str(original["run"]), "--overwrite", "--quiet"])
    assert rc == 2 and "the run being expanded" in capsys.readouterr().err
    assert (original["run"] / "model.safetensors").read_bytes() == before


class _Boom(Exception):
    pass


class _FailAfterFirstEpoch:
    def before_epoch(self, trainer): ...
    def after_step(self, trainer, loss): ...
    def on_interrupt(self, trainer): ...
    def after_train(self, trainer): ...

    def after_epoch(self, trainer, row):
        raise _Boom("disk full")


def test_a_failed_overwrite_keeps_the_replaced_run(original, expanded, tmp_path, capsys):
    from graft.pipeline.expand import expand
    from graft.pipeline.expand import expand_config, load_source

    out = tmp_path / "target"
    shutil.copytree(expanded, out)
    kept = (out / "model.safetensors").read_bytes()
    cfg = expand_config(load_source(original["run"]), original["new"], flags={"train.epochs": 2})
    with pytest.raises(_Boom):
        expand(cfg, out, overwrite=True, quiet=True, hooks=[_FailAfterFirstEpoch()])
    assert (out / ".replaced" / "model.safetensors").read_bytes() == kept
    assert "kept in" in capsys.readouterr().err
    expand(cfg, out, overwrite=True, quiet=True)  # a replacement that finishes drops the old run
    assert not (out / ".replaced").exists() and (out / "expand_metrics.json").is_file()


def test_a_failed_training_overwrite_keeps_the_replaced_run(original, tmp_path):
    cfg = parse_config(tiny_config(original["data"], train={"strategy": "feature-extract", "epochs": 2}))
    out = tmp_path / "run"
    shutil.copytree(original["run"], out)
    kept = (out / "model.safetensors").read_bytes()
    with pytest.raises(_Boom):
        train(cfg, out, overwrite=True, quiet=True, hooks=[_FailAfterFirstEpoch()])
    assert (out / ".replaced" / "model.safetensors").read_bytes() == kept


@pytest.mark.parametrize("damage", ["low", "anchor_labels", "var"])
def test_malformed_class_statistics_are_a_clear_error(original, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(original["run"], run)
    stats = ClassStats.load(run / "class_stats.safetensors")
    if damage == "low":
        stats.low = stats.low[:5]
    elif damage == "anchor_labels":
        stats.anchor_labels = stats.anchor_labels - 5
    else:
        stats.var = stats.var * float("nan")
    stats.save(run / "class_stats.safetensors")
    rc, err = expand_cli(capsys, str(run), "--data", str(original["new"]), "--out", str(tmp_path / "x"))
    assert rc == 2 and "class_stats.safetensors" in err and "unexpected" not in err


def test_resume_after_the_new_data_moved(original, expanded, tmp_path, capsys):
    new = tmp_path / "new"
    shutil.copytree(original["new"], new)
    out = tmp_path / "first"
    assert main(["expand", str(original["run"]), "--data", str(new), "--out", str(out), "--epochs", "3", "--set", "solver.snapshot=1", "--quiet"]) == 0
    moved = tmp_path / "moved"
    new.rename(moved)
    rc, err = expand_cli(capsys, "--resume", str(out / "snapshots" / "epoch-0001"), "--out", str(tmp_path / "r1"))
    assert rc == 2 and "--data" in err and "unexpected" not in err
    assert not (tmp_path / "r1").exists()
    rc, err = expand_cli(capsys, "--resume", str(out / "snapshots" / "epoch-0001"), "--out", str(tmp_path / "r2"), "--data", str(moved))
    assert rc == 0, err
    assert_same_tensors(out, tmp_path / "r2")


def test_fine_tuned_expansion_keeps_statistics_of_the_old_classes(original, capsys):
    out = original["root"] / "fine-tuned-no-exemplars"
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(original["new"]), "--out", str(out), "--mode", "fine-tune", "--epochs", "2", "--fine-tune-epochs", "1")
    assert rc == 0, err
    stats = ClassStats.load(out / "class_stats.safetensors")
    assert stats.classes == OLD + NEW  # refitted from the original training images on the adapted backbone


def test_a_copy_of_an_original_image_is_not_measured_as_unseen(original, tmp_path, capsys):
    src = read_json(original["run"] / "splits.json")
    root = Path(src["root"])
    val_red = [root / p for p, label in src["val"] if label == OLD.index("red")]
    train_red = [root / p for p, label in src["train"] if label == OLD.index("red")]
    data = tmp_path / "data"
    shutil.copytree(original["new"], data)
    (data / "red").mkdir()
    for p in val_red + train_red[:6]:
        shutil.copy(p, data / "red" / p.name)
    out = tmp_path / "out"
    rc, err = expand_cli(capsys, str(original["run"]), "--data", str(data), "--out", str(out), "--epochs", "2")
    assert rc == 0, err
    mine = read_json(out / "splits.json")
    base = Path(mine["root"])
    train_files = {(base / p).read_bytes() for p, _ in mine["train"]}
    held_out = [base / p for split in ("val", "test") for p, label in mine[split] if label < len(OLD)]
    assert not any(p.read_bytes() in train_files for p in held_out)  # nothing measured was trained on
    originally_trained = {p.read_bytes() for p in train_red}
    assert not any(p.read_bytes() in originally_trained for p in held_out)


def test_new_rows_learn_on_unaugmented_views_whatever_the_source_was_trained_with(original):
    """The old classes' statistics describe un-augmented images; the new rows' training views must
    too. The source's augmentation (its flips, rotations and overrides) is not inherited; an
    explicit one is respected."""
    from graft.pipeline.expand import expand_config, load_source

    source = load_source(original["run"])
    source.info["config"]["data"].update(augment="flip-rotate", vflip=True, rotation=30.0)
    cfg = expand_config(source, original["new"])
    assert (cfg.data.augment, cfg.data.vflip, cfg.data.rotation) == ("none", None, None)
    cfg = expand_config(source, original["new"], flags={"data.augment": "flip"})
    assert cfg.data.augment == "flip"
