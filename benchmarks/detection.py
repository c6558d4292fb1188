"""Detection: graft against a hand-written loop of torchvision's detection fine-tuning tutorial.

    python benchmarks/detection.py                       # both datasets, test split, JSON lines + a table
    python benchmarks/detection.py --datasets trees --report val

Both recipes train the same detector (FCOS over the bundled ImageNet EfficientNet-Lite0, graft's
builder) at the same image size for the same number of epochs, and are scored by the same
pycocotools code on the same held-out images:

- ``graft``: graft's defaults, two-phase: E epochs of the frozen-backbone phase on cached
  features, then F of fine-tuning the top third.
- ``tutorial``: the loop of torchvision's "TorchVision Object Detection Finetuning Tutorial":
  every parameter learns, SGD lr 0.005, momentum 0.9, weight decay 0.0005, StepLR(3, 0.1), a
  linear warm-up over the first epoch, batch 2, random horizontal flips; E + F epochs, each
  followed by an evaluation of the held-out images, as the tutorial's loop does (here on the
  validation split, as graft validates each epoch). BatchNorm stays in inference mode, as
  torchvision's FrozenBatchNorm2d keeps it in the tutorial's pretrained backbones.

Speed is reported as seconds per epoch measured in the same process: graft's frozen phase (its
feature cache, validation, snapshots, final evaluation and plots included) and fine-tuning phase
against the tutorial's epoch with its evaluation (``epoch_s``) and without (``train_epoch_s``). Choose settings with
``--report val``; the README's table is ``--report test``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from detection_data import DETECTION_DATASETS, write_detection_dataset  # noqa: E402

SIZES = {"objects": 192, "trees": 384}


def graft_recipe(data: Path, out: Path, size: int, epochs: int, fine_tune_epochs: int, seed: int, report: str) -> dict:
    from graft.configuration import parse_config
    from graft.train.runner import train

    cfg = parse_config({
        "task": "detect",
        "data": {"dir": str(data), "img_size": size},
        "train": {"epochs": epochs, "fine_tune_epochs": fine_tune_epochs, "device": "cpu"},
        "solver": {"seed": seed},  # batch size and learning rate: graft's detection defaults
    })
    started = time.perf_counter()
    result = train(cfg, out, overwrite=True, quiet=True)
    seconds = time.perf_counter() - started
    h = result.history
    frozen = [r["seconds"] for r in h if r["phase"] == "feature-extract"]
    tuned = [r["seconds"] for r in h if r["phase"] == "fine-tune"]
    m = result.metrics
    # The search of data.augment auto is a one-time decision (none with --augment given): reported
    # apart. Everything else outside the epochs (feature cache, validation, snapshots, the final
    # evaluation and plots) is charged to the frozen phase: spread over its epochs.
    decided = m.get("decided") or {}
    # The winner's feature cache is the run's own (built during the search): charged to the frozen phase.
    chosen = [t for t in decided.get("trials", []) if t["augment"] == decided.get("augment")]
    search = decided.get("seconds", 0.0) - (chosen[0].get("cache_seconds", 0.0) if chosen else 0.0)
    other = seconds - sum(frozen) - sum(tuned) - search
    return {
        "map": m[f"{report}_map"], "map50": m[f"{report}_map50"], "seconds": round(seconds, 1),
        "augment": decided.get("augment") or cfg.data.augment, "search_s": round(search, 1),
        "frozen_epoch_s": round((sum(frozen) + other) / max(1, len(frozen)), 2) if frozen else None,
        "fine_tune_epoch_s": round(sum(tuned) / len(tuned), 2) if tuned else None,
    }


def tutorial_recipe(data: Path, size: int, epochs: int, seed: int, report: str) -> dict:
    """torchvision's detection tutorial loop (references/detection/engine.py's train_one_epoch)."""
    from graft.configuration import parse_config
    from graft.data.dataset import eval_loader
    from graft.detection.build import build_detection_model
    from graft.detection.dataset import BoxAugment, BoxDataset, collate_boxes
    from graft.detection.runner import scan
    from graft.detection.metrics import detection_metrics
    from graft.detection.task import collect_detections

    torch.manual_seed(seed)
    cfg = parse_config({"task": "detect", "data": {"dir": str(data), "img_size": size}, "solver": {"seed": seed}})
    splits = scan(cfg)
    from graft.detection.runner import box_sizes

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
    epoch_seconds, eval_seconds, val_maps = [], [], []
    val_samples = splits.val
    val_loader = eval_loader(BoxDataset(val_samples, size), batch_size=8, workers=0, collate_fn=collate_boxes)
    started = time.perf_counter()
    for epoch in range(epochs):
        epoch_holder["epoch"] = epoch
        model.train()
        warmup = None
        if epoch == 0:
            iters = min(1000, len(loader) - 1)
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / 1000, total_iters=iters)
        t0 = time.perf_counter()
        for images, targets in loader:
            losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if warmup is not None:
                warmup.step()
        schedule.step()
        epoch_seconds.append(time.perf_counter() - t0)
        # The tutorial evaluates after every epoch (`evaluate(model, data_loader_test, ...)`); here
        # on the validation split, as graft validates, so the test images stay unseen until the end.
        t0 = time.perf_counter()
        preds = collect_detections(model, val_loader, torch.device("cpu"), val_samples)
        val_maps.append(detection_metrics(val_samples, preds, splits.classes).metrics["map"])
        eval_seconds.append(time.perf_counter() - t0)
    samples = getattr(splits, report)
    preds = collect_detections(model, eval_loader(BoxDataset(samples, size), batch_size=8, workers=0, collate_fn=collate_boxes), torch.device("cpu"), samples)
    m = detection_metrics(samples, preds, splits.classes).metrics
    return {
        "map": m["map"], "map50": m["map50"], "seconds": round(time.perf_counter() - started, 1),
        "epoch_s": round((sum(epoch_seconds) + sum(eval_seconds)) / len(epoch_seconds), 2),  # as the tutorial runs: training, then evaluation
        "train_epoch_s": round(sum(epoch_seconds) / len(epoch_seconds), 2),  # its training loop alone
        "last_val_map": val_maps[-1] if val_maps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DETECTION_DATASETS), choices=DETECTION_DATASETS)
    parser.add_argument("--recipes", nargs="+", default=["graft", "tutorial"], choices=["graft", "tutorial"])
    parser.add_argument("--epochs", type=int, default=30, help="graft's frozen phase; the tutorial runs epochs + fine-tune-epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", choices=["val", "test"], default="test")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = args.work or Path(tempfile.mkdtemp(prefix="graft-det-bench-"))
    rows = []
    for name in args.datasets:
        data = write_detection_dataset(name, work / name, seed=args.seed)
        size = SIZES[name]
        for recipe in args.recipes:
            if recipe == "graft":
                r = graft_recipe(data, work / f"{name}-graft", size, args.epochs, args.fine_tune_epochs, args.seed, args.report)
            else:
                r = tutorial_recipe(data, size, args.epochs + args.fine_tune_epochs, args.seed, args.report)
            row = {"dataset": name, "recipe": recipe, "split": args.report, "img_size": size, "epochs": args.epochs + args.fine_tune_epochs, "seed": args.seed, **r}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| dataset | recipe | {args.report} mAP | mAP@.5 | seconds (search of auto) | s/epoch (frozen / fine-tune) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        graft = r["recipe"] == "graft"
        speed = f"{r['frozen_epoch_s']} / {r['fine_tune_epoch_s']}" if graft else f"{r['epoch_s']} (all; {r['train_epoch_s']} without its evaluation)"
        seconds = f"{r['seconds']} ({r['search_s']}; chose {r['augment']})" if graft else f"{r['seconds']}"
        print(f"| {r['dataset']} | {r['recipe']} | {r['map']:.3f} | {r['map50']:.3f} | {seconds} | {speed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
