"""Classifiers, time to quality: graft against the recipes a user would otherwise write, held-out
accuracy as a function of wall time.

    .venv/bin/python benchmarks/accuracy.py --report val    # choose settings on validation images
    .venv/bin/python benchmarks/accuracy.py                 # the README's tables and curves (test)
    .venv/bin/python benchmarks/accuracy.py --datasets digits --recipes graft tutorial

Datasets (``benchmarks/datasets.py``): real labelled images that ship inside pip packages
(scikit-learn's digits, scikit-image's faces, photo crops and textures), split 60/20/20 per class
into train/val/test, seeded by ``--seeds``. Every recipe uses the bundled ImageNet
EfficientNet-Lite0 at ``--img-size``, batch 32, seed 0, and runs alone in its own process, one
after another (never two at once), timed as a whole: imports, data, model, training, testing.

- ``graft``: ``graft train`` with its defaults (only image size, batch and seed set), from an empty
  cache, once per budget: feature extraction (``--strategy feature-extract``) at ``--graft-fe``
  frozen epochs, and two-phase at ``--graft-two-phase`` (``default``, or ``E+F``).
- ``tutorial``: a hand-written PyTorch loop of the Keras/TF transfer-learning tutorial
  (``peers.py``), once per ``--tutorial-budgets`` ``E+F``. Its rates are constant within a
  phase, so its model after e epochs *is* the recipe run for e epochs: after every epoch the test
  split is scored off the clock, and each epoch gives a point (its time plus one test pass).
- ``fastai`` / ``fastai-noaug``: ``vision_learner`` + ``fine_tune(F, freeze_epochs=E)`` with and
  without its default ``aug_transforms()``, in ``.venv-peers`` (created on first use from
  ``peers-requirements.txt`` and ``peers-constraints.txt``), once per ``--fastai-budgets`` (its
  one-cycle schedules depend on the budget: only finished runs are points).

Two races per dataset (``curves.py``: a recipe's figure at T seconds is the test accuracy of its
best-on-validation model by then):

- *feature extraction*: graft's feature extraction against the tutorial's frozen-base epochs;
- *two-phase*: graft's two-phase against every peer point (the tutorial's epochs of both phases,
  fastai with and without augmentation): the best a user could get from any of them by then.

Prints one JSON line per point, then the tables; the curves go to ``--plot``. Work folders are
deleted unless ``--keep``.
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
from curves import draw, envelope, race, save  # noqa: E402
from datasets import DATASETS, write_dataset  # noqa: E402

RECIPES = ("graft", "tutorial", "fastai", "fastai-noaug")
PEERS_VENV = ROOT / ".venv-peers"
RACES = {"feature extraction": ("graft-fe", ("tutorial-frozen",)), "two-phase": ("graft", ("tutorial-frozen", "tutorial", "fastai", "fastai-noaug"))}


def ensure_peers_venv() -> Path:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        print("creating .venv-peers for fastai (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(PEERS_VENV / "bin" / "pip"), "install", "--quiet", "-c", str(HERE / "peers-constraints.txt"), "-r", str(HERE / "peers-requirements.txt")], check=True)
    return python


def run_graft(data: Path, work: Path, args: argparse.Namespace, strategy: str, budget: str) -> dict:
    """One ``graft train`` process, from an empty cache; the run folder is removed afterwards."""
    out = work / "runs" / f"graft-{data.name}"
    env = {**os.environ, "GRAFT_CACHE_DIR": str(work / f"cache-{data.name}")}
    shutil.rmtree(env["GRAFT_CACHE_DIR"], ignore_errors=True)
    flags = ["--img-size", str(args.img_size), "--batch-size", "32", "--seed", "0"]
    if strategy == "feature-extract":
        flags += ["--strategy", "feature-extract"] + ([] if budget == "default" else ["--epochs", budget])
    elif budget != "default":
        frozen, tuned = budget.split("+")
        flags += ["--epochs", frozen, "--fine-tune-epochs", tuned]
    cmd = [str(ROOT / ".venv/bin/graft"), "train", "--data", str(data), "--out", str(out), "--overwrite", "--quiet", *flags,
           *[x for kv in args.graft_set for x in ("--set", kv)]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"graft failed on {data}:\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    decided = metrics.get("decided") or {}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(env["GRAFT_CACHE_DIR"], ignore_errors=True)
    return {"recipe": "graft-fe" if strategy == "feature-extract" else "graft", "budget": budget, "seconds": round(seconds, 1),
            "val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
            "decided": {k: decided.get(k) for k in ("augment", "head_lr")}, "search_s": round(decided.get("seconds", 0.0), 1)}


def run_peer(recipe: str, data: Path, args: argparse.Namespace, budget: str) -> list[dict]:
    """A peer process at budget ``E+F``: the tutorial gives a point per epoch, fastai one."""
    frozen, tuned = budget.split("+")
    python = ensure_peers_venv() if recipe.startswith("fastai") else ROOT / ".venv/bin/python"
    extra = ["--aug", "none"] if recipe == "fastai-noaug" else ["--score-every-epoch"] if recipe == "tutorial" else []
    cmd = [str(python), str(HERE / "peers.py"), recipe.split("-")[0], "--data", str(data), "--img-size", str(args.img_size),
           "--epochs", frozen, "--fine-tune-epochs", tuned, "--batch-size", "32", "--seed", "0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed on {data}:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if recipe != "tutorial":
        return [{"recipe": recipe, "budget": budget, "seconds": row["seconds"], "val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"]}]
    return [{"recipe": "tutorial-frozen" if e["phase"] == "frozen" else "tutorial",
             "budget": f"{min(e['epoch'], int(frozen))}+{max(0, e['epoch'] - int(frozen))}", "run": budget,
             "seconds": round(e["elapsed"] + e["test_seconds"], 1), "val_accuracy": e["val_accuracy"], "test_accuracy": e["test_accuracy"]}
            for e in row["epochs"]]


def races(points: list[dict], report: str) -> list[dict]:
    rows = []
    for name, (ours, peers) in RACES.items():
        mine = [p for p in points if p["recipe"] == ours]
        theirs = [p for p in points if p["recipe"] in peers]
        if mine and theirs:
            result = race(envelope(theirs, report, "accuracy"), envelope(mine, report, "accuracy"))
            # The peer point that gave the best figure: on the envelope (best on validation so far) at that time.
            best_peer = next(p for p in sorted(theirs, key=lambda p: (p["seconds"], -p["val_accuracy"]))
                             if p["seconds"] == result["peer_seconds_to_best"] and p[f"{report}_accuracy"] >= result["peer_best"] - 1e-4)
            default = [p for p in mine if p["budget"] == "default"]
            rows.append({"race": name, **result, "graft_default": default[0][f"{report}_accuracy"] if default else None,
                         "graft_default_seconds": default[0]["seconds"] if default else None, "peer_best_recipe": f"{best_peer['recipe']} {best_peer['budget']}"})
    return rows


def plot(by_dataset: dict[str, list[dict]], report: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    styles = {"graft-fe": ("tab:blue", "graft, feature extraction"), "graft": ("tab:blue", "graft, two-phase"),
              "tutorial-frozen": ("tab:orange", "tutorial, frozen base"), "tutorial": ("tab:orange", "tutorial, frozen then fine-tuned"),
              "fastai": ("tab:green", "fastai fine_tune"), "fastai-noaug": ("tab:olive", "fastai, no augmentation")}
    fig, axes = plt.subplots(len(RACES), len(by_dataset), figsize=(4.6 * len(by_dataset), 3.9 * len(RACES)), squeeze=False)
    for col, (name, points) in enumerate(by_dataset.items()):
        until = max(p["seconds"] for p in points)
        for row, (race_name, (ours, peers)) in enumerate(RACES.items()):
            ax = axes[row][col]
            for recipe in (*peers, ours):
                if recipe == "tutorial-frozen" and "tutorial" in peers:
                    continue  # drawn as the start of the tutorial's two-phase line
                mine = [p for p in points if p["recipe"] == recipe]
                if recipe == "tutorial":  # both phases: its frozen epochs are where its runs start
                    mine = [p for p in points if p["recipe"] in ("tutorial", "tutorial-frozen")]
                colour, label = styles[recipe]
                draw(ax, mine, report, "accuracy", colour, label, until)
            ax.set_title(f"{name}: {race_name}", fontsize=10)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator([t for t in (2, 5, 10, 20, 50, 100, 200, 500) if t <= 1.2 * until]))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("wall-clock seconds, whole process (2 CPU cores, log)")
            ax.set_ylabel(f"{report} accuracy, best-on-val model")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="lower right")
    save(fig, path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="train/val/test split seeds")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--graft-fe", nargs="*", default=["default", "10"], help="feature-extraction budgets: default, or frozen epochs")
    parser.add_argument("--graft-two-phase", nargs="*", default=["default", "2+2"], help="two-phase budgets: default, or E+F")
    parser.add_argument("--tutorial-budgets", nargs="*", default=["10+10", "3+3"], help="E+F; each run gives a point per epoch")
    parser.add_argument("--fastai-budgets", nargs="*", default=["1+2", "5+5"], help="freeze_epochs+epochs of fine_tune")
    parser.add_argument("--graft-set", nargs="*", default=[], metavar="KEY=VALUE", help="graft settings to try (for choosing defaults on --report val)")
    parser.add_argument("--report", choices=["val", "test"], default="test")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default WORK/accuracy_time_to_quality.png)")
    parser.add_argument("--work", type=Path, default=None, help="where data and runs go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (its data: each graft run's folder and cache go after the run)")
    parser.add_argument("--replot", type=Path, default=None, help="summarise and plot the points of an earlier run's output (JSON lines) instead of running")
    args = parser.parse_args(argv)
    by_dataset: dict[str, list[dict]] = {}
    summaries = []
    saved = [json.loads(line) for line in args.replot.read_text().splitlines() if line.startswith("{")] if args.replot else None
    work = args.work or Path(tempfile.mkdtemp(prefix="graft-accuracy-"))
    try:
        for seed in args.seeds:
            for name in args.datasets:
                if saved is not None:
                    points = [p for p in saved if p.get("dataset") == name and p.get("seed") == seed and "recipe" in p]
                    for row in races(points, args.report):
                        summaries.append({"dataset": name, "seed": seed, **row})
                    by_dataset[f"{name} (split {seed})"] = points
                    continue
                data = write_dataset(name, work / "data", seed)
                points = []
                for recipe in args.recipes:
                    if recipe == "graft":
                        found = [run_graft(data, work, args, "feature-extract", b) for b in args.graft_fe]
                        found += [run_graft(data, work, args, "two-phase", b) for b in args.graft_two_phase]
                    else:
                        budgets = args.tutorial_budgets if recipe == "tutorial" else args.fastai_budgets
                        found = [p for b in budgets for p in run_peer(recipe, data, args, b)]
                    for p in found:
                        p = {"dataset": name, "seed": seed, "img_size": args.img_size, **p}
                        if args.report == "val":
                            p.pop("test_accuracy")
                        print(json.dumps(p), flush=True)
                        points.append(p)
                by_dataset[f"{name} (split {seed})"] = points
                for row in races(points, args.report):
                    summaries.append({"dataset": name, "seed": seed, **row})
                    print(json.dumps({"summary": summaries[-1]}), flush=True)
        for race_name in RACES:
            print(f"\n{race_name}: {args.report} accuracy, seconds of whole process")
            print("| dataset | best peer (s to reach) | graft defaults (s) | graft best (s to reach the peer's best; speed-up) | s the peer needs for graft's best | smallest graft - peer at equal time |")
            print("|---|---|---|---|---|---|")
            for r in (s for s in summaries if s["race"] == race_name):
                default = "-" if r["graft_default"] is None else f"{100 * r['graft_default']:.1f} ({r['graft_default_seconds']:.0f})"
                margin = "-" if r["worst_margin_at_equal_time"] is None else f"{100 * r['worst_margin_at_equal_time']:+.1f} (at {r['worst_margin_seconds']:.0f} s)"
                print(f"| {r['dataset']} ({r['seed']}) | {100 * r['peer_best']:.1f} ({r['peer_seconds_to_best']:.0f}; {r['peer_best_recipe']}) | {default} | "
                      f"{100 * r['graft_best']:.1f} ({r['graft_seconds_to_peer_best']}; {r['speedup']}x) | {r['peer_seconds_to_graft_best']} | {margin} |")
        plot_path = args.plot or work / "accuracy_time_to_quality.png"
        plot(by_dataset, args.report, plot_path)
        print(f"curves: {plot_path}", flush=True)
    finally:
        if args.keep or args.work is not None:
            print(json.dumps({"work_dir": str(work)}), file=sys.stderr)
        else:  # the curves (PNG) stay
            for child in work.iterdir():
                if child.suffix != ".png":
                    shutil.rmtree(child, ignore_errors=True)
            if not any(work.iterdir()):
                work.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
