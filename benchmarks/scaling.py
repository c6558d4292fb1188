"""Scaling out: one process against N, for a classifier and a detector, the same recipe.

    .venv/bin/python benchmarks/scaling.py                  # 1 and 2 processes, both tasks
    .venv/bin/python benchmarks/scaling.py --processes 1 2 4 --tasks classify --repeats 3

Each run is ``graft train --devices N`` (torchrun underneath: gloo on CPU, NCCL on CUDA), with
``solver.batch_size`` the same *global* batch for every N, so the runs train the same recipe on
the same data in the same order. Reported per run (one JSON line each, then a table):

- ``img_s`` per phase: training images per second of the phase's epochs (the history's
  ``seconds`` column: the training steps and their collectives, not validation);
- ``wall_s``: the whole command, start-up, caches, validation and the final evaluation included;
- the final validation figure, and the training seconds each run needed to first reach the
  1-process run's final validation figure (``to_target_s``; None if it never did);
- ``ratio``: img/s of N processes over 1 process, measured side by side in this run.

On a CPU machine N processes share its cores (torchrun gives each one thread): the ratio then
measures what the collectives cost, not a speed-up. Data: real photos (scikit-image's textures
and photo crops for the classifier, scenes of coins, digits and faces for the detector), the
bundled ImageNet EfficientNet-Lite0. Work folders are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from datasets import write_dataset  # noqa: E402
from detection_data import write_detection_dataset  # noqa: E402

GRAFT = Path(sys.executable).with_name("graft")

# The recipes: two-phase (the frozen phase on cached features, then fine-tuning on images), fixed
# augmentation so that no run spends time deciding it, the same epochs for every N.
RECIPES = {
    "classify": {"data": ("photo-crops", write_dataset), "monitor": "val_accuracy",
                 "args": ["--img-size", "128", "--batch-size", "32", "--epochs", "3", "--fine-tune-epochs", "3", "--augment", "flip"]},
    "detect": {"data": ("objects", write_detection_dataset), "monitor": "val_map",
               "args": ["--img-size", "192", "--batch-size", "8", "--epochs", "3", "--fine-tune-epochs", "3", "--augment", "flip"]},
}
QUICK = {"classify": ["--epochs", "1", "--fine-tune-epochs", "1"], "detect": ["--epochs", "1", "--fine-tune-epochs", "1"]}


def run(task: str, data: Path, out: Path, processes: int, quick: bool) -> dict[str, Any]:
    recipe = RECIPES[task]
    cmd = [str(GRAFT), "train", "--data", str(data), "--out", str(out), "--devices", str(processes), "--quiet", *recipe["args"], *(QUICK[task] if quick else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)  # 1 process: torch's own thread count; N: torchrun's 1 each
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((out / "history.csv").open()))
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["counts"]["train"]
    n_train = sum(counts.values()) if isinstance(counts, dict) else int(counts)
    phases: dict[str, list[float]] = {}
    for row in rows:
        phases.setdefault(row["phase"], []).append(float(row["seconds"]))
    return {
        "task": task, "processes": processes, "wall_s": round(wall, 1),
        "img_s": {phase: round(n_train * len(s) / sum(s), 1) for phase, s in phases.items()},
        "epoch_seconds": [float(r["seconds"]) for r in rows],
        "val": [float(r[recipe["monitor"]]) if r[recipe["monitor"]] else None for r in rows],
        "final_val": metrics[recipe["monitor"]],
    }


def to_target(result: dict[str, Any], target: float) -> float | None:
    """Training seconds until the validation figure first reached ``target``."""
    spent = 0.0
    for seconds, value in zip(result["epoch_seconds"], result["val"]):
        spent += seconds
        if value is not None and value >= target - 1e-9:
            return round(spent, 1)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tasks", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=1, help="runs per (task, processes); the table gives the median img/s")
    parser.add_argument("--quick", action="store_true", help="one epoch per phase (a smoke test)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, runs, snapshots)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="graft-scaling-"))
    results: list[dict[str, Any]] = []
    try:
        for task in args.tasks:
            name, write = RECIPES[task]["data"]
            data = write(name, work / "data")
            for repeat in range(args.repeats):
                for n in args.processes:  # interleaved, so drift in the machine's speed hits every N alike
                    result = run(task, data, work / f"{task}-{n}-{repeat}", n, args.quick)
                    result["repeat"] = repeat
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    shutil.rmtree(work / f"{task}-{n}-{repeat}" / "snapshots", ignore_errors=True)
        print_table(results, args.processes)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: list[dict[str, Any]], processes: list[int]) -> None:
    import statistics

    print("\n| task | processes | phase | img/s | vs 1 process | wall s | final val | training s to 1-process final val |")
    print("|---|---|---|---|---|---|---|---|")
    for task in dict.fromkeys(r["task"] for r in results):
        mine = [r for r in results if r["task"] == task]
        base = {phase: statistics.median(r["img_s"][phase] for r in mine if r["processes"] == processes[0]) for phase in mine[0]["img_s"]}
        target = statistics.median(r["final_val"] for r in mine if r["processes"] == processes[0])
        for n in processes:
            runs = [r for r in mine if r["processes"] == n]
            for phase in base:
                speed = statistics.median(r["img_s"][phase] for r in runs)
                reach = [to_target(r, target) for r in runs]
                print(f"| {task} | {n} | {phase} | {speed:.1f} | {speed / base[phase]:.2f}x | {statistics.median(r['wall_s'] for r in runs):.0f} | "
                      f"{statistics.median(r['final_val'] for r in runs):.3f} | {', '.join('-' if x is None else f'{x:.0f}' for x in reach)} |")


if __name__ == "__main__":
    sys.exit(main())
