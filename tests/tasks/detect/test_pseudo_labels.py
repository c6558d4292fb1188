"""Pseudo-labels in a detector expansion: the new classes found in the original run's own training
images (where they were there, unboxed) become boxes, except on objects that images' boxes call old."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import box_iou

from box_data import ring_scenes, three_splits, write_yolo
from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.data import DetectionSplits
from graft.tasks.detect.metrics import Prediction
from graft.tasks.detect.pseudo_labels import add_pseudo_labelled, source_images, with_pseudo_boxes
from helpers import run_cli

TINY = ["--set", "model.name=test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "4",
        "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "solver.base_lr=0.01", "--quiet"]


def sample(path: Path, boxes: list[list[float]], labels: list[int]) -> BoxSample:
    n = len(labels)
    return BoxSample(path, path.stem, 64, 48, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), np.zeros(n, bool), np.zeros(n, bool))


def test_a_confident_new_detection_becomes_a_box_unless_it_lies_on_a_boxed_old_object() -> None:
    old = sample(Path("a.png"), [[0, 0, 10, 10]], [1])  # one old object (class 1 of k=2), boxed
    found = Prediction(
        np.asarray([[0, 0, 10, 10], [1, 1, 10, 11], [30, 30, 40, 40], [20, 0, 30, 8], [40, 10, 50, 20], [64, 8, 64, 20]], np.float32),
        np.asarray([0.9, 0.8, 0.7, 0.3, 0.95, 0.9], np.float32),
        # an old-class detection, a new one on the old object, a new one elsewhere, a weak one, another old one, one clipped to no width
        np.asarray([1, 2, 2, 2, 0, 2]),
    )
    labelled, dropped = with_pseudo_boxes(old, found, k=2, score=0.5)
    assert dropped == 1
    assert labelled.boxes.tolist() == [[0, 0, 10, 10], [30, 30, 40, 40]] and labelled.labels.tolist() == [1, 2]
    assert labelled.crowd.tolist() == [False, False] and labelled.difficult.tolist() == [False, False]
    empty, dropped = with_pseudo_boxes(sample(Path("b.png"), [], []), found, k=2, score=0.5)  # no old box: nothing to lie on
    assert dropped == 0 and empty.labels.tolist() == [2, 2] and empty.boxes.shape == (2, 4)


def test_only_the_originals_training_images_on_disk_that_the_new_data_lacks_are_labelled(tmp_path) -> None:
    for name in ("kept.png", "shared.png"):
        (tmp_path / name).write_bytes(b"")
    original = DetectionSplits(tmp_path, "yolo", "", ["disc"], [sample(tmp_path / n, [], []) for n in ("kept.png", "shared.png", "gone.png")], [], [], [], [], [])
    new = DetectionSplits(tmp_path, "yolo", "", ["disc", "ring"], [sample(tmp_path / "shared.png", [], [])], [], [], [], [], [])
    assert [s.path.name for s in source_images(original, new)] == ["kept.png"]
    assert source_images(None, new) == []
    said: list[str] = []

    def nothing(source):
        return add_pseudo_labelled(None, None, new, source, 1, None, None, None, said.append)  # type: ignore[arg-type]

    assert nothing(None) == (new, {"used": False, "why": "the original run has no data split (splits.json)"})
    gone = DetectionSplits(tmp_path, "yolo", "", ["disc"], [sample(tmp_path / "gone.png", [], [])], [], [], [], [], [])
    assert nothing(gone)[1]["why"] == "the original run's training images are not on disk"
    held = DetectionSplits(tmp_path, "yolo", "", ["disc"], [sample(tmp_path / "shared.png", [], [])], [], [], [], [], [])
    assert nothing(held)[1]["why"] == "the new data holds every training image of the original run"
    assert said[-1] == "pseudo-labels: none (the new data holds every training image of the original run)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An original that learnt discs and squares from scenes in which rings are, unboxed; new data
    with rings boxed; the expansion, with pseudo-labels."""
    root = tmp_path_factory.mktemp("pseudo")
    plain = three_splits(n_train=24, n_val=6, n_test=6)
    with_rings = ring_scenes(16, 1, names=("disc", "square"), prefix="old")  # their rings unboxed
    old = write_yolo(root / "old", {**plain, "train": plain["train"] + with_rings}, names=["disc", "square"])
    new = write_yolo(root / "rings", {"train": ring_scenes(16, 5), "val": ring_scenes(6, 6, prefix="val")}, names=["ring"])
    original, expanded = root / "original", root / "expanded"
    from graft.cli import main

    assert main(["train", "--data", str(old), "--out", str(original), "--model", "fcos", "--epochs", "10", "--fine-tune-epochs", "10", "--augment", "flip", *TINY]) == 0
    assert main(["expand", str(original), "--data", str(new), "--out", str(expanded), "--epochs", "30", "--set", "expand.pseudo_label_epochs=4",
                 "--set", "solver.snapshot=2", "--quiet"]) == 0
    return {"root": root, "original": original, "expanded": expanded}


def test_the_new_classes_are_boxed_in_the_originals_images_and_learnt_from_them(runs) -> None:
    m = json.loads((runs["expanded"] / "expand_metrics.json").read_text())
    p = m["pseudo_labels"]
    assert p["used"] and p["images"] == 24 + 16 and p["probe_epochs"] == 30 and p["score"] == 0.5 and p["boxes"] > 0
    assert m["old_detections_unchanged"] == 1.0 and m["parameters"]["old_changed"] == 0  # frozen mode: old detections untouched
    # the run trained on the new data and the original's images with their rings boxed: which rings, checked against the truth
    splits = DetectionSplits.from_json(json.loads((runs["expanded"] / "splits.json").read_text()))
    original = {s.path.name: s for s in DetectionSplits.from_json(json.loads((runs["original"] / "splits.json").read_text())).train}
    pseudo = [s for s in splits.train if s.path.name in original]
    assert len(splits.train) == 16 + 24 + 16 and len(pseudo) == 24 + 16
    truth = {name: boxes for name, _, boxes in ring_scenes(16, 1, names=("disc", "square", "ring"), prefix="old")}
    added = correct = 0
    for s in pseudo:
        before = original[s.path.name]
        assert np.array_equal(s.boxes[s.labels < 2], before.boxes) and np.array_equal(s.labels[s.labels < 2], before.labels)  # old boxes kept
        true_rings = torch.tensor([b for b, label in truth.get(s.path.stem, []) if label == 2], dtype=torch.float32).reshape(-1, 4)
        new = torch.as_tensor(s.boxes[s.labels == 2])
        added += len(new)
        correct += int((box_iou(new, true_rings).amax(1) >= 0.5).sum()) if len(new) and len(true_rings) else 0
    # boxes at random would almost never meet a ring at IoU 0.5; this tiny detector's are rings more often than not
    assert added == p["boxes"] and correct >= 5 and correct / added >= 0.5, (correct, added)
    history = (runs["expanded"] / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4  # the run's own epochs: pseudo_label_epochs, after the probe's


def test_an_expansion_with_pseudo_labels_resumes_bit_exact(runs, tmp_path, capsys) -> None:
    snapshot = runs["expanded"] / "snapshots" / "epoch-0002"
    code, _, err = run_cli(capsys, "expand", "--resume", snapshot, "--out", tmp_path / "resumed", "--quiet")
    assert code == 0, err
    a, b = load_file(str(runs["expanded"] / "model.safetensors")), load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]
    assert json.loads((tmp_path / "resumed" / "expand_metrics.json").read_text())["pseudo_labels"]["boxes"] == json.loads((runs["expanded"] / "expand_metrics.json").read_text())["pseudo_labels"]["boxes"]


def test_without_pseudo_labels_only_the_new_data_trains(runs, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "expand", runs["original"], "--data", runs["root"] / "rings", "--out", tmp_path / "plain", "--epochs", "2", "--set", "expand.pseudo_labels=false", "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "plain" / "expand_metrics.json").read_text())
    assert m["pseudo_labels"] is None
    assert len(json.loads((tmp_path / "plain" / "splits.json").read_text())["train"]) == 16
