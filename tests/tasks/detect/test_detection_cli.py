"""Detection end to end, driven through the command line as a user would: train (format found by
itself), eval, predict, plan, resume. A tiny timm backbone keeps each run to seconds."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from box_data import CLASSES, three_splits, write_coco, write_voc, write_yolo
from graft.cli import main
from graft.engine import checkpoint
from helpers import run_cli

TINY = ["--set", "model.name=test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "4",
        "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "solver.base_lr=0.01", "--quiet"]



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("boxes")
    scenes = three_splits(n_train=12, n_val=4, n_test=4)
    return {"yolo": write_yolo(root / "yolo", scenes), "coco": write_coco(root / "coco", scenes), "voc": write_voc(root / "voc", scenes)}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "det"
    assert main(["train", "--data", str(data["yolo"]), "--out", str(out), "--model", "fcos", "--epochs", "2", "--fine-tune-epochs", "2", *TINY]) == 0
    return out


def test_train_finds_the_format_and_writes_a_complete_detection_run(trained) -> None:
    for name in ("model.safetensors", "model.json", "metrics.json", "history.csv", "config.yaml", "splits.json", "weights_report.json", "learning_curves.png", "detections.png", "per_class_ap.png", "pr_curves.png"):
        assert (trained / name).is_file(), name
    info = json.loads((trained / "model.json").read_text())
    assert info["task"] == "detect" and info["classes"] == ["disc", "square"] and info["detector"]["head"] == "fcos"
    m = json.loads((trained / "metrics.json").read_text())
    for key in ("val_map", "val_map50", "test_map", "test_map50", "train_seconds"):
        assert isinstance(m[key], float), key
    assert m["classes"] == ["disc", "square"] and m["skipped_files"] == [] and m["data_format"] == "yolo"
    assert set(m["per_class"]["disc"]) >= {"ap", "ap50", "precision", "recall"}
    rows = list(csv.DictReader(io.StringIO((trained / "history.csv").read_text())))
    assert [r["phase"] for r in rows] == ["feature-extract"] * 2 + ["fine-tune"] * 2
    assert {"train_loss_classification", "train_loss_bbox_regression", "train_loss_bbox_ctrness", "val_map", "val_map50"} <= set(rows[0])
    assert "train_accuracy" not in rows[0]
    assert "config" in info and json.loads((trained / "splits.json").read_text())["format"] == "yolo"


def test_eval_on_the_same_boxes_in_another_format_gives_the_same_map(trained, data, capsys) -> None:
    code, out_voc, _ = run_cli(capsys, "eval", trained, "--data", data["voc"], "--device", "cpu")
    assert code == 0
    voc = json.loads(out_voc)
    code, out_coco, _ = run_cli(capsys, "eval", trained, "--data", data["coco"], "--device", "cpu")
    coco = json.loads(out_coco)
    assert {"map", "map50", "map75", "ar100", "per_class"} <= set(voc)
    assert voc["split"] == "test" and set(voc["per_class"]["square"]) >= {"ap", "ap50"}
    assert voc["map"] == pytest.approx(coco["map"], abs=1e-9) and voc["map50"] == pytest.approx(coco["map50"], abs=1e-9)
    m = json.loads((trained / "metrics.json").read_text())
    assert voc["map"] == pytest.approx(m["test_map"], abs=1e-6)  # the run's own test figure


def test_eval_on_data_that_holds_only_an_evaluation_split(trained, data, tmp_path, capsys) -> None:
    """COCO's val2017 downloaded alone, a data.yaml with only test: or val:, VOC with only
    ImageSets/Main/test.txt: evaluated as given, without training's rules."""
    scenes = three_splits(n_train=12, n_val=4, n_test=4)  # the fixture's scenes
    only = {
        "coco test": write_coco(tmp_path / "coco_test", {"test": scenes["test"]}),
        "yolo test": write_yolo(tmp_path / "yolo_test", {"test": scenes["test"]}),
        "voc test": write_voc(tmp_path / "voc_test", {"test": scenes["test"]}),
        "coco val2017": write_coco(tmp_path / "coco_val2017", {"val2017": scenes["val"]}),
        "yolo val": write_yolo(tmp_path / "yolo_val", {"val": scenes["val"]}),
    }
    assert (tmp_path / "coco_val2017" / "annotations" / "instances_val2017.json").is_file() and (tmp_path / "coco_val2017" / "val2017").is_dir()
    results = {}
    for name, root in only.items():
        code, out, err = run_cli(capsys, "eval", trained, "--data", root, "--device", "cpu")
        assert code == 0, (name, err)
        results[name] = json.loads(out)
    code, out, _ = run_cli(capsys, "eval", trained, "--data", data["coco"], "--device", "cpu")
    full = json.loads(out)  # the full data's test split

    def boxes(split: str) -> dict[str, int]:
        return {c: sum(label == i for _, _, found in scenes[split] for _, label in found) for i, c in enumerate(CLASSES)}

    def figures(result: dict) -> tuple:  # what was evaluated (images, boxes per class) and how it scored
        return result["split"], result["images"], {c: v["boxes"] for c, v in result["per_class"].items()}, result["map"], result["map50"], result["ar100"]

    for name in ("coco test", "yolo test", "voc test"):
        assert figures(results[name]) == figures(full), name
        assert results[name]["images"] == 4 and figures(results[name])[2] == boxes("test"), name
    assert figures(results["coco val2017"]) == figures(results["yolo val"])
    assert results["yolo val"]["split"] == "val" and figures(results["yolo val"])[2] == boxes("val") != boxes("test")
    # Training needs a training split, and says that graft eval takes such data.
    code, _, err = run_cli(capsys, "train", "--data", only["coco val2017"], "--out", tmp_path / "run", *TINY)
    assert code == 2 and "no training split" in err and "graft eval" in err


def test_quiet_run_and_eval_still_report_data_problems(tmp_path, capsys) -> None:
    """An unknown category id, an annotation of an image that is not listed, a listed image that is
    not on disk and truncated images: --quiet hides progress, not these."""
    scenes = three_splits(n_train=12, n_val=4, n_test=4)
    root = write_coco(tmp_path / "coco", scenes)
    train_json = root / "annotations" / "instances_train.json"
    d = json.loads(train_json.read_text())
    d["annotations"] += [{"id": 900, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0},
                         {"id": 901, "image_id": 4242, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    d["images"].append({"id": 77, "file_name": "gone.png", "width": 64, "height": 48})
    train_json.write_text(json.dumps(d))
    for name in ("img_001.png", "img_002.png"):
        image = root / "train" / name
        image.write_bytes(image.read_bytes()[:200])
    test_json = root / "annotations" / "instances_test.json"
    d = json.loads(test_json.read_text())
    d["annotations"].append({"id": 902, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    test_json.write_text(json.dumps(d))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", root, "--out", run, "--epochs", "1", "--fine-tune-epochs", "0", "--augment", "none", *TINY)
    assert code == 0, err
    lines = err.splitlines()
    problems = [line for line in lines if "annotation problem" in line]
    assert len(problems) == 1 and problems[0].startswith(f"warning: 3 annotation problems (boxes or images left out), listed in {run / 'metrics.json'}; e.g. ")
    skipped = [line for line in lines if "unreadable" in line]
    assert len(skipped) == 1 and skipped[0].startswith("warning: skipped 3 unreadable files") and ("img_001.png" in skipped[0] or "gone.png" in skipped[0])
    assert not any(line.startswith("epoch") for line in lines)  # progress stays hidden
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["annotation_problems"]) == 3 and len(m["skipped_files"]) == 3
    # eval reports the problems of the split it evaluates (test), not of the others
    code, out, err = run_cli(capsys, "eval", run, "--data", root, "--device", "cpu")
    assert code == 0 and json.loads(out)["annotation_problems"] == [p for p in m["annotation_problems"] if "annotation id 902" in p]
    assert err.startswith("warning: 1 annotation problem (boxes or images left out), listed in the JSON output; e.g. ") and "unknown category id 99" in err


def test_eval_with_classes_the_model_does_not_know_names_them(trained, tmp_path, capsys) -> None:
    root = write_yolo(tmp_path / "other", three_splits(n_train=3, n_val=0, n_test=0))
    (root / "data.yaml").write_text((root / "data.yaml").read_text().replace("disc", "cone"))
    code, _, err = run_cli(capsys, "eval", trained, "--data", root, "--device", "cpu")
    assert code == 2 and "cone" in err and "does not know" in err


def test_predict_gives_one_row_per_box_in_original_pixels(trained, data, tmp_path, capsys) -> None:
    images = data["yolo"] / "images" / "test"
    code, out, _ = run_cli(capsys, "predict", trained, images, "--format", "json", "--conf", "0.0", "--device", "cpu", "--save-images", tmp_path / "drawn")
    assert code == 0
    found = json.loads(out)
    assert len(found) == 4 and all(f["error"] is None for f in found)
    boxes = [b for f in found for b in f["boxes"]]
    assert boxes and all(b["label"] in ("disc", "square") for b in boxes)
    assert all(0 <= b["box"][0] <= b["box"][2] <= 64 and 0 <= b["box"][1] <= b["box"][3] <= 48 for b in boxes)  # the 64x48 images' pixels
    assert len(list((tmp_path / "drawn").glob("*.png"))) == 4
    code, out, _ = run_cli(capsys, "predict", trained, images, "--format", "csv", "--conf", "0.0", "--device", "cpu")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and set(rows[0]) == {"path", "label", "score", "x1", "y1", "x2", "y2", "error"}
    assert len(rows) == len(boxes)
    code, out, _ = run_cli(capsys, "predict", trained, images, "--conf", "0.9", "--device", "cpu")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) >= 4
    assert all(line.endswith("(no boxes)") or float(line.split()[2]) >= 0.9 for line in lines)  # a table: path label score x1 y1 x2 y2
    code, out, _ = run_cli(capsys, "predict", trained, images, "--format", "csv", "--conf", "1.01", "--device", "cpu")
    rows = list(csv.DictReader(io.StringIO(out)))  # nothing found is a row per image, not silence
    assert code == 0 and len(rows) == 4 and all(r["label"] == r["error"] == "" for r in rows)


def test_saved_images_of_inputs_with_one_name_do_not_overwrite_each_other(trained, data, tmp_path, capsys) -> None:
    first = sorted((data["yolo"] / "images" / "test").iterdir())[0]
    twin = tmp_path / "elsewhere" / first.name
    twin.parent.mkdir()
    twin.write_bytes(first.read_bytes())
    code, _, err = run_cli(capsys, "predict", trained, first, twin, "--device", "cpu", "--save-images", tmp_path / "drawn")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted([f"test__{first.stem}.png", f"elsewhere__{first.stem}.png"])


def test_plan_shows_levels_anchors_and_normalisation(data, capsys) -> None:
    code, out, _ = run_cli(capsys, "plan", "--data", data["voc"], "--model", "retinanet", "--set", "model.name=test_efficientnet", "--set", "data.img_size=64")
    assert code == 0
    assert "detector retinanet on backbone test_efficientnet" in out and "data: Pascal VOC" in out
    assert "pyramid levels" in out and "anchors: sizes" in out and "BatchNorm layers in the backbone" in out
    assert "phase 1: feature-extract" in out and "the FPN and the detection heads only (backbone frozen)" in out
    assert "augmentation: auto, decided when training starts: the best of none, flip by validation mAP" in out


def test_plan_decide_decides_the_augmentation_as_training_would(data, trained, capsys) -> None:
    """`graft plan --decide` runs the same search as `graft train` (same candidates, seed and
    figures), instead of saying that auto is decided later."""
    tiny = ["--set", "model.name=test_efficientnet", "--set", "model.weights=none", "--set", "data.img_size=64", "--set", "solver.batch_size=4",
            "--set", "solver.base_lr=0.01", "--set", "data.num_workers=0", "--device", "cpu", "--set", "train.epochs=2", "--set", "train.fine_tune_epochs=2"]
    code, out, err = run_cli(capsys, "plan", "--data", data["yolo"], "--model", "fcos", "--decide", "--format", "json", *tiny)
    assert code == 0, err
    decided = json.loads(out)["decided"]
    assert decided["trials"] and decided["augment"] == json.loads(out)["augmentation"]["preset"]
    ran = json.loads((trained / "metrics.json").read_text())["decided"]  # the run was trained with the same settings
    assert [(t["augment"], t["val_map"]) for t in decided["trials"]] == [(t["augment"], t["val_map"]) for t in ran["trials"]]
    code, text, _ = run_cli(capsys, "plan", "--data", data["yolo"], "--model", "fcos", "--decide", *tiny)
    assert f"augmentation: {decided['augment']}, decided now" in text and "decided when training starts" not in text
    assert [line.split()[1] for line in text.splitlines() if line.strip().startswith("augment ")] == [t["augment"] for t in decided["trials"]]


@pytest.mark.parametrize("epoch", [2, 3], ids=["from-auto's-winning-trial", "in-fine-tune-phase"])
def test_resume_gives_bit_identical_weights(trained, tmp_path, epoch, capsys) -> None:
    """Epoch 2 is the end of auto's winning trial, which the run continued and snapshotted as its own."""
    code, _, err = run_cli(capsys, "train", "--resume", trained / "snapshots" / f"epoch-{epoch:04d}", "--out", tmp_path / "resumed", "--quiet")
    assert code == 0, err
    a, b = load_file(str(trained / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    snap = checkpoint.load_snapshot(trained / "snapshots" / "last")
    assert snap["task"] == "detect" and snap["loop"]["epoch"] == 4
    # the decision of auto travels with the snapshot; the resumed run does not decide again
    decided = json.loads((trained / "metrics.json").read_text())["decided"]
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["decided"] == decided


def test_augment_auto_is_decided_on_validation_map_and_saved(trained, capsys) -> None:
    """The fixture run left data.augment at auto: each candidate trained the frozen phase on its own
    cached views and was scored by validation mAP; the choice is the config the run saved."""
    from graft.tasks.detect.autotune import AUTO_AUGMENTS, best_trial, DetectionTrial

    decided = json.loads((trained / "metrics.json").read_text())["decided"]
    tried = [t["augment"] for t in decided["trials"]]
    assert tried == list(AUTO_AUGMENTS[: len(tried)]) and len(tried) >= 2
    assert decided["augment"] == best_trial([DetectionTrial(**t) for t in decided["trials"]]).augment
    # a stronger candidate was tried only while the one before it won
    for i in range(1, len(tried) - 1):
        assert best_trial([DetectionTrial(**t) for t in decided["trials"][: i + 1]]).augment == tried[i]
    assert all(t["epoch"] == 2 for t in decided["trials"])  # the frozen phase's 2 epochs, as the run
    # The winner's trial is not thrown away: it is the run's first epochs, snapshotted as the run's.
    winner = next(t for t in decided["trials"] if t["augment"] == decided["augment"])
    rows = list(csv.DictReader(io.StringIO((trained / "history.csv").read_text())))
    assert float(rows[1]["val_map"]) == winner["val_map"] and rows[0]["val_map"] == ""  # a trial is scored at its end only
    assert (trained / "snapshots" / "epoch-0002").is_file() and not (trained / "snapshots" / "epoch-0001").exists()
    assert f"augment: {decided['augment']}" in (trained / "config.yaml").read_text()
    assert json.loads((trained / "model.json").read_text())["decided"]["augment"] == decided["augment"]


def test_auto_run_equals_a_run_told_the_chosen_augmentation(trained, data, tmp_path, capsys) -> None:
    """The search leaves nothing behind in the run: weights (BatchNorm buffers too), random state
    and the reused feature cache give exactly the weights of a run given the winner up front."""
    chosen = json.loads((trained / "metrics.json").read_text())["decided"]["augment"]
    out = tmp_path / "told"
    assert main(["train", "--data", str(data["yolo"]), "--out", str(out), "--model", "fcos", "--epochs", "2", "--fine-tune-epochs", "2", "--augment", chosen, *TINY]) == 0
    a, b = load_file(str(trained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_search_over_disk_caches_leaves_no_file(data, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "train", "--data", data["coco"], "--out", tmp_path / "r", "--set", "detect.cache_mb=0", "--epochs", "1", "--fine-tune-epochs", "0", *TINY[:-1])
    assert code == 0, err
    assert "kept on disk" in err and len(json.loads((tmp_path / "r" / "metrics.json").read_text())["decided"]["trials"]) >= 2
    assert not list((tmp_path / "cache").rglob("graft-det-features-*"))


def test_search_scores_trials_cut_short_by_max_iter(data, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", "--data", data["coco"], "--out", tmp_path / "r", "--set", "solver.max_iter=2", "--epochs", "3", "--fine-tune-epochs", "0", *TINY[:-1])
    assert code == 0, err
    trials = json.loads((tmp_path / "r" / "metrics.json").read_text())["decided"]["trials"]
    assert trials and all(isinstance(t["val_map"], float) and t["epoch"] == 1 for t in trials)


def test_augment_set_by_the_user_is_not_searched(data, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", "--data", data["coco"], "--out", tmp_path / "r", "--augment", "flip-scale", "--epochs", "1", "--fine-tune-epochs", "0", *TINY)
    assert code == 0, err
    assert "decided" not in json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "augment: flip-scale" in (tmp_path / "r" / "config.yaml").read_text()


def test_augment_auto_without_validation_images_falls_back_to_flip(tmp_path, capsys) -> None:
    from box_data import make_scenes

    only_train = write_coco(tmp_path / "coco", {"train": make_scenes(6)})
    code, _, err = run_cli(capsys, "train", "--data", only_train, "--out", tmp_path / "r", "--set", "data.val_fraction=0", "--epochs", "1", "--fine-tune-epochs", "0", *TINY[:-1])
    assert code == 0, err
    assert "auto: no validation images to decide on: augmentation flip" in err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["decided"]["trials"] == []


def test_augment_flip_rotate_is_refused_for_boxes(data, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", "--data", data["coco"], "--out", tmp_path / "r", "--augment", "flip-rotate", "--epochs", "1", "--fine-tune-epochs", "0", *TINY)
    assert code == 2 and "flip-rotate is for classifiers" in err


def test_mixed_up_requests_get_clear_errors(trained, data, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "expand", trained, "--data", data["voc"], "--out", tmp_path / "x")
    assert code == 2 and "nothing to add" in err  # the same classes again
    code, _, err = run_cli(capsys, "train", "--data", data["voc"], "--out", tmp_path / "s", "--model", "ssd300_vgg16", "--quiet")
    assert code == 2 and "not supported by graft yet" in err
    code, _, err = run_cli(capsys, "train", "--data", data["voc"], "--out", tmp_path / "c", "--model", "fcos", "--task", "classify", "--quiet")
    assert code == 2 and "is a detector, but --task is classify" in err
    code, _, err = run_cli(capsys, "predict", trained, data["voc"] / "JPEGImages", "--top-k", "2", "--device", "cpu")
    assert code == 0  # --top-k is a classifier's flag; a detector ignores it


@pytest.mark.parametrize("epoch", [2, 4], ids=["in-feature-extract-phase", "in-fine-tune-phase"])
def test_ctrl_c_mid_epoch_saves_a_snapshot_that_resumes_bit_exactly(trained, data, tmp_path, epoch, capsys) -> None:
    """Ctrl-C after the second batch of an epoch (the SIGINT handler sets the same flag): exit 130,
    a snapshot at that batch, no model written; resuming it ends with the uninterrupted run's weights."""
    from graft.engine.loop import Hook

    class StopAfterTwoSteps(Hook):
        def after_step(self, trainer, loss):
            if trainer.state.epoch + 1 == epoch and trainer.state.batch == 2:
                trainer.stop_requested = True

    out = tmp_path / "interrupted"
    # told the augmentation auto chose, the run trains its frozen epochs itself (auto's winner would
    # hand it the trial's) and ends with the same weights (test_auto_run_equals_a_run_told_...)
    chosen = json.loads((trained / "metrics.json").read_text())["decided"]["augment"]
    args = ["train", "--data", str(data["yolo"]), "--out", str(out), "--model", "fcos", "--epochs", "2", "--fine-tune-epochs", "2", "--augment", chosen, *TINY]
    from graft.cli import main as cli_main
    from graft.pipeline import train as runner

    real_train = runner.train
    with pytest.MonkeyPatch.context() as mp:  # the CLI's train, with the interrupting hook added
        mp.setattr(runner, "train", lambda *a, **k: real_train(*a, **{**k, "hooks": [*k.get("hooks", []), StopAfterTwoSteps()]}))
        code = cli_main(args)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "graft train --resume" in err and "Traceback" not in err
    snap = checkpoint.load_snapshot(out / "snapshots" / "last")
    assert snap["loop"]["batch"] == 2 and snap["loop"]["epoch"] == epoch - 1 and snap["loop"]["phase"] == (0 if epoch <= 2 else 1)
    assert not (out / "model.safetensors").exists()
    code, _, err = run_cli(capsys, "train", "--resume", out / "snapshots" / "last", "--quiet")
    assert code == 0, err
    a, b = load_file(str(trained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]

