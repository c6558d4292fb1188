"""Detection, time to quality: graft against a hand-written loop of torchvision's detection
fine-tuning tutorial, held-out mAP as a function of wall time.

    python benchmarks/detection.py --report val            # choose settings on validation images
    python benchmarks/detection.py                         # the README's table and curves (test)
    python benchmarks/detection.py --datasets digits --graft-budgets default 4+2

Both recipes train the same detector (FCOS over the bundled ImageNet EfficientNet-Lite0, graft's
builder) at the same image size and are scored by the same pycocotools code on the same images:

- ``tutorial``: the loop of torchvision's "TorchVision Object Detection Finetuning Tutorial": every
  parameter learns, SGD lr 0.005, momentum 0.9, weight decay 0.0005, StepLR(3, 0.1), a linear
  warm-up over the first epoch, batch 2, random horizontal flips. Its schedule does not depend on
  the number of epochs, so its model after E epochs *is* the loop run for E epochs: one run to
  ``--loop-epochs`` gives every budget 1..E. Its clock counts data scanning, model building and
  training only (not its per-epoch evaluations): the loop is timed as favourably as it can be.
- ``graft``: ``graft train`` with its defaults, once per budget in ``--graft-budgets`` (``default``,
  or ``E+F``: E frozen-phase and F fine-tuning epochs), since graft's schedules depend on the
  budget. Its clock is the whole run: the ``auto`` search, feature caches, its own validation,
  snapshots, the final evaluation and plots.

After every epoch of either recipe the model is scored on the validation and the reported split;
that scoring is off both clocks and restores the RNG state, so it changes nothing it measures.

Each recipe's figure at a wall-clock budget T is the reported-split mAP of its model with the best
*validation* mAP among those it had by T (what a user choosing by validation would keep). The
summary gives each recipe's best, the time each needs to reach the other's best, and the smallest
margin of graft over the loop at equal wall time; the curves go to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from curves import draw, envelope, race, save  # noqa: E402
from detection_data import DETECTION_DATASETS, write_detection_dataset  # noqa: E402

SIZES = {"objects": 192, "trees": 384, "digits": 128}


class Probe:
    """Scores a model on the validation and the reported images, off the clock, RNG untouched."""

    def __init__(self, splits: Any, report: str, size: int) -> None:
        self.splits, self.report, self.size = splits, report, size
        self.excluded = 0.0

    def score(self, model: Any) -> dict[str, float]:
        from graft.data.dataset import eval_loader
        from graft.tasks.detect.dataset import BoxDataset, collate_boxes
        from graft.tasks.detect.metrics import detection_metrics
        from graft.tasks.detect.task import collect_detections

        t0 = time.perf_counter()
        out = {}
        with torch.random.fork_rng(devices=[]):
            for split in dict.fromkeys(("val", self.report)):
                samples = getattr(self.splits, split)
                loader = eval_loader(BoxDataset(samples, self.size), batch_size=8, workers=0, collate_fn=collate_boxes)
                preds = collect_detections(model, loader, torch.device("cpu"), samples)
                out[f"{split}_map"] = detection_metrics(samples, preds, self.splits.classes).metrics["map"]
        self.excluded += time.perf_counter() - t0
        return out


def tutorial_curve(data: Path, size: int, epochs: int, seed: int, report: str) -> list[dict]:
    """torchvision's detection tutorial loop (references/detection/engine.py's train_one_epoch)."""
    from graft.configuration import parse_config
    from graft.tasks.detect.build import build_detection_model
    from graft.tasks.detect.dataset import BoxAugment, BoxDataset, collate_boxes
    from graft.tasks.detect.runner import box_sizes, scan

    started = time.perf_counter()
    torch.manual_seed(seed)
    cfg = parse_config({"task": "detect", "data": {"dir": str(data), "img_size": size}, "solver": {"seed": seed}})
    splits = scan(cfg)
    model, _ = build_detection_model(cfg, len(splits.classes), box_sizes=box_sizes(splits, size), seed=seed)
    train_ds = BoxDataset(splits.train, size, BoxAugment(hflip=True), seed=seed)
    g = torch.Generator().manual_seed(seed)
    epoch_holder = {"epoch": 0}

    class Epoch(torch.utils.data.Dataset):  # the tutorial's flips are random per draw: seed them by epoch
        def __len__(self):
            return len(train_ds)

        def __getitem__(self, i):
            return train_ds[(i, epoch_holder["epoch"])]

    loader = torch.utils.data.DataLoader(Epoch(), batch_size=2, shuffle=True, generator=g, collate_fn=collate_boxes, num_workers=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    probe = Probe(splits, report, size)
    points = []
    for epoch in range(epochs):
        epoch_holder["epoch"] = epoch
        model.train()
        warmup = None
        if epoch == 0:
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / 1000, total_iters=min(1000, len(loader) - 1))
        for images, targets in loader:
            losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if warmup is not None:
                warmup.step()
        schedule.step()
        seconds = time.perf_counter() - started - probe.excluded
        points.append({"recipe": "tutorial", "budget": f"{epoch + 1} epochs", "epoch": epoch + 1, "seconds": round(seconds, 1), "final": True, **probe.score(model)})
    return points


def graft_curve(data: Path, out: Path, size: int, budget: str, seed: int, report: str, overrides: list[str]) -> list[dict]:
    """One ``graft train`` run at ``budget``: a point after each epoch and one for the finished run."""
    from graft.configuration import resolve_config
    from graft.tasks.detect.data import scan_detection
    from graft.engine.loop import Hook
    from graft.pipeline.train import train

    flags = {"task": "detect", "data.dir": str(data), "data.img_size": size, "solver.seed": seed, "train.device": "cpu"}
    if budget != "default":
        frozen, tuned = (int(x) for x in budget.split("+"))
        flags.update({"train.epochs": frozen, "train.fine_tune_epochs": tuned})
    cfg = resolve_config(None, overrides, flags)
    splits = scan_detection(data, val_fraction=cfg.data.val_fraction, seed=seed)
    probe = Probe(splits, report, size)
    points: list[dict] = []

    class Scored(Hook):
        def after_epoch(self, trainer: Any, row: dict[str, Any]) -> None:
            seconds = time.perf_counter() - started - probe.excluded
            points.append({"recipe": "graft", "budget": budget, "epoch": row["epoch"], "phase": row["phase"], "seconds": round(seconds, 1), "final": False, **probe.score(trainer.model)})

    started = time.perf_counter()
    result = train(cfg, out, overwrite=True, quiet=True, hooks=[Scored()])
    seconds = time.perf_counter() - started - probe.excluded
    m = result.metrics
    decided = m.get("decided") or {}
    final = {"recipe": "graft", "budget": budget, "epoch": m["epochs"], "seconds": round(seconds, 1), "final": True,
             "val_map": m["val_map"], f"{report}_map": m[f"{report}_map"], "augment": decided.get("augment") or cfg.data.augment,
             "search_s": round(decided.get("seconds", 0.0), 1)}
    return [*points, final]


def summarise(name: str, points: list[dict], report: str) -> dict:
    loop = envelope([p for p in points if p["recipe"] == "tutorial"], report, "map")
    ours = envelope([p for p in points if p["recipe"] == "graft"], report, "map")
    r = race(loop, ours)
    return {
        "dataset": name, "split": report, "loop_best": r["peer_best"], "loop_seconds_to_best": r["peer_seconds_to_best"],
        "graft_best": r["graft_best"], "graft_seconds_to_loop_best": r["graft_seconds_to_peer_best"],
        "loop_seconds_to_graft_best": r["peer_seconds_to_graft_best"],
        "ratio": round(r["graft_seconds_to_peer_best"] / r["peer_seconds_to_best"], 2) if r["speedup"] else None,
        "worst_margin_at_equal_time": r["worst_margin_at_equal_time"], "worst_margin_seconds": r["worst_margin_seconds"],
    }


def plot(by_dataset: dict[str, list[dict]], report: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_dataset), figsize=(5.2 * len(by_dataset), 4.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], by_dataset.items()):
        until = max(p["seconds"] for p in points)
        for recipe, colour in (("tutorial", "tab:orange"), ("graft", "tab:blue")):
            label = "torchvision tutorial loop" if recipe == "tutorial" else "graft (defaults and shorter budgets)"
            draw(ax, [p for p in points if p["recipe"] == recipe], report, "map", colour, label, until)
        ax.set_title(f"{name} ({report} images)")
        ax.set_xlabel("wall-clock seconds (2 CPU cores)")
        ax.set_ylabel(f"{report} mAP@[.5:.95] of the best-on-validation model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    save(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DETECTION_DATASETS), choices=DETECTION_DATASETS)
    parser.add_argument("--recipes", nargs="+", default=["graft", "tutorial"], choices=["graft", "tutorial"])
    parser.add_argument("--loop-epochs", type=int, default=12, help="the tutorial loop's longest budget (its StepLR leaves lr 5e-6 after epoch 9)")
    parser.add_argument("--graft-budgets", nargs="+", default=["default", "2+2"], help="default, or E+F: frozen-phase + fine-tuning epochs")
    parser.add_argument("--graft-set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every graft run (to compare settings on --report val)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", choices=["val", "test"], default="test")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves (default WORK/time_to_quality.png)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, snapshots, data)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="graft-det-bench-"))
    by_dataset: dict[str, list[dict]] = {}
    try:
        for name in args.datasets:
            data = write_detection_dataset(name, work / name, seed=args.seed)
            size = SIZES[name]
            points: list[dict] = []
            if "tutorial" in args.recipes:
                points += tutorial_curve(data, size, args.loop_epochs, args.seed, args.report)
            if "graft" in args.recipes:
                for budget in args.graft_budgets:
                    points += graft_curve(data, work / f"{name}-graft-{budget}", size, budget, args.seed, args.report, args.graft_set)
                    if not args.keep:  # its per-epoch snapshots are large
                        shutil.rmtree(work / f"{name}-graft-{budget}", ignore_errors=True)
            for p in points:
                print(json.dumps({"dataset": name, "split": args.report, "img_size": size, "seed": args.seed, **p}), flush=True)
            by_dataset[name] = points
        plot_path = args.plot or work / "time_to_quality.png"
        if set(args.recipes) == {"graft", "tutorial"}:
            rows = [summarise(name, points, args.report) for name, points in by_dataset.items()]
            for row in rows:
                print(json.dumps({"summary": row}), flush=True)
            print(f"\n| dataset | loop best {args.report} mAP (s to reach) | graft best (s to reach the loop's best; ratio) | s the loop needs for graft's best | smallest graft - loop at equal time |")
            print("|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['dataset']} | {r['loop_best']:.3f} ({r['loop_seconds_to_best']}) | {r['graft_best']:.3f} ({r['graft_seconds_to_loop_best']}; {r['ratio']}) | "
                      f"{r['loop_seconds_to_graft_best']} | {r['worst_margin_at_equal_time']:+.3f} (at {r['worst_margin_seconds']} s) |")
        plot(by_dataset, args.report, plot_path)
        print(f"curves: {plot_path}", flush=True)
    finally:
        if not args.keep and args.work is None:
            for child in work.iterdir():
                if child.suffix != ".png":
                    shutil.rmtree(child, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
