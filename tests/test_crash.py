"""The crash harness's fast subset (``benchmarks/crash.py --fast``, about 10 SIGKILLs): a
classifier run killed at a cache write, at its first snapshot, at ``snapshots/last``, at
``model.safetensors`` and at ``report.html``, and once at a random time; an export killed at both
of its writes; an expansion and a detector run killed at a snapshot. After each kill every file
must be absent, its old version or a complete new one, and parse; the recovery (``--resume`` from
the snapshot, else the same command again) must leave no temporary file and give the uninterrupted
run's final weights bit for bit (the export: the same file). The full harness (over 100 kills)
writes benchmarks/results/crash.txt.

The harness runs as one separate process: it forks every graft command from a parent that has
imported torch but computed nothing, which this test process (where other tests trained) could not
do safely."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fast_subset_of_the_crash_harness_survives_every_kill(tmp_path: Path) -> None:
    kills_file = tmp_path / "kills.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "crash.py"), "--fast", "--work", str(tmp_path), "--json", str(kills_file)], check=False,
                          capture_output=True, text=True, timeout=600)
    tail = f"\n--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert kills_file.is_file(), f"the harness wrote no results (exit {done.returncode}){tail}"
    kills = json.loads(kills_file.read_text())["kills"]
    failed = [f"{k['scenario']} {k.get('target') or 'random'} {k['mode']}: {'; '.join(k['problems'])}" for k in kills if not k["survived"]]
    assert not failed, "\n".join(failed) + tail
    assert done.returncode == 0, tail
    assert len(kills) >= 10, tail
    by_scenario = Counter(k["scenario"] for k in kills)
    assert set(by_scenario) == {"classify", "detect", "expand", "export"}, by_scenario
    targets = {k.get("target") for k in kills}
    assert {"snapshots/last", "model.safetensors", "report.html", "export/model.onnx", "export/model.onnx.json"} <= targets, targets
    assert any(t and t.startswith("CACHE/") for t in targets), targets
    assert Counter(k["mode"] for k in kills)["random"] >= 1
    assert {k["recovery"] for k in kills} >= {"run again", "resume last", "export again"}, Counter(k["recovery"] for k in kills)
    assert not any(p.name.startswith("graft-crash-") for p in tmp_path.iterdir()), "the harness left its work folder"
