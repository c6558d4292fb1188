"""The golden set: fixed-seed runs of every command that trains (a classifier's two-phase run, its
expansion and resume; a detector's run and its expansion), compared with what the code gave when
the set was recorded (``tests/golden.json``): the weights bit for bit, every figure of
``metrics.json``/``expand_metrics.json`` and every row of ``history.csv`` except wall-clock times.

A change meant to keep behaviour (moving code between modules, splitting a runner) keeps them. A
change meant to alter results re-records them and says so in its commit::

    GRAFT_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest

from box_data import ring_scenes, three_splits, write_yolo
from graft.cli import main
from helpers import make_class_folders

GOLDEN = Path(__file__).with_name("golden.json")
RECORD = os.environ.get("GRAFT_RECORD_GOLDEN") == "1"
TINY = ["--set", "model.name=test_efficientnet", "--weights", "none", "--set", "data.num_workers=0", "--set", "train.device=cpu", "--set", "solver.base_lr=0.01", "--quiet"]
CLOCK = ("seconds", "time", "date", "version")  # keys that name a moment or a build, not a result


def commands(root: Path) -> dict[str, list[str]]:
    """Each golden run: its name and the CLI command that makes it, in order."""
    colours = make_class_folders(root / "colours", per_class=10)
    yellow = make_class_folders(root / "yellow", per_class=10, classes={"yellow": (210, 200, 40)}, seed=1)
    boxes = write_yolo(root / "boxes", three_splits(n_train=12, n_val=4, n_test=4))
    rings = write_yolo(root / "rings", {"train": ring_scenes(8, 5), "val": ring_scenes(4, 6, prefix="val")}, names=["ring"])
    runs = root / "runs"
    classify = ["--img-size", "32", "--batch-size", "8", "--epochs", "2", "--fine-tune-epochs", "2", "--augment", "flip", "--set", "solver.snapshot=1"]
    detect = ["--model", "fcos", "--img-size", "64", "--batch-size", "4", "--epochs", "2", "--fine-tune-epochs", "1", "--augment", "flip"]
    return {
        "classify": ["train", "--data", str(colours), "--out", str(runs / "classify"), *classify, *TINY],
        "classify-resumed": ["train", "--resume", str(runs / "classify" / "snapshots" / "epoch-0002"), "--out", str(runs / "classify-resumed"), "--quiet"],
        "classify-expand": ["expand", str(runs / "classify"), "--data", str(yellow), "--out", str(runs / "classify-expand"), "--epochs", "2", "--quiet"],
        "detect": ["train", "--data", str(boxes), "--out", str(runs / "detect"), *detect, *TINY],
        "detect-expand": ["expand", str(runs / "detect"), "--data", str(rings), "--out", str(runs / "detect-expand"), "--epochs", "2", "--set", "expand.pseudo_label_epochs=1", "--quiet"],
    }


def leaves(value: object, path: str = "") -> dict[str, object]:
    """Every leaf of a JSON document by its path (a list of plain values is one leaf), without the
    keys that name a moment or a build."""
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if not any(word in k for word in CLOCK)]
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return {path: value}
    out: dict[str, object] = {}
    for k, v in items:
        out.update(leaves(v, f"{path}.{k}" if path else k))
    return out


def fingerprint(run: Path, root: Path) -> dict[str, object]:
    """What must not change: the weights' digest, the results' figures, the history without times
    (paths inside messages are written relative to the test's folder)."""

    def document(name: str) -> dict:
        return json.loads((run / name).read_text().replace(str(root), "<root>"))

    with open(run / "history.csv", newline="") as f:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    out = {"weights_sha256": hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest(), "history": history,
           "metrics": leaves(document("metrics.json"))}
    if (run / "expand_metrics.json").is_file():
        out["expand_metrics"] = leaves(document("expand_metrics.json"))
    return out


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory) -> dict[str, dict[str, object]]:
    root = tmp_path_factory.mktemp("golden")
    made = {}
    # A cache of its own: embeddings another test computed for the same files (in other batches,
    # so different in the last bits) would make the set depend on which tests ran before it.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAFT_CACHE_DIR", str(root / "cache"))
        for name, command in commands(root).items():
            assert main(command) == 0, name
            made[name] = fingerprint(root / "runs" / name, root)
    if RECORD:
        GOLDEN.write_text(json.dumps(made, indent=1, sort_keys=True) + "\n")
    return made


@pytest.mark.parametrize("name", ["classify", "classify-resumed", "classify-expand", "detect", "detect-expand"])
def test_a_run_gives_what_it_gave_when_the_set_was_recorded(golden_runs, name) -> None:
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: record it with GRAFT_RECORD_GOLDEN=1 (see this module's docstring)"
    expected = json.loads(GOLDEN.read_text())[name]
    got = json.loads(json.dumps(golden_runs[name]))  # as stored: tuples become lists
    for part in expected:
        if part == "weights_sha256":
            continue
        assert got[part] == expected[part], f"{name}: {part} differs from the golden set"
    assert got["weights_sha256"] == expected["weights_sha256"], f"{name}: the weights differ from the golden set"


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(golden_runs) -> None:
    assert golden_runs["classify-resumed"]["weights_sha256"] == golden_runs["classify"]["weights_sha256"]
