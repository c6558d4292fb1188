"""Resuming from a snapshot gives the same final weights as never stopping: in either phase,
mid-epoch after Ctrl-C, and with a different number of data-loading workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graft.configuration import parse_config
from graft.errors import ConfigError, SnapshotError
from graft.engine import checkpoint
from graft.engine.loop import Interrupted
from graft.pipeline.train import train
from helpers import StopAfter, tiny_config


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """An uninterrupted two-phase run (2 + 2 epochs), the reference for every resume."""
    from helpers import make_class_folders

    root = tmp_path_factory.mktemp("resume")
    data = make_class_folders(root / "data")
    cfg = tiny_config(data, solver={"keep_snapshots": 10})  # every epoch's snapshot, to resume from each
    result = train(parse_config(cfg), root / "full", quiet=True)
    return result.run_dir, cfg, result.history


def test_snapshots_are_written_every_epoch_and_last_is_the_newest(full_run):
    run_dir, _, history = full_run
    names = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert names == ["best", "epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004", "last"]
    last = checkpoint.load_snapshot(run_dir / "snapshots" / "last")
    assert last["loop"]["epoch"] == 4 and last["loop"]["phase"] == 1
    assert len(history) == 4 and [r["phase"] for r in history] == ["feature-extract"] * 2 + ["fine-tune"] * 2


@pytest.mark.parametrize("epoch", [1, 3], ids=["in-feature-extract-phase", "in-fine-tune-phase"])
def test_resume_after_epoch_gives_identical_weights(full_run, tmp_path, epoch):
    run_dir, _, history = full_run
    resumed = train(None, tmp_path / "resumed", resume=run_dir / "snapshots" / f"epoch-{epoch:04d}", quiet=True)
    assert_same_weights(run_dir, resumed.run_dir)
    assert strip_time(resumed.history) == strip_time(history)


def test_resume_restores_the_learning_rate_of_the_snapshot_phase(full_run, tmp_path):
    """Resuming in phase 2 must continue at the fine-tuning LR (base * 0.1), not restart phase 1's."""
    run_dir, _, history = full_run
    resumed = train(None, tmp_path / "r", resume=run_dir / "snapshots" / "epoch-0003", quiet=True)
    assert resumed.history[3]["lr"] == pytest.approx(history[3]["lr"])
    assert resumed.history[3]["phase"] == "fine-tune"


def test_ctrl_c_mid_epoch_saves_a_snapshot_that_resumes_exactly(full_run, tmp_path):
    run_dir, cfg, history = full_run
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted) as stop:
        train(parse_config(cfg), out, quiet=True, hooks=[StopAfter(epoch=3, steps=2)])
    snap = checkpoint.load_snapshot(stop.value.snapshot)
    assert snap["loop"]["batch"] == 2 and snap["loop"]["epoch"] == 2 and snap["loop"]["phase"] == 1
    assert not (out / "model.safetensors").exists()
    resumed = train(None, None, resume=stop.value.snapshot, quiet=True)
    assert resumed.run_dir.resolve() == out.resolve()
    assert_same_weights(run_dir, out)
    assert strip_time(resumed.history) == strip_time(history)


def test_resume_with_data_loading_workers_matches_in_process_loading(full_run, tmp_path):
    """Augmentation is seeded per (epoch, image), so worker processes change nothing."""
    run_dir, cfg, _ = full_run
    snap = checkpoint.load_snapshot(run_dir / "snapshots" / "epoch-0001")
    snap["config"]["data"]["num_workers"] = 1
    checkpoint.save_snapshot(tmp_path / "snapshots" / "epoch-0001", {k: v for k, v in snap.items() if k not in ("format", "path")})
    train(None, tmp_path / "w", resume=tmp_path / "snapshots" / "epoch-0001", quiet=True)
    assert_same_weights(run_dir, tmp_path / "w")


def test_resume_refuses_a_new_config(full_run):
    run_dir, cfg, _ = full_run
    with pytest.raises(ConfigError, match="--weights"):
        train(parse_config(cfg), None, resume=run_dir / "snapshots" / "last", quiet=True)


def test_corrupt_snapshot_is_a_clear_error(tmp_path):
    bad = tmp_path / "snapshots" / "last"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a snapshot at all")
    with pytest.raises(SnapshotError, match=str(bad)):
        checkpoint.load_snapshot(bad)
    with pytest.raises(SnapshotError, match="snapshot not found: .*nothing-here"):
        checkpoint.load_snapshot(tmp_path / "nothing-here")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(SnapshotError, match="is a folder without snapshots; pass a snapshot file"):
        checkpoint.load_snapshot(tmp_path / "empty-run")


def test_snapshot_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous snapshot intact and no temp file."""
    path = tmp_path / "last"
    checkpoint.save_snapshot(path, {"loop": {"epoch": 1}})

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_snapshot(path, {"loop": {"epoch": 2}})
    monkeypatch.undo()
    assert checkpoint.load_snapshot(path)["loop"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
