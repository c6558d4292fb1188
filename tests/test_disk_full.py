"""A full disk (real ENOSPC on a small tmpfs) and a file size limit (real EFBIG through
RLIMIT_FSIZE in a subprocess): the error names the file and the space it needs, exit status 2, the
previous snapshot still loads, no temporary file is left, a cache write that fails is only "not
cached", and once there is room the run resumes to the weights of a run that never stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from graft.engine import checkpoint
from helpers import make_class_folders, run_cli, tiny_config

DRIVER = Path(__file__).with_name("disk_full_driver.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The data, a config (2 frozen + 2 fine-tuning epochs) and the weights of the run uninterrupted."""
    root = tmp_path_factory.mktemp("disk-full")
    data = make_class_folders(root / "data", per_class=10)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, data={"augment": "none"}, train={"head_lr": 0.01})))
    from graft.cli import main

    # A cache of its own: embeddings another test computed (in other batches) differ in the last bits.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAFT_CACHE_DIR", str(root / "cache"))
        assert main(["train", "--config", str(config), "--out", str(root / "whole"), "--quiet"]) == 0
    return {"config": config, "weights": load_file(str(root / "whole" / "model.safetensors"))}


def _limited(name: str, *args, once: bool = False, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAFT_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, str(DRIVER), name, *(["--once"] if once else []), "--", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def _same_weights(run: Path, expected: dict) -> bool:
    got = load_file(str(run / "model.safetensors"))
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_file_size_limit_at_a_snapshot_stops_the_run_cleanly_and_it_resumes_exactly(job, tmp_path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))  # the resume below reads the failed run's cache
    failed = _limited("epoch-0003", "train", "--config", job["config"], "--out", run, "--quiet", cache=tmp_path / "cache")
    assert failed.returncode == 2, failed.stderr
    err = failed.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"could not write {run / 'snapshots' / 'epoch-0003'}: the file size limit (ulimit -f) was reached (it needs about " in err
    assert f"graft train --resume {run / 'snapshots' / 'last'}" in err
    assert _temps(run) == []
    assert checkpoint.load_snapshot(run / "snapshots" / "last")["loop"]["epoch"] == 2

    code, _, err = run_cli(capsys, "train", "--resume", run / "snapshots" / "last", "--quiet")
    assert code == 0, err
    assert _same_weights(run, job["weights"])


def test_a_cache_entry_that_cannot_be_written_is_not_cached_and_the_run_goes_on(job, tmp_path) -> None:
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    done = _limited(".safetensors", "train", "--config", job["config"], "--out", run, "--quiet", once=True, cache=cache)
    assert done.returncode == 0, done.stderr
    assert "not cached: " in done.stderr and "embeddings (could not write " in done.stderr and "file size limit" in done.stderr
    assert _same_weights(run, job["weights"])
    assert _temps(cache) == [] and _temps(run) == []


def test_a_full_disk_stops_the_run_with_the_space_it_needs_and_the_run_resumes_once_freed(job, small_disk, capsys, monkeypatch, tmp_path) -> None:
    run = small_disk / "run"
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "train", "--config", job["config"], "--out", run, "--quiet")
    assert code == 2
    assert "no space left on the device (it needs about " in err and f"could not write {run}" in err
    assert _temps(run) == []
    snapshot = checkpoint.load_snapshot(run / "snapshots" / "last")  # the last one written whole
    assert snapshot["loop"]["epoch"] >= 1

    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True)
    code, _, err = run_cli(capsys, "train", "--resume", run / "snapshots" / "last", "--quiet")
    assert code == 0, err
    assert _same_weights(run, job["weights"])
