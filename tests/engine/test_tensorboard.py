"""train.tensorboard: the history's columns as TensorBoard scalars, for a classifier and a
detector; a resumed run leaves one value per epoch, not two."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # a test dependency (pyproject [test])

from box_data import three_splits, write_yolo
from graft.cli import main
from graft.report.figures import read_history_csv
from helpers import make_class_folders

COMMON = ["--weights", "none", "--augment", "none", "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "train.tensorboard=true", "--quiet"]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_matches_history(run: Path, columns: list[str]) -> None:
    history, logged = read_history_csv(run / "history.csv"), scalars(run)
    for column in columns:
        assert [step for step, _ in logged[column]] == [row["epoch"] for row in history], column
        assert [value for _, value in logged[column]] == pytest.approx([row[column] for row in history], rel=1e-6), column


def test_a_classifier_run_logs_its_history_and_a_resume_does_not_repeat_epochs(tmp_path) -> None:
    data = make_class_folders(tmp_path / "colours")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "test_efficientnet", "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--fine-tune-epochs", "1", *COMMON]) == 0
    assert_matches_history(run, ["train_loss", "val_loss", "val_accuracy", "lr"])
    # continue from the second epoch's snapshot: epoch 3 is trained again, and logged once
    assert main(["train", "--resume", str(run / "snapshots" / "epoch-0002"), "--quiet"]) == 0
    assert_matches_history(run, ["train_loss", "val_accuracy"])


def test_a_detector_run_logs_its_loss_terms_and_map(tmp_path) -> None:
    data = write_yolo(tmp_path / "boxes", three_splits(n_train=8, n_val=3, n_test=3))
    run = tmp_path / "det"
    assert main(["train", "--data", str(data), "--out", str(run), "--model", "fcos", "--set", "model.name=test_efficientnet", "--img-size", "64", "--batch-size", "4",
                 "--epochs", "2", "--fine-tune-epochs", "1", *COMMON]) == 0
    assert_matches_history(run, ["train_loss", "train_loss_classification", "train_loss_bbox_regression", "val_map", "val_map50"])
