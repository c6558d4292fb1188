"""End-to-end: the `graft` command as a user drives it, on a tiny model and generated images."""

from __future__ import annotations

import csv
import re
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from graft.cli import main
from helpers import make_class_folders, tiny_config


GRAFT = [sys.executable, "-m", "graft.cli"]


def write_config(path: Path, data_dir: Path, **sections) -> Path:
    cfg = tiny_config(data_dir, **sections)
    del cfg["data"]["dir"]
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`graft train` on class folders that include a corrupt file, a text file and a hidden file."""
    root = tmp_path_factory.mktemp("cli")
    data = make_class_folders(root / "data")
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (data / "green" / "notes.txt").write_text("shot on a sunny day")
    (data / "blue" / ".DS_Store").write_bytes(b"\x00\x01")
    config = write_config(root / "tiny.yaml", data)
    run = root / "run"
    rc = main(["train", "--data", str(data), "--out", str(run), "--config", str(config), "--model", "test_resnet", "--set", "solver.base_lr=0.02", "--epochs", "2", "--fine-tune-epochs", "1", "--quiet"])
    assert rc == 0
    return root, data, run


def test_train_writes_every_output_of_a_run(trained):
    _, data, run = trained
    for name in ["model.safetensors", "model.json", "history.csv", "metrics.json", "config.yaml", "splits.json", "weights_report.json", "learning_curves.png", "confusion_matrix.png", "predictions.png"]:
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["best", "epoch-0001", "epoch-0002", "epoch-0003", "last"]
    info = json.loads((run / "model.json").read_text())
    assert info["classes"] == ["blue", "green", "red"]
    assert info["head"]["layer"] == "head.fc" and info["preprocessing"]["input_size"] == 32
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [r["phase"] for r in rows] == ["feature-extract", "feature-extract", "fine-tune"]
    assert {"epoch", "phase", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"} <= set(rows[0])


def test_flags_and_set_override_the_config_file_and_are_saved_resolved(trained):
    _, _, run = trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["solver"]["base_lr"] == 0.02  # --set over the file's 0.01
    assert saved["train"]["epochs"] == 2 and saved["train"]["fine_tune_epochs"] == 1  # flags over the file


def test_metrics_json_lists_skipped_files_and_per_class_scores(trained):
    _, data, run = trained
    m = json.loads((run / "metrics.json").read_text())
    assert {"val_accuracy", "test_accuracy", "classes", "per_class", "train_seconds", "skipped_files"} <= set(m)
    assert m["test_accuracy"] is None
    skipped = {Path(s["path"]).name: s["reason"] for s in m["skipped_files"]}
    assert set(skipped) == {"broken.jpg", "notes.txt"}  # the hidden file is ignored, not reported
    assert set(m["per_class"]) == {"blue", "green", "red"}
    assert set(m["per_class"]["red"]) == {"precision", "recall", "f1", "support"}
    assert m["val_accuracy"] > 0.5  # three classes: chance is 1/3


def test_eval_prints_json_metrics(trained, capsys):
    _, data, run = trained
    assert main(["eval", str(run), "--data", str(data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_class"]) == {"blue", "green", "red"}
    assert out["per_class"]["blue"]["support"] == 12
    assert 0 <= out["accuracy"] <= 1 and out["loss"] > 0


@pytest.mark.parametrize("split", ["test", "val", "valid"])
def test_eval_on_a_folder_with_only_an_evaluation_split(trained, tmp_path, capsys, split):
    _, data, run = trained
    only = tmp_path / "only" / split
    for c in ("blue", "green", "red"):
        (only / c).mkdir(parents=True)
        for p in sorted((data / c).glob("*.png"))[:4]:
            (only / c / p.name).write_bytes(p.read_bytes())
    assert main(["eval", str(run), "--data", str(tmp_path / "only")]) == 0
    from_split = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--data", str(only)]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert from_split["per_class"]["red"]["support"] == 4
    assert from_split["accuracy"] == direct["accuracy"] and from_split["loss"] == pytest.approx(direct["loss"])
    assert f"evaluating {split}/" in from_split["warnings"][0]


def test_quiet_train_and_eval_still_report_skipped_files(tmp_path, capsys):
    """--quiet hides progress, not the files left out: a count and one example on stderr."""
    data = make_class_folders(tmp_path / "data", per_class=6)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (data / "green" / "empty.png").write_bytes(b"")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--config", str(write_config(tmp_path / "c.yaml", data)), "--strategy", "feature-extract", "--epochs", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped 2 unreadable files, listed in {run / 'metrics.json'}; e.g. " in err
    assert "epoch" not in err  # progress stays hidden
    assert main(["eval", str(run), "--data", str(data)]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)["skipped_files"]) == 2
    assert "warning: skipped 2 unreadable files, listed in the JSON output; e.g. " in out.err and "empty.png: zero-byte file" in out.err


def test_eval_on_a_class_the_model_does_not_know_is_a_clear_error(trained, tmp_path, capsys):
    _, _, run = trained
    other = make_class_folders(tmp_path / "other", per_class=2, classes={"red": (200, 40, 40), "purple": (120, 0, 120)})
    assert main(["eval", str(run), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "purple" in err and "Traceback" not in err


def test_predict_csv_with_top_k_over_files_and_folders(trained, capsys):
    _, data, run = trained
    assert main(["predict", str(run), str(data / "red" / "red_00.png"), str(data / "blue"), "--top-k", "3", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 + 12
    assert set(rows[0]) == {"path", "class1", "prob1", "class2", "prob2", "class3", "prob3", "error"}
    probs = [float(rows[0][f"prob{i}"]) for i in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    assert {rows[0][f"class{i}"] for i in (1, 2, 3)} == {"red", "green", "blue"}


def test_predict_reports_an_unreadable_file_and_keeps_the_others(trained, tmp_path, capsys):
    _, data, run = trained
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    rc = main(["predict", str(run), str(data / "red" / "red_01.png"), str(bad), "--format", "json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert rc == 2
    assert out[0]["error"] is None and out[0]["predictions"][0]["class"] in {"red", "green", "blue"}
    assert "bad.png" in out[1]["error"] and "bad.png" in captured.err


def test_plan_shows_what_learns_in_each_phase(trained, capsys):
    root, data, _ = trained
    assert main(["plan", "--config", str(root / "tiny.yaml"), "--data", str(data), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_classes"] == 3
    extract, tune = plan["phases"]
    assert extract["parameters"]["trainable"] == plan["phases"][0]["groups"][0]["parameters"] + sum(g["parameters"] for g in extract["groups"][1:])
    assert extract["backbone_layers_learning"] == 0 and tune["backbone_layers_learning"] > 0
    assert tune["lr"] == pytest.approx(extract["lr"] * 0.1)


def test_resume_continues_into_the_snapshot_run(trained, tmp_path):
    _, _, run = trained
    out = tmp_path / "resumed"
    assert main(["train", "--resume", str(run / "snapshots" / "epoch-0002"), "--out", str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").is_file()
    assert len(list(csv.DictReader((out / "history.csv").open()))) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--resume", "RUN/snapshots/last", "--weights", "x.safetensors"], "either --weights"),
        (["train", "--resume", "RUN/snapshots/last", "--set", "solver.base_lr=1"], "--weights SNAPSHOT"),
        (["train", "--data", "DATA", "--out", "RUN"], "already holds a run"),
        (["train", "--data", "DATA", "--out", "NEW", "--set", "solver.base_lrr=1"], "solver.base_lrr"),
        (["train", "--data", "DATA", "--out", "NEW", "--set", "solver.lr_policy=linear"], "cosine"),
        (["train", "--data", "NOWHERE", "--out", "NEW"], "NOWHERE"),
        (["train", "--data", "DATA", "--out", "NEW", "--weights", "missing.pt"], "missing.pt"),
        (["train", "--resume", "NOWHERE/last"], "NOWHERE"),
        (["eval", "NOWHERE", "--data", "DATA"], "not a finished graft run"),
        (["predict", "RUN", "NOWHERE.jpg"], "NOWHERE.jpg"),
        (["predict", "RUN/snapshots/last", "DATA"], "is a snapshot, for --resume or --weights, not a model to predict with: predict with the run folder"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(trained, tmp_path, capsys, argv, message):
    _, data, run = trained
    subst = {"RUN": str(run), "DATA": str(data), "NEW": str(tmp_path / "new"), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [next((a.replace(k, v) for k, v in subst.items() if a.startswith(k)), a) for a in argv]
    assert main(argv + (["--quiet"] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert message.replace("NOWHERE", "nowhere") in err
    assert "Traceback" not in err and err.startswith("error: ")


def test_overwrite_replaces_a_finished_run(trained, tmp_path):
    root, data, run = trained
    out = tmp_path / "again"
    args = ["train", "--data", str(data), "--out", str(out), "--config", str(root / "tiny.yaml"), "--strategy", "feature-extract", "--epochs", "1", "--quiet"]
    assert main(args) == 0
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0


def test_strict_fails_on_the_corrupt_file(trained, tmp_path, capsys):
    root, data, _ = trained
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "s"), "--config", str(root / "tiny.yaml"), "--strict", "--quiet"])
    assert rc == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_split_folders_with_test_report_test_accuracy(tmp_path):
    data = tmp_path / "split"
    make_class_folders(data / "train", per_class=10)
    make_class_folders(data / "test", per_class=3, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--config", str(write_config(tmp_path / "c.yaml", data)), "--strategy", "feature-extract", "--epochs", "2", "--quiet"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_accuracy"] is not None and m["per_class_split"] == "test"
    splits = json.loads((run / "splits.json").read_text())
    assert splits["layout"] == "split-folders"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH")]))
    return env


def test_the_installed_command_exits_non_zero_with_a_one_line_error(tmp_path):
    proc = subprocess.run([*GRAFT, "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def past_epoch(run: Path, epoch: int) -> bool:
    """Has the run written a numbered snapshot of ``epoch`` or later (older ones are pruned)?"""
    return any(p.name[6:].isdigit() and int(p.name[6:]) >= epoch for p in (run / "snapshots").glob("epoch-*"))


def test_ctrl_c_writes_a_resumable_snapshot_and_exits_130(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=20)
    config = write_config(tmp_path / "c.yaml", data, train={"strategy": "feature-extract", "epochs": 500, "head_lr": 0.01})
    run = tmp_path / "run"
    # A shell that starts jobs in the background (`make test &`) makes them ignore SIGINT, and the
    # child would inherit that: give it the default disposition, as a terminal would.
    proc = subprocess.Popen(
        [*GRAFT, "train", "--data", str(data), "--out", str(run), "--config", str(config)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 90
        while not past_epoch(run, 2) and time.time() < deadline:
            time.sleep(0.05)
        assert past_epoch(run, 2), "training did not get going"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "graft train --resume" in err and "Traceback" not in err
    from graft.engine.checkpoint import load_snapshot

    snap = load_snapshot(run / "snapshots" / "last")
    assert snap["loop"]["epoch"] >= 2 and snap["loop"]["phase"] == 0
    assert not (run / "model.safetensors").exists()


def test_predict_table_is_the_default(trained, capsys):
    _, data, run = trained
    assert main(["predict", str(run), str(data / "green" / "green_03.png"), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(data / "green" / "green_03.png"))
    assert len(re.findall(r"(red|green|blue) +\d+\.\d%", line)) == 2
