"""The shared cache: bounded (least recently used go first), swept of killed writers' leftovers,
listed and cleared by `graft cache`, and a write that fails is "not cached", never a failed run."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from graft import cache
from graft.errors import ConfigError
from helpers import make_class_folders, run_cli, tiny_config


def _entry(root: Path, kind: str, name: str, size: int, age_s: float) -> Path:
    path = root / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_prune_removes_the_least_recently_used_first_and_a_read_counts_as_a_use(tmp_path: Path) -> None:
    old = _entry(tmp_path, "decoded", "a-256-bilinear.npy", 400, age_s=3000)
    older_but_read = _entry(tmp_path, "decoded", "b-256-bilinear.npy", 400, age_s=4000)
    new = _entry(tmp_path, "embeddings/ab", "ab.safetensors", 400, age_s=10)
    cache.mark_used(older_but_read)
    removed = cache.prune(tmp_path, 900)
    assert [e.path for e in removed] == [old]
    assert older_but_read.exists() and new.exists()
    assert sum(e.bytes for e in cache.entries(tmp_path)) == 800


def test_entries_leave_out_locks_and_temporary_files(tmp_path: Path) -> None:
    _entry(tmp_path, "embeddings/ab", "ab.safetensors", 10, 0)
    _entry(tmp_path, "embeddings/ab", "ab.safetensors.lock", 0, 0)
    _entry(tmp_path, "embeddings/ab", f".ab.safetensors.{os.getpid()}-x1.tmp", 5, 0)
    assert [e.path.name for e in cache.entries(tmp_path)] == ["ab.safetensors"]


def test_the_cap_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("GRAFT_CACHE_MAX_GB", raising=False)
    assert cache.max_bytes() == 10 * 10**9
    monkeypatch.setenv("GRAFT_CACHE_MAX_GB", "0.5")
    assert cache.max_bytes() == 5 * 10**8
    monkeypatch.setenv("GRAFT_CACHE_MAX_GB", "0")
    assert cache.max_bytes() is None
    monkeypatch.setenv("GRAFT_CACHE_MAX_GB", "lots")
    with pytest.raises(ConfigError, match="GRAFT_CACHE_MAX_GB='lots'"):
        cache.max_bytes()


def test_a_store_past_the_cap_evicts_the_oldest_entries(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GRAFT_CACHE_MAX_GB", str(1000 / 1e9))
    cache._Budget.sizes.clear()
    first = _entry(tmp_path, "decoded", "a-1-x.npy", 600, age_s=100)
    assert cache.store(tmp_path / "decoded" / "b-1-x.npy", lambda tmp: tmp.write_bytes(b"y" * 600), what="b")
    assert not first.exists() and (tmp_path / "decoded" / "b-1-x.npy").exists()


def test_the_sweep_removes_a_dead_writers_temporary_and_spill_files_and_keeps_a_live_ones(tmp_path: Path) -> None:
    dead = _dead_pid()
    dead_tmp = _entry(tmp_path, "embeddings/ab", f".ab.safetensors.{dead}-q1.tmp", 5, 0)
    live_tmp = _entry(tmp_path, "embeddings/ab", f".ab.safetensors.{os.getppid()}-q2.tmp", 5, 0)
    dead_spill = _entry(tmp_path, "features", f"{cache.SPILL_PREFIX}{dead}-abc.f16", 5, 0)
    live_spill = _entry(tmp_path, "features", f"{cache.SPILL_PREFIX}{os.getpid()}-abc.f16", 5, 0)
    removed = cache.sweep(tmp_path)
    assert sorted(removed) == sorted([dead_tmp, dead_spill])
    assert live_tmp.exists() and live_spill.exists()
    # A live writer's file is kept for a day, then taken as orphaned (a reused process id).
    os.utime(live_tmp, (time.time() - 2 * 86400,) * 2)
    assert cache.sweep(tmp_path) == [live_tmp]


def test_a_cache_write_without_room_is_a_warning_and_not_cached(tmp_path: Path, capsys) -> None:
    def full(tmp: Path) -> None:
        tmp.write_bytes(b"z" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert not cache.store(tmp_path / "decoded" / "a-1-x.npy", full, what="decoded a.png")
    err = capsys.readouterr().err
    assert "not cached: decoded a.png" in err and "no space left" in err and str(tmp_path / "decoded" / "a-1-x.npy") in err
    assert list((tmp_path / "decoded").iterdir()) == []


def test_graft_cache_lists_prunes_and_clears_what_a_run_cached(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "cache"
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(root))
    data = make_class_folders(tmp_path / "data", per_class=6)
    config = tmp_path / "config.yaml"
    # decode_cache_mb 0.001: the decoded images go to the disk cache as well.
    config.write_text(yaml.safe_dump(tiny_config(data, data={"augment": "none", "decode_cache_mb": 0.001}, train={"head_lr": 0.01})))
    assert run_cli(capsys, "train", "--config", config, "--out", tmp_path / "run", "--quiet")[0] == 0
    old = _entry(root, "decoded", "f00-99-bilinear.npy", 10, age_s=40 * 86400)

    code, out, _ = run_cli(capsys, "cache", "list")
    assert code == 0
    assert out.splitlines()[0].startswith(f"cache {root}: ") and "cap 10.0 GB" in out
    assert "embeddings " in out and "test_efficientnet 32 px" in out
    assert "decoded " in out and re.search(r"short side \d+ px, bicubic: \d+ entries", out) and "short side 99 px, bilinear: 1 entries" in out
    code, out, _ = run_cli(capsys, "cache", "list", "--entries")
    assert "f00-99-bilinear.npy" in out and "40 d ago" in out

    code, out, _ = run_cli(capsys, "cache", "prune", "--unused-days", "30")
    assert code == 0 and out.startswith("removed 1 entries") and not old.exists()
    assert any(e.kind == "decoded" for e in cache.entries(root))
    assert list(root.rglob("*.lock")) != []  # the embedding entry's
    code, out, _ = run_cli(capsys, "cache", "clear", "--kind", "decoded")
    assert code == 0 and {e.kind for e in cache.entries(root)} == {"embeddings"}
    code, out, _ = run_cli(capsys, "cache", "prune", "--max-gb", "0")
    assert code == 0 and cache.entries(root) == []
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0 and list(root.rglob("*.lock")) == []  # idle locks go with a clear
    code, _, err = run_cli(capsys, "cache", "list", "--max-gb", "1")
    assert code == 2 and "--max-gb" in err
