"""Snapshot retention (solver.keep_snapshots): the newest N numbered snapshots, plus ``last`` and
``best``; counted from the folder, so a resumed run goes on pruning what an earlier session wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from graft.configuration import parse_config
from graft.engine import checkpoint
from graft.engine.loop import Interrupted
from graft.pipeline.train import train
from helpers import StopAfter, make_class_folders, tiny_config


def names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "snapshots").iterdir())


def best_epoch(run: Path) -> int:
    rows = list(csv.DictReader((run / "history.csv").open()))
    return int(min(rows, key=lambda r: float(r["val_loss"]))["epoch"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("snapshots") / "data")


def test_only_the_newest_numbered_snapshots_last_and_best_are_kept(data, tmp_path) -> None:
    cfg = tiny_config(data, train={"strategy": "two-phase", "epochs": 3, "fine_tune_epochs": 3}, solver={"keep_snapshots": 2})
    result = train(parse_config(cfg), tmp_path / "run", quiet=True)
    run = result.run_dir
    assert names(run) == ["best", "epoch-0005", "epoch-0006", "last"]
    assert checkpoint.load_snapshot(run / "snapshots" / "last")["loop"]["epoch"] == 6
    best = checkpoint.load_snapshot(run / "snapshots" / "best")
    assert best["loop"]["epoch"] == best_epoch(run)  # lowest val_loss (train.early_stopping_monitor)
    resumed = train(None, tmp_path / "from-best", resume=run / "snapshots" / "best", quiet=True)  # best resumes like any snapshot
    assert len(resumed.history) == 6


def test_keep_0_leaves_only_last_and_best(data, tmp_path) -> None:
    cfg = tiny_config(data, train={"strategy": "feature-extract", "epochs": 3}, solver={"keep_snapshots": 0})
    run = train(parse_config(cfg), tmp_path / "run", quiet=True).run_dir
    assert names(run) == ["best", "last"]


def test_a_resumed_run_prunes_what_the_first_session_wrote(data, tmp_path) -> None:
    cfg = tiny_config(data, train={"strategy": "two-phase", "epochs": 3, "fine_tune_epochs": 3}, solver={"keep_snapshots": 2})
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stop:
        train(parse_config(cfg), out, quiet=True, hooks=[StopAfter(epoch=4, steps=1)])
    assert names(out) == ["best", "epoch-0002", "epoch-0003", "last"]
    first_best = checkpoint.load_snapshot(out / "snapshots" / "best")["loop"]["epoch"]
    train(None, None, resume=stop.value.snapshot, quiet=True)
    assert names(out) == ["best", "epoch-0005", "epoch-0006", "last"]
    assert checkpoint.load_snapshot(out / "snapshots" / "best")["loop"]["epoch"] == best_epoch(out)
    assert best_epoch(out) >= first_best  # the best so far travelled in the snapshot


def test_a_run_resumed_after_its_last_epoch_still_prunes(data, tmp_path) -> None:
    """Found by the crash harness: killed after the last epoch's snapshot but before its pruning,
    the resumed run trains no epoch, and so never pruned: it now prunes when training ends."""
    import shutil

    cfg = tiny_config(data, train={"strategy": "feature-extract", "epochs": 3}, solver={"keep_snapshots": 1})
    out = train(parse_config(cfg), tmp_path / "run", quiet=True).run_dir
    for epoch in (1, 2):  # as if the pruning after epoch 3 had not happened
        shutil.copyfile(out / "snapshots" / "last", out / "snapshots" / f"epoch-000{epoch}")
    train(None, None, resume=out / "snapshots" / "last", quiet=True)
    assert names(out) == ["best", "epoch-0003", "last"]
