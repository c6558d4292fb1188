"""Runs racing for the shared cache: one writer killed mid-write, readers never see half an entry,
the entry is computed once, and every run ends with the weights of a run alone."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from cache_race_driver import complete, race, start
from helpers import make_class_folders, tiny_config

RACERS = 2  # plus the writer that is killed: 3 processes on the one cache key (benchmarks/cache_race.py: 2, 4 and 8)


def test_racing_runs_compute_the_entry_once_never_show_half_of_it_and_equal_a_run_alone(tmp_path: Path) -> None:
    data = make_class_folders(tmp_path / "data", per_class=12)
    config = tmp_path / "config.yaml"
    # A fixed head rate: the embedding cache is first used (and its count printed) by training.
    config.write_text(yaml.safe_dump(tiny_config(data, data={"augment": "none"}, train={"head_lr": 0.01})))
    alone = start("run", tmp_path / "cache-alone", "train", "--config", config, "--out", tmp_path / "alone")
    assert alone.wait(300) == 0, alone.stderr.read()

    seen = race(tmp_path, config, RACERS)
    assert seen["killed_exit"] == -9
    assert seen["exits"] == [0] * RACERS, seen["errors"]
    assert seen["reads"] > 0 and seen["partial"] == []
    # The lock made one racer compute the embeddings; the others waited and reused them.
    assert sorted(seen["computed"]) == [0] * (RACERS - 1) + [36], seen["computed"]
    expected = load_file(str(tmp_path / "alone" / "model.safetensors"))
    for run in seen["runs"]:
        weights = load_file(str(run / "model.safetensors"))
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), f"{run.name} differs from the run alone"
    # The killed writer left its half-written temporary file; the next command's sweep removes it.
    assert seen["temps_left"], "the writer was killed before it wrote anything: no kill mid-write was tested"
    from graft import cache as graft_cache

    graft_cache.sweep(tmp_path / "cache")
    assert list((tmp_path / "cache").rglob("*.tmp")) == []
    assert all(complete(p) for p in (tmp_path / "cache").glob("embeddings/*/*.safetensors"))
