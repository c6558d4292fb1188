"""Accuracy benchmark: graft's defaults against the recipes a user would otherwise write.

    .venv/bin/python benchmarks/accuracy.py                     # every dataset, every recipe; test accuracy
    .venv/bin/python benchmarks/accuracy.py --report val        # validation only: for choosing defaults

Datasets (``benchmarks/datasets.py``): real labelled images that ship inside pip packages
(scikit-learn's digits, scikit-image's faces, photo crops and textures), split 60/20/20 per class
into train/val/test, seeded by ``--seeds``. Recipes, each in its own process, one after another
(never two at once, so wall times compare), all with the bundled ImageNet EfficientNet-Lite0 at
``--img-size``, batch 32, seed 0, ``--epochs`` frozen + ``--fine-tune-epochs`` fine-tuning epochs:

- ``graft``: ``graft train`` with its defaults (nothing else set), from an empty cache;
- ``tutorial``: a hand-written PyTorch loop of the Keras/TF transfer-learning tutorial (``peers.py``);
- ``fastai`` / ``fastai-noaug``: fastai's ``vision_learner`` + ``fine_tune``, with its default
  ``aug_transforms()`` and without, in the separate environment ``.venv-peers`` (created on first
  use from ``peers-requirements.txt`` and ``peers-constraints.txt``).

Prints one JSON line per run, then a table. ``--report val`` prints only validation accuracy: graft's
defaults are chosen that way, and the test column is read only for the final table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from datasets import DATASETS, write_dataset  # noqa: E402

RECIPES = ("graft", "tutorial", "fastai", "fastai-noaug")
PEERS_VENV = ROOT / ".venv-peers"


def ensure_peers_venv() -> Path:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print("creating .venv-peers for fastai (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(PEERS_VENV / "bin" / "pip"), "install", "--quiet", "-c", str(HERE / "peers-constraints.txt"), "-r", str(HERE / "peers-requirements.txt")], check=True)
    return python


def run_graft(data: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / "runs" / f"graft-{data.name}"
    env = {**os.environ, "GRAFT_CACHE_DIR": str(work / f"cache-{data.name}")}  # nothing cached beforehand
    shutil.rmtree(env["GRAFT_CACHE_DIR"], ignore_errors=True)
    cmd = [str(ROOT / ".venv/bin/graft"), "train", "--data", str(data), "--out", str(out), "--overwrite", "--quiet",
           "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--fine-tune-epochs", str(args.fine_tune_epochs),
           "--batch-size", "32", "--seed", "0", *[x for kv in args.graft_set for x in ("--set", kv)]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"graft failed on {data}:\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    decided = metrics.get("decided") or {}
    return {"val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"], "seconds": round(seconds, 1),
            "decided": {k: decided.get(k) for k in ("augment", "head_lr")}, "set": args.graft_set}


def run_peer(recipe: str, data: Path, args: argparse.Namespace) -> dict:
    python = ensure_peers_venv() if recipe.startswith("fastai") else ROOT / ".venv/bin/python"
    extra = ["--aug", "none"] if recipe == "fastai-noaug" else []
    cmd = [str(python), str(HERE / "peers.py"), recipe.split("-")[0], "--data", str(data), "--img-size", str(args.img_size),
           "--epochs", str(args.epochs), "--fine-tune-epochs", str(args.fine_tune_epochs), "--batch-size", "32", "--seed", "0", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed on {data}:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"], "seconds": round(seconds, 1)}


def table(rows: list[dict], report: str) -> str:
    key = f"{report}_accuracy"
    by = {}
    for r in rows:
        by.setdefault((r["dataset"], r["seed"]), {})[r["recipe"]] = r
    recipes = [r for r in RECIPES if any(r in v for v in by.values())]
    head = f"| dataset (split seed) | {' | '.join(recipes)} | graft - best peer | graft time / best peer's |"
    lines = [f"{report} accuracy in %, wall time in s", head, "|" + "---|" * (len(recipes) + 3)]
    for (ds, seed), runs in by.items():
        cells = [f"{100 * runs[r][key]:.1f} ({runs[r]['seconds']:.0f} s)" if r in runs else "-" for r in recipes]
        peers = [runs[r] for r in recipes if r != "graft" and r in runs]
        if "graft" in runs and peers:
            best = max(peers, key=lambda p: p[key])
            gap, ratio = f"{100 * (runs['graft'][key] - best[key]):+.1f}", f"{runs['graft']['seconds'] / best['seconds']:.2f}"
        else:
            gap = ratio = "-"
        lines.append(f"| {ds} ({seed}) | {' | '.join(cells)} | {gap} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="train/val/test split seeds")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--graft-set", nargs="*", default=[], metavar="KEY=VALUE", help="graft settings to try (for choosing defaults on --report val)")
    parser.add_argument("--report", choices=["val", "test"], default="test")
    parser.add_argument("--work", type=Path, default=None, help="where data and runs go (default: a new temporary folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="graft-accuracy-"))
    rows = []
    for seed in args.seeds:
        for name in args.datasets:
            data = write_dataset(name, work / "data", seed)
            for recipe in args.recipes:
                result = run_graft(data, work, args) if recipe == "graft" else run_peer(recipe, data, args)
                row = {"dataset": name, "seed": seed, "recipe": recipe, "img_size": args.img_size, "epochs": [args.epochs, args.fine_tune_epochs], **result}
                if args.report == "val":
                    row.pop("test_accuracy")
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows, args.report))
    print(json.dumps({"work_dir": str(work)}), file=sys.stderr)


if __name__ == "__main__":
    main()
