"""Runs racing for the shared cache: one writer killed mid-write, readers never see half an entry,
every run ends with the weights of a run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import make_class_folders, tiny_config

DRIVER = Path(__file__).with_name("cache_race_driver.py")
RACERS = 3  # plus the writer that is killed: 4 processes on the one cache key


def _graft(mode: str, cache: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "GRAFT_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen([sys.executable, str(DRIVER), mode, "--", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _complete(path: Path) -> bool:
    """The entry parses and its checksum covers its rows (what graft checks before using one)."""
    from graft.tasks.classify.embeddings import FORMAT, _checksum

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    emb = load_file(str(path))["embeddings"]
    digests = json.loads(meta["digests"])
    return meta["format"] == FORMAT and meta["sha256"] == _checksum(meta["key"], digests, emb)


class Reader(threading.Thread):
    """Reads every embedding entry under ``root`` over and over while the runs race."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.done, self.reads, self.partial = root, threading.Event(), 0, []

    def run(self) -> None:
        while not self.done.is_set():
            for path in self.root.glob("embeddings/*/*.safetensors"):
                try:
                    ok = _complete(path)
                except FileNotFoundError:
                    continue
                except Exception as err:  # noqa: BLE001 - any failure to read is a partial entry
                    ok = False
                    self.partial.append(f"{path.name}: {err}")
                self.reads += 1
                if not ok:
                    self.partial.append(path.name)
            time.sleep(0.002)


def test_racing_runs_compute_the_entry_once_never_show_half_of_it_and_equal_a_run_alone(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", per_class=12)
    config = tmp_path / "config.yaml"
    # A fixed head rate: the embedding cache is first used (and its count printed) by training.
    config.write_text(yaml.safe_dump(tiny_config(data, data={"augment": "none"}, train={"head_lr": 0.01})))
    alone = _graft("run", tmp_path / "cache-alone", "train", "--config", config, "--out", tmp_path / "alone")
    assert alone.wait(300) == 0, alone.stderr.read()

    cache = tmp_path / "cache"
    killed = _graft("kill-in-write", cache, "train", "--config", config, "--out", tmp_path / "killed")
    deadline = time.time() + 120
    while not list(cache.glob("embeddings/*/*.lock")) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the killed writer holds the entry's lock: the others start while it computes
    reader = Reader(cache)
    reader.start()
    racers = [_graft("run", cache, "train", "--config", config, "--out", tmp_path / f"race{i}") for i in range(RACERS)]
    results = [(p.wait(300), p.stderr.read()) for p in racers]
    reader.done.set()
    reader.join()

    assert killed.wait(60) == -9, killed.stderr.read()
    assert [code for code, _ in results] == [0] * RACERS, [err[-2000:] for _, err in results]
    assert reader.reads > 0 and reader.partial == []
    # The lock made one racer compute the training images' embeddings; the others reused them.
    computed = [int(err.split("embedding cache: ")[1].split(" image views")[0]) for _, err in results]
    assert sorted(computed)[:-1] == [0] * (RACERS - 1) and computed.count(0) == RACERS - 1, computed
    expected = load_file(str(tmp_path / "alone" / "model.safetensors"))
    for i in range(RACERS):
        weights = load_file(str(tmp_path / f"race{i}" / "model.safetensors"))
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), f"race{i} differs from the run alone"
    # The killed writer left its half-written temporary file; the next command sweeps it.
    left = [p for p in cache.rglob("*.tmp")]
    assert left, "the writer was killed before it wrote anything: the test did not test a kill mid-write"
    from graft import cache as graft_cache

    graft_cache.sweep(cache)
    assert list(cache.rglob("*.tmp")) == []
    assert all(_complete(p) for p in cache.glob("embeddings/*/*.safetensors"))
