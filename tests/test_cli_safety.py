"""Regressions found in review: nothing a user owns is deleted, and every mistake is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from graft.cli import main, one_line
from graft.demo import run_demo
from graft.errors import DataError
from helpers import make_class_folders, tiny_config


def config_file(tmp_path: Path, data: Path, **sections) -> Path:
    cfg = tiny_config(data, **sections)
    cfg["model"]["name"] = "test_resnet"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def run(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    cfg = config_file(tmp_path, data)
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--epochs", "1", "--fine-tune-epochs", "1", "--quiet"]) == 0
    return data, cfg, out


def test_overwrite_with_a_bad_setting_keeps_the_old_run(run, capsys):
    data, cfg, out = run
    before = (out / "model.safetensors").read_bytes()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--fine-tune-at", "999", "--overwrite", "--quiet"]) == 2
    assert "999" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert (out / "snapshots" / "last").is_file()


def test_resume_into_another_run_folder_needs_overwrite(run, tmp_path, capsys):
    data, cfg, out = run
    other = tmp_path / "other"
    assert main(["train", "--config", str(cfg), "--out", str(other), "--strategy", "feature-extract", "--epochs", "1", "--quiet"]) == 0
    history = (other / "history.csv").read_text()
    assert main(["train", "--resume", str(out / "snapshots" / "epoch-0001"), "--out", str(other), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (other / "history.csv").read_text() == history
    assert main(["train", "--resume", str(out / "snapshots" / "epoch-0001"), "--out", str(other), "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in (other / "snapshots").iterdir()) == ["best", "epoch-0002", "last"]
    assert (other / "weights_report.json").is_file()  # carried over from the source run


def test_resumed_run_reports_total_training_time_and_epoch_start_lr(run, tmp_path):
    data, cfg, out = run
    from graft.engine.checkpoint import load_snapshot

    before = load_snapshot(out / "snapshots" / "epoch-0001")["loop"]["elapsed"]
    assert before > 0
    assert main(["train", "--resume", str(out / "snapshots" / "epoch-0001"), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    again = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert again["train_seconds"] >= before  # the time of the epoch done before the resume is counted
    rows = (out / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    first_lr = float(rows[1].split(",")[header.index("lr")])
    decided = json.loads((out / "metrics.json").read_text())["decided"]["head_lr"]
    assert first_lr == pytest.approx(decided)  # the rate the epoch started at (train.head_lr: auto), not where it ended


def test_an_image_that_breaks_after_the_scan_is_one_line_even_from_a_worker(run, tmp_path, capsys):
    data, cfg, out = run
    snap = out / "snapshots" / "epoch-0001"
    from graft.engine import checkpoint

    payload = checkpoint.load_snapshot(snap)
    payload["config"]["data"]["num_workers"] = 1
    checkpoint.save_snapshot(tmp_path / "s" / "snapshots" / "x", {k: v for k, v in payload.items() if k not in ("format", "path")})
    for image in data.rglob("*.png"):
        image.write_bytes(b"junk")
    assert main(["train", "--resume", str(tmp_path / "s" / "snapshots" / "x"), "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ".png" in err


def test_one_line_unwraps_a_worker_traceback():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File x\ngraft.errors.DataError: /d/a.png: not an image")
    assert one_line(wrapped) == "/d/a.png: not an image"
    assert one_line(DataError("plain message")) == "plain message"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strategy", "feature-extract", "--epochs", "0"], "nothing to train"),
        (["--batch-size", "1", "--fine-tune-at", "0", "--set", "model.bn_inference=false"], "batch-size 2"),
    ],
)
def test_settings_that_cannot_train_are_refused(run, tmp_path, capsys, extra, message):
    data, cfg, _ = run
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "n"), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "n" / "snapshots").exists()


@pytest.mark.parametrize("argv", [["eval", "R", "--data", "D", "--batch-size", "0"], ["predict", "R", "D", "--top-k", "0"], ["plan", "--classes", "-3"], ["train", "--epochs", "-1"]])
def test_non_positive_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_eval_out_must_be_a_file(run, tmp_path, capsys):
    data, _, out = run
    assert main(["eval", str(out), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_plan_checks_the_data_folder(tmp_path, capsys):
    assert main(["plan", "--model", "test_resnet", "--set", "model.weights=none", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    make_class_folders(tmp_path / "one", per_class=1, classes={"only": (1, 2, 3)})
    assert main(["plan", "--model", "test_resnet", "--set", "model.weights=none", "--data", str(tmp_path / "one")]) == 2
    assert "at least 2 classes" in capsys.readouterr().err


def test_resume_names_every_flag_it_cannot_change(run, capsys):
    _, _, out = run
    assert main(["train", "--resume", str(out / "snapshots" / "last"), "--strict"]) == 2
    assert "--strict cannot be changed" in capsys.readouterr().err


def test_demo_never_touches_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "proj" / "data" / "important.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("precious")
    with pytest.raises(DataError, match="not made by `graft demo`"):
        run_demo(tmp_path / "proj", epochs=1, fine_tune_epochs=0, quiet=True)
    assert precious.read_text() == "precious"


def test_demo_validates_before_writing_anything(tmp_path):
    from graft.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to train"):
        run_demo(tmp_path / "new", epochs=0, fine_tune_epochs=0, quiet=True)
    assert not (tmp_path / "new").exists()


def test_ctrl_c_before_the_first_snapshot_says_there_is_nothing_to_resume(monkeypatch, capsys):
    """Ctrl-C while auto is being decided (trials write no snapshot) must not suggest --resume None."""
    from graft import cli
    from graft.engine.loop import Interrupted

    def interrupted(args):
        raise Interrupted(None)

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train", "--data", "d", "--out", "o"]) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "None" not in err


def test_an_overwrite_killed_while_moving_the_old_run_aside_is_finished_not_lost(run, monkeypatch, capsys):
    """Found by the crash harness: a stash killed half way left part of the old run in .replaced,
    which the next --overwrite took for a whole stash, deleting the rest of the old run."""
    import os as real_os

    from graft.engine import run_folder

    data, cfg, out = run
    old_model = (out / "model.safetensors").read_bytes()
    moves = []

    def dies_on_the_third_move(src, dst):
        moves.append(src)
        if len(moves) == 3:
            raise KeyboardInterrupt  # as a kill: the stash stops between two moves
        real_os.replace(src, dst)

    monkeypatch.setattr(run_folder.os, "replace", dies_on_the_third_move)
    with pytest.raises(KeyboardInterrupt):
        run_folder.stash_run(out)
    monkeypatch.undo()
    assert not (out / ".replaced").exists() and (out / ".replacing").is_dir()
    assert run_folder.holds_run(out)  # so a plain rerun asks for --overwrite instead of ignoring it

    # The next --overwrite is itself stopped before it finishes: the old run must be whole in .replaced.
    assert main(["train", "--config", str(cfg), "--out", str(out), "--fine-tune-at", "999", "--overwrite", "--quiet"]) == 2
    capsys.readouterr()
    stash = run_folder.stash_run(out)
    assert (stash / "model.safetensors").read_bytes() == old_model
    assert {"model.json", "history.csv", "metrics.json", "snapshots"} <= {p.name for p in stash.iterdir()}


def test_a_run_killed_before_naming_its_first_snapshot_last_points_to_the_snapshot_it_has(run, tmp_path, capsys):
    """Found by the crash harness: killed between writing epoch-0001 and linking it as last, every
    hint (--resume RUN/snapshots/last, --resume RUN, the rerun's hint) named a file that was not there."""
    data, cfg, out = run
    snapshots = out / "snapshots"
    for p in snapshots.iterdir():
        if p.name != "epoch-0001":
            p.unlink()
    for name in ("model.json", "history.csv"):
        (out / name).unlink()
    code, _, err = (main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]), *capsys.readouterr())
    assert code == 2 and f"continue it with --resume {snapshots / 'epoch-0001'}," in err
    assert main(["train", "--resume", str(snapshots / "last"), "--quiet"]) == 2
    assert f"the newest snapshot there is {snapshots / 'epoch-0001'}: resume from it" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # the folder resumes from its newest snapshot


def test_a_snapshots_folder_with_only_a_killed_writers_temporary_file_is_no_run(tmp_path):
    from graft.engine.run_folder import holds_run

    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / ".epoch-0001.4242-abc.tmp").write_bytes(b"half")
    assert not holds_run(tmp_path)
    (tmp_path / "snapshots" / "epoch-0001").write_bytes(b"whole")
    assert holds_run(tmp_path)
