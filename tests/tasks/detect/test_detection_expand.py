"""graft expand for detectors, driven through the CLI: a two-class FCOS run gains a "ring" class from
images in which old objects are present but unlabelled. Old classes' scores and detections stay
exactly as they were; the new class learns; the run resumes, expands again, and refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from box_data import ring_scenes, three_splits, write_coco, write_yolo
from graft.cli import main
from graft.pipeline.predict import load_run
from graft.engine import checkpoint
from helpers import run_cli

TINY = ["--set", "model.name=test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "4",
        "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "solver.base_lr=0.01", "--quiet"]
EXPAND = ["--epochs", "30", "--set", "solver.base_lr=0.01", "--set", "solver.snapshot=10", "--set", "expand.pseudo_labels=false", "--quiet"]  # pseudo-labels: test_pseudo_labels.py



@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("expand-det")


@pytest.fixture(scope="module")
def original(root) -> Path:
    data = write_yolo(root / "old", three_splits(n_train=24, n_val=6, n_test=6))
    out = root / "runs" / "det"
    # flip set, not auto: auto's 2-epoch trials both score 0 on this tiny random-init model, and
    # without flips the original stays too weak to show that its detections are kept
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "fcos", "--epochs", "10", "--fine-tune-epochs", "10", "--augment", "flip", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def rings(root) -> Path:
    """New data: rings labelled, the discs and squares beside them not."""
    return write_yolo(root / "rings", {"train": ring_scenes(24, 5), "val": ring_scenes(6, 6, prefix="val"), "test": ring_scenes(6, 7, prefix="test")}, names=["ring"])


@pytest.fixture(scope="module")
def expanded(original, rings, root) -> Path:
    out = root / "runs" / "det+ring"
    assert main(["expand", str(original), "--data", str(rings), "--out", str(out), *EXPAND]) == 0
    return out


def cls_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        features = list(model.detector.backbone(model.detector.transform.normalise(images)).values())
        return model.detector.head.classification_head(features)


def test_frozen_expansion_keeps_the_old_classes_exactly_and_learns_the_new_one(original, expanded) -> None:
    info = json.loads((expanded / "model.json").read_text())
    assert info["classes"] == ["disc", "square", "ring"] and info["detector"]["class_blocks"] == [2, 1]
    assert info["expanded_from"][0]["run"] == str(original.resolve()) and info["expand"]["new_classes"] == ["ring"]
    m = json.loads((expanded / "expand_metrics.json").read_text())
    for key in ("old_classes", "new_classes", "old_map_before", "old_map_after", "new_map", "overall_map", "forgetting", "parameters", "per_class_before", "per_class_after"):
        assert key in m, key
    assert m["old_classes"] == ["disc", "square"] and m["new_classes"] == ["ring"]
    # measured on the original run's test images: the old classes' detections are the original's, box for box
    assert m["old_images"] == 6 and m["old_detections_unchanged"] == 1.0
    assert m["old_map_after"] == m["old_map_before"] > 0.05 and m["forgetting"] == 0.0
    assert m["per_class_after"]["disc"] == m["per_class_before"]["disc"]
    # counted by comparing tensors: nothing old changed; what was added is the new block
    p = m["parameters"]
    assert p["old_changed"] == 0 and p["buffers_changed"] == 0 and p["added"] == p["expected_added"] > 0
    # the new class learned: a fresh block ranks rings at chance (mAP@.5 under 0.02 on these images)
    assert m["new_map50"] > 0.2 and m["new_map"] > 0.05
    # new classes measured where old objects are too: the new data's test images and the original's
    assert m["new_images"] == 6 + 6 and m["new_split"] == f"test + {original.name} test"
    assert m["new_map"] <= m["new_map_new_images"]  # the original's images add no ring, only chances of a false one
    for name in ("model.safetensors", "metrics.json", "history.csv", "detections.png", "per_class_ap.png", "learning_curves.png", "report.html", "weights_report.json"):
        assert (expanded / name).is_file(), name
    page = (expanded / "report.html").read_text(encoding="utf-8")  # written after expand_metrics.json, so it shows its figures
    assert f'data-metric="expand.new_map">{m["new_map"]:.3f}<' in page and "Per-class AP before and after" in page


def old_detections(model, images: torch.Tensor, k: int) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        out = model.eval()(images)
    return [{key: d[key][d["labels"] < k] for key in ("boxes", "scores", "labels")} for d in out]


def test_old_class_scores_and_detections_are_bit_identical_after_loading(original, expanded) -> None:
    a, b = load_run(original, device="cpu").model, load_run(expanded, device="cpu").model
    assert b.blocks == [("base", 2), ("branch", 1)] and len(b.branches) == 1  # the default: the new class has a detector of its own
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cls_logits(b, images), cls_logits(a, images))  # the original detector, untouched
    for x, y in zip(old_detections(a, images, 2), old_detections(b, images, 2)):
        assert all(torch.equal(x[key], y[key]) for key in x)
    with torch.no_grad():
        assert any(((d["labels"] == 2).any() for d in b(images)))  # the merged output holds the new class too


def test_eval_and_predict_of_the_expanded_run(original, expanded, root, capsys) -> None:
    old_data = root / "old"
    _, out_a, _ = run_cli(capsys, "eval", original, "--data", old_data, "--device", "cpu")
    code, out_b, err = run_cli(capsys, "eval", expanded, "--data", old_data, "--device", "cpu")
    assert code == 0, err
    a, b = json.loads(out_a), json.loads(out_b)
    for name in ("disc", "square"):  # no old-class detection changed, so neither did their AP
        assert b["per_class"][name]["ap"] == a["per_class"][name]["ap"]
    code, out, err = run_cli(capsys, "predict", expanded, root / "rings" / "images" / "test", "--format", "json", "--conf", "0.05", "--device", "cpu")
    assert code == 0, err
    labels = {box["label"] for image in json.loads(out) for box in image["boxes"]}
    assert "ring" in labels and labels <= {"disc", "square", "ring"}


def test_expanding_twice_keeps_both_earlier_blocks(expanded, root, capsys) -> None:
    """A branch, then a widened last layer: labels 0-1 and 3 come from the original detector, 2 from the branch."""
    hoops = write_yolo(root / "hoops", {"train": ring_scenes(12, 8, prefix="a"), "val": ring_scenes(4, 9, prefix="b")}, names=["hoop"])  # the same objects by a new name
    out = root / "runs" / "twice"
    code, _, err = run_cli(capsys, "expand", expanded, "--data", hoops, "--out", out, "--epochs", "3", "--set", "expand.detector_block=widen", "--quiet")
    assert code == 0, err
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == ["disc", "square", "ring", "hoop"] and info["detector"]["class_blocks"] == [2, 1, 1]
    assert info["detector"]["block_kinds"] == ["base", "branch", "widen"]
    assert [e["classes_before"] for e in info["expanded_from"]] == [2, 3]
    m = json.loads((out / "expand_metrics.json").read_text())
    assert m["old_classes"] == ["disc", "square", "ring"] and m["old_detections_unchanged"] == 1.0 and m["parameters"]["old_changed"] == 0
    twice, once = load_run(out, device="cpu").model, load_run(expanded, device="cpu").model
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    widened = cls_logits(twice, images)
    assert widened.shape[-1] == 3 and torch.equal(widened[..., :2], cls_logits(once, images))  # disc, square and the new hoop
    for x, y in zip(old_detections(once, images, 3), old_detections(twice, images, 3)):
        assert all(torch.equal(x[key], y[key]) for key in x)


def test_resume_from_a_snapshot_is_bit_exact(expanded, tmp_path, capsys) -> None:
    snap = checkpoint.load_snapshot(expanded / "snapshots" / "epoch-0010")
    assert snap["task"] == "detect" and snap["expand"]["new_classes"] == ["ring"]
    code, _, err = run_cli(capsys, "expand", "--resume", expanded / "snapshots" / "epoch-0010", "--out", tmp_path / "resumed", "--quiet")
    assert code == 0, err
    a, b = load_file(str(expanded / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert json.loads((tmp_path / "resumed" / "expand_metrics.json").read_text())["new_map"] == json.loads((expanded / "expand_metrics.json").read_text())["new_map"]


def test_old_class_boxes_in_the_new_data_are_used_as_rehearsal(original, root, capsys) -> None:
    data = write_coco(root / "rings+squares", {"train": ring_scenes(12, 10, names=("ring", "square"))}, category_ids=(1, 2), names=("ring", "square"))
    out = root / "runs" / "rehearsal"
    code, _, err = run_cli(capsys, "expand", original, "--data", data, "--out", out, "--epochs", "2", "--quiet")
    assert code == 0, err
    info = json.loads((out / "model.json").read_text())
    assert info["classes"] == ["disc", "square", "ring"]  # "square" is the old class, at its old index
    m = json.loads((out / "expand_metrics.json").read_text())
    assert m["rehearsal"]["classes"] == ["square"] and m["rehearsal"]["boxes"] > 0 and m["old_detections_unchanged"] == 1.0


def test_bad_requests_get_clear_errors(original, rings, root, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "expand", original, "--data", root / "old", "--out", tmp_path / "a")
    assert code == 2 and "nothing to add" in err and "Traceback" not in err
    empty = write_yolo(tmp_path / "empty-class", {"train": ring_scenes(4, 11), "val": ring_scenes(2, 12, prefix="v")}, names=["ring", "star"])
    code, _, err = run_cli(capsys, "expand", original, "--data", empty, "--out", tmp_path / "b")
    assert code == 2 and "new class 'star' has no boxes" in err
    twin = write_yolo(tmp_path / "twin", {"train": ring_scenes(4, 11), "val": ring_scenes(2, 12, prefix="v")}, names=["Disc "])
    code, _, err = run_cli(capsys, "expand", original, "--data", twin, "--out", tmp_path / "f")
    assert code == 2 and "class 'Disc' of" in err and "differs from the model's class 'disc' only by case or spacing" in err
    folders = tmp_path / "folders" / "ring"
    folders.mkdir(parents=True)
    (folders / "a.png").write_bytes((root / "rings" / "images" / "train" / "new_000.png").read_bytes())
    code, _, err = run_cli(capsys, "expand", original, "--data", folders.parent, "--out", tmp_path / "c")
    assert code == 2 and "Traceback" not in err and str(folders.parent) in err
    code, _, err = run_cli(capsys, "expand", original, "--data", rings, "--out", tmp_path / "d", "--set", "model.name=test_resnet")
    assert code == 2 and "model.name cannot change when expanding" in err
    code, _, err = run_cli(capsys, "expand", original, "--data", rings, "--out", tmp_path / "e", "--mode", "fine-tune", "--fine-tune-epochs", "0")
    assert code == 2 and "the backbone would not adapt" in err and not (tmp_path / "e").exists()
    code, _, err = run_cli(capsys, "expand", original, "--data", rings, "--out", original / "inside")
    assert code == 2 and "write the expanded run to a new folder" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "f").exists()


def test_a_classifier_given_boxes_is_told_so(tmp_path, rings, capsys) -> None:
    from PIL import Image

    for c in ("red", "blue"):
        (tmp_path / "cls" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), c).save(tmp_path / "cls" / c / f"{i}.png")
    assert main(["train", "--data", str(tmp_path / "cls"), "--out", str(tmp_path / "clf"), "--set", "model.name=test_efficientnet", "--weights", "none", "--img-size", "32",
                 "--epochs", "1", "--fine-tune-epochs", "0", "--augment", "none", "--set", "train.head_lr=0.001", "--set", "data.num_workers=0", "--quiet"]) == 0
    code, _, err = run_cli(capsys, "expand", tmp_path / "clf", "--data", rings, "--out", tmp_path / "x")
    assert code == 2 and "holds box annotations" in err and "is a classifier" in err
    code, _, err = run_cli(capsys, "eval", tmp_path / "clf", "--data", rings)
    assert code == 2 and "holds box annotations" in err and "is a classifier" in err


def test_coco_model_gains_a_class_and_keeps_its_coco_scores(rings, tmp_path, monkeypatch, capsys) -> None:
    """coco:fcos_resnet50_fpn, offline: a COCO-shaped weights file (91 categories, frozen BatchNorm
    body, random values) in a private torch hub cache stands in for torchvision's download."""
    from torchvision.models import get_model, get_model_weights

    from graft.tasks.detect.torchvision_models import _freeze_batchnorm, build_torchvision_detector, coco_categories

    name = "fcos_resnet50_fpn"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    coco = get_model(name, weights=None, weights_backbone=None, num_classes=91)
    _freeze_batchnorm(coco.backbone.body)
    target = Path(torch.hub.get_dir()) / "checkpoints" / get_model_weights(name).DEFAULT.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(coco.state_dict(), target)
    out = tmp_path / "coco+ring"
    code, _, err = run_cli(capsys, "expand", f"coco:{name}", "--data", rings, "--out", out, "--epochs", "1", "--batch-size", "8", "--set", "data.img_size=64", "--set", "data.num_workers=0", "--device", "cpu")
    assert code == 0, err
    assert f"expanding coco:{name} (91 classes, fcos)" in err
    info = json.loads((out / "model.json").read_text())
    categories = coco_categories(name)
    assert len(info["classes"]) == 92 and info["classes"][-1] == "ring" and info["detector"]["class_blocks"] == [91, 1]
    assert info["preprocessing"]["input_size"] == 64 and info["detector"]["block_kinds"] == ["base", "branch"]  # the size asked for, not graft's default
    assert info["classes"][1] == categories[1] == "person" and info["classes"][12] == "N/A 12" and len(set(info["classes"])) == 92
    m = json.loads((out / "expand_metrics.json").read_text())
    assert m["parameters"]["old_changed"] == 0 and m["old_map_before"] is None and "COCO val" in m["note"]
    # the expanded run's COCO outputs are the COCO model's, bit for bit
    original, _ = build_torchvision_detector(name, 91, weights="coco", size=64, score_thresh=0.05, nms_thresh=0.5, detections=100, keep_coco_classes=True)
    expanded = load_run(out, device="cpu").model
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cls_logits(expanded, images)[..., :91], cls_logits(original.eval(), images))


def test_a_softmax_head_gains_a_branch_and_keeps_its_detections(original, root, rings, tmp_path, capsys) -> None:
    """Faster R-CNN: widening its softmax would change every old probability; a branch scores the
    new class with its own softmax, and the old detections stay the original's."""
    out = tmp_path / "frcnn"
    assert main(["train", "--data", str(root / "old"), "--out", str(out), "--model", "fasterrcnn", "--epochs", "2", "--fine-tune-epochs", "0", "--augment", "none",
                 "--set", "detect.score_thresh=0.0", *TINY]) == 0
    code, _, err = run_cli(capsys, "expand", out, "--data", rings, "--out", tmp_path / "widened", "--set", "expand.detector_block=widen")
    assert code == 2 and "would change every old class's score" in err
    # Pseudo-labels off (test_pseudo_labels.py has them): their 5 extra epochs of RoIAlign on the CPU took a minute.
    code, _, err = run_cli(capsys, "expand", out, "--data", rings, "--out", tmp_path / "frcnn+ring", "--epochs", "2", "--set", "expand.pseudo_labels=false", "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "frcnn+ring" / "expand_metrics.json").read_text())
    assert m["old_detections_unchanged"] == 1.0 and m["parameters"]["old_changed"] == 0
    a, b = load_run(out, device="cpu").model, load_run(tmp_path / "frcnn+ring", device="cpu").model
    assert b.blocks == [("base", 2), ("branch", 1)] and b.branches[0].roi_heads.box_predictor.cls_score.out_features == 2  # background + ring
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    before = old_detections(a, images, 2)
    assert sum(len(d["scores"]) for d in before) > 0  # something to compare
    for x, y in zip(before, old_detections(b, images, 2)):
        assert all(torch.equal(x[key], y[key]) for key in x)


def old_neck_drift(original: Path, expanded: Path, images: torch.Tensor) -> float:
    """How far the old detector's neck maps moved from the original's: what distillation bounds."""
    from graft.tasks.detect.distill import neck_maps, relative_l2

    a, b = load_run(original, device="cpu").model, load_run(expanded, device="cpu").model
    with torch.no_grad():
        return float(relative_l2(neck_maps(b, b.backbone_features(images)), neck_maps(a, a.backbone_features(images))))


def test_fine_tune_mode_adapts_the_backbone_and_distillation_holds_the_old_detector(original, rings, root, capsys) -> None:
    """Fine-tune mode: the backbone's top learns too; the old detector's neck and heads do not; the
    distillation term is in the history and keeps the old features closer to the original's than
    the same run without it."""
    runs = {}
    for weight in ("0", "10"):
        out = root / "runs" / f"det+ring-ft{weight}"
        code, _, err = run_cli(capsys, "expand", original, "--data", rings, "--out", out, "--mode", "fine-tune", "--epochs", "2", "--fine-tune-epochs", "3",
                               "--set", "solver.base_lr=0.01", "--set", "train.fine_tune_lr_mult=1.0", "--set", f"expand.distill_weight={weight}", "--set", "data.augment=none", "--set", "expand.pseudo_labels=false", "--device", "cpu")
        assert code == 0, err
        runs[weight] = out
    assert "mode fine-tune" in err and "distilled towards the original's (weight 10)" in err
    history = (runs["10"] / "history.csv").read_text().splitlines()
    header, rows = history[0].split(","), [r.split(",") for r in history[1:]]
    assert len(rows) == 5 and "train_loss_distill" in header
    distill = [r[header.index("train_loss_distill")] for r in rows]
    assert all(v == "" for v in distill[:2]) and all(float(v) > 0 for v in distill[2:])  # only while the backbone learns
    m = json.loads((runs["10"] / "expand_metrics.json").read_text())
    assert m["mode"] == "fine-tune" and m["parameters"]["old_changed"] > 0  # the backbone's top moved
    a, b = load_run(original, device="cpu").model.state_dict(), load_run(runs["10"], device="cpu").model.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("backbone.") for k in changed)  # the old neck and heads are the original's
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    assert old_neck_drift(original, runs["10"], images) < 0.5 * old_neck_drift(original, runs["0"], images)


def test_an_expanded_detector_exports_to_onnx_and_predicts_as_the_run(expanded, root, capsys) -> None:
    """The branch's detections are merged by score; ONNX has no stable sort, so the export merges
    with TopK, and the exported model must still give the run's boxes."""
    target = root / "exports" / "det+ring.onnx"
    code, _, err = run_cli(capsys, "export", expanded, "--out", target)
    assert code == 0, err
    meta = json.loads((root / "exports" / "det+ring.onnx.json").read_text())
    assert meta["classes"] == ["disc", "square", "ring"] and meta["parity"]["passed"] and meta["parity"]["detections_compared"] > 10
    images = root / "rings" / "images" / "test"
    ours = json.loads(run_cli(capsys, "predict", expanded, images, "--conf", "0.2", "--format", "json", "--device", "cpu")[1])
    theirs = json.loads(run_cli(capsys, "predict", target, images, "--conf", "0.2", "--format", "json")[1])
    assert sum(len(p["boxes"]) for p in theirs) > 0 and {b["label"] for p in theirs for b in p["boxes"]} >= {"ring"}
    assert [[b["label"] for b in p["boxes"]] for p in theirs] == [[b["label"] for b in p["boxes"]] for p in ours]


def test_new_classes_are_also_measured_where_only_old_objects_are() -> None:
    """A new-class box on an old object of the original's held-out images is a false positive:
    the new data's images alone (old objects unboxed) cannot show it, the honest figure must."""
    import numpy as np

    from graft.tasks.detect.boxes import BoxSample
    from graft.tasks.detect.expand_metrics import score_new_classes
    from graft.tasks.detect.metrics import Prediction

    def sample(name: str, box: list[float], label: int) -> BoxSample:
        return BoxSample(Path(f"/nowhere/{name}.png"), name, 64, 64, np.array([box], np.float32), np.array([label]), np.array([False]), np.array([False]))

    ring, disc = [10, 10, 30, 30], [34, 34, 54, 54]
    new_images = [sample("n0", ring, 2)]
    old_images = [sample("o0", disc, 0)]
    on_new = [Prediction(np.array([ring], np.float32), np.array([0.9], np.float32), np.array([2]))]
    on_old = [Prediction(np.array([disc, disc], np.float32), np.array([0.95, 0.95], np.float32), np.array([0, 2]))]  # the disc, and a 'ring' on it
    honest, alone = score_new_classes((new_images, on_new), (old_images, on_old), range(2, 3), ["ring"], 0.3)
    assert alone["map50"] == pytest.approx(1.0)
    assert honest["map50"] == pytest.approx(0.5, abs=0.02)  # the false ring outranks the true one: precision 1/2 at full recall
    clean = [Prediction(np.array([disc], np.float32), np.array([0.95], np.float32), np.array([0]))]
    assert score_new_classes((new_images, on_new), (old_images, clean), range(2, 3), ["ring"], 0.3)[0]["map50"] == pytest.approx(1.0)
