"""Speed benchmarks for the caches (issue: never compute the same thing twice).

    .venv/bin/python benchmarks/speed.py [--quick]

Prints one JSON line per measurement, then one per comparison (ratios measured side by side in
this run). Each case runs in its own process, so ``peak_rss_mib`` is that case's own peak memory.
Data: real photo patches (scikit-image's brick, grass, gravel, immunohistochemistry and Hubble
photos), 5 classes x (168 train + 42 val) = 1050 images, the bundled EfficientNet-Lite0 at 224 px.
Work folders are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = ("brick", "grass", "gravel", "ihc", "hubble_deep_field")
CASES = ["floor", "fe-graft", "fe-graft-warm", "fe-plain", "ft-plain-aug", "ft-graft-aug", "ft-plain-noaug", "ft-graft-noaug"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ shared set-up


def setup(data: Path, augment: str):
    import torch

    from graft.configuration import parse_config
    from graft.data.dataset import ImageDataset, default_workers
    from graft.data.folder import scan_folder
    from graft.data.transforms import augmentation_from_config, eval_transform, preprocessing_for, train_transform
    from graft.models.backbones import build_model

    torch.manual_seed(0)
    cfg = parse_config({"data": {"augment": augment}})
    splits = scan_folder(data, seed=0)
    model, _ = build_model(cfg.model, len(splits.classes))
    pre = preprocessing_for(model.backbone, cfg.data)
    train_ds = ImageDataset(splits.train, train_transform(pre, augmentation_from_config(cfg.data)))
    val_ds = ImageDataset(splits.val, eval_transform(pre))
    return model, splits, train_ds, val_ds, default_workers()


def plain_loader(ds, shuffle: bool, workers: int, batch_size: int = 32):
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def plain_accuracy(model, loader) -> float:
    import torch

    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return correct / max(1, total)


# ------------------------------------------------------------------------------ cases


def case_floor(data: Path, epochs: int) -> dict:
    """One inference pass of the backbone over every image (train + val): the floor."""
    import torch

    model, splits, train_ds, val_ds, workers = setup(data, "none")
    from torch.utils.data import ConcatDataset

    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        # With augment "none" the training transform is the evaluation transform.
        for x, _ in plain_loader(ConcatDataset([train_ds, val_ds]), False, workers):
            model.backbone(x)
    return {"seconds": time.perf_counter() - started, "images": len(train_ds) + len(val_ds)}


def case_fe_plain(data: Path, epochs: int) -> dict:
    """The tutorial's way: the frozen base recomputed for every image in every epoch, validation each epoch."""
    import torch
    import torch.nn.functional as F

    model, splits, train_ds, val_ds, workers = setup(data, "none")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3, weight_decay=0.01)
    train_loader, val_loader = plain_loader(train_ds, True, workers), plain_loader(val_ds, False, workers)
    steps = epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val_acc = plain_accuracy(model, val_loader)
    return {"seconds": time.perf_counter() - started, "val_accuracy": val_acc, "epochs": epochs}


def graft_train(data: Path, out: Path, strategy: str, augment: str, epochs: int, cache_dir: Path, **train_opts) -> dict:
    from graft.configuration import parse_config
    from graft.pipeline.train import train

    cfg = parse_config(
        {
            "data": {"dir": str(data), "augment": augment},
            "train": {"strategy": strategy, "epochs": epochs, "cache_dir": str(cache_dir), **train_opts},
            "solver": {"batch_size": 32, "base_lr": 1e-3, "snapshot": 0},
        }
    )
    started = time.perf_counter()
    result = train(cfg, out, quiet=True)
    return {"seconds": time.perf_counter() - started, "val_accuracy": result.metrics["val_accuracy"], "history": result.history}


def case_fe_graft(data: Path, epochs: int, work: Path, run: str = "fe") -> dict:
    """graft's whole feature-extraction run: scan, embeddings once, head training, metrics and plots.
    ``fe-graft-warm`` runs again with the embeddings already on disk (a second run, other head settings)."""
    r = graft_train(data, work / run, "feature-extract", "none", epochs, work / "cache-fe")
    return {"seconds": r["seconds"], "val_accuracy": r["val_accuracy"], "epochs": epochs, "epoch_seconds": [round(h["seconds"], 3) for h in r["history"]]}


def ft_layers(model):
    from graft.models import surgery

    return surgery.resolve_fine_tune_at(model, None)


def case_ft_plain(data: Path, epochs: int, augment: str) -> dict:
    """A minimal hand-written fine-tuning loop: top third of the layers learn, full forward each step."""
    import torch
    import torch.nn.functional as F

    from graft.models import surgery

    model, splits, train_ds, val_ds, workers = setup(data, augment)
    surgery.freeze(model, before=ft_layers(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    loader = plain_loader(train_ds, True, workers)
    model.train()
    epoch_seconds = []
    for _ in range(epochs):
        started = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_seconds.append(time.perf_counter() - started)
    return {"images_per_epoch": len(train_ds), "epoch_seconds": epoch_seconds, "images_per_second": len(train_ds) / min(epoch_seconds)}


def case_ft_graft(data: Path, epochs: int, augment: str, work: Path) -> dict:
    """graft's fine-tuning phase on the same layers (prefix cache on when there is no augmentation)."""
    r = graft_train(data, work / f"ft-{augment}", "fine-tune", augment, epochs, work / f"cache-ft-{augment}")
    n = sum(1 for _ in (data / "train").rglob("*.jpg"))
    epoch_seconds = [h["seconds"] for h in r["history"]]
    return {"images_per_epoch": n, "epoch_seconds": epoch_seconds, "images_per_second": n / min(epoch_seconds), "whole_run_seconds": r["seconds"], "images_per_second_whole_run": n * epochs / r["seconds"]}


def run_case(name: str, data: Path, epochs: int, work: Path) -> dict:
    if name == "floor":
        out = case_floor(data, epochs)
    elif name == "fe-plain":
        out = case_fe_plain(data, epochs)
    elif name.startswith("fe-graft"):
        out = case_fe_graft(data, epochs, work, run=name)
    elif name.startswith("ft-plain"):
        out = case_ft_plain(data, epochs, "none" if name.endswith("noaug") else "flip-rotate")
    else:
        out = case_ft_graft(data, epochs, "none" if name.endswith("noaug") else "flip-rotate", work)
    return {"case": name, **out, "peak_rss_mib": round(peak_rss_mib(), 1)}


# ------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--data")
    parser.add_argument("--work", help="the case's work folder (with --case; the driver makes a temporary one)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (a smoke run, not the reported figures)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, runs, caches)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.data), args.epochs, Path(args.work))), flush=True)
        return

    from graft.tasks.classify.demo import make_texture_dataset

    work = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        per_class = (40, 10) if args.quick else (168, 42)
        fe_epochs, ft_epochs = (3, 2) if args.quick else (10, 3)
        data = make_texture_dataset(work / "data", train_per_class=per_class[0], val_per_class=per_class[1], photos=PHOTOS, sizes=(40, 72))
        machine = {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads(), "python": sys.version.split()[0]}
        print(json.dumps({"benchmark": "setup", "images": 5 * sum(per_class), "classes": len(PHOTOS), "machine": machine}), flush=True)
        results = {}
        for name in CASES:
            epochs = ft_epochs if name.startswith("ft") else fe_epochs
            proc = subprocess.run([sys.executable, __file__, "--case", name, "--data", str(data), "--work", str(work), "--epochs", str(epochs)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(json.dumps({"case": name, "error": proc.stderr[-2000:]}), flush=True)
                continue
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[name]), flush=True)

        def ratio(a: float, b: float) -> float:
            return round(a / b, 3) if b else float("nan")

        r = results
        if {"fe-graft", "fe-plain"} <= set(r):
            print(json.dumps({"benchmark": "1 feature extraction: graft vs plain loop", "epochs": fe_epochs, "speedup": ratio(r["fe-plain"]["seconds"], r["fe-graft"]["seconds"]), "goal": ">= 10",
                              "val_accuracy_graft": r["fe-graft"]["val_accuracy"], "val_accuracy_plain": r["fe-plain"]["val_accuracy"], "accuracy_gap_points": round(100 * (r["fe-graft"]["val_accuracy"] - r["fe-plain"]["val_accuracy"]), 2), "accuracy_goal": "within 1 point"}))
        if {"fe-graft-warm", "fe-plain"} <= set(r):
            print(json.dumps({"benchmark": "1b feature extraction again with the embeddings on disk: graft vs plain loop", "speedup": ratio(r["fe-plain"]["seconds"], r["fe-graft-warm"]["seconds"]), "val_accuracy_graft": r["fe-graft-warm"]["val_accuracy"]}))
        if {"fe-graft", "floor"} <= set(r):
            print(json.dumps({"benchmark": "2 graft feature-extraction run vs one inference pass", "ratio_to_floor": ratio(r["fe-graft"]["seconds"], r["floor"]["seconds"]), "goal": "<= 1.5", "graft_seconds": round(r["fe-graft"]["seconds"], 2), "floor_seconds": round(r["floor"]["seconds"], 2)}))
        for kind, goal in (("aug", ">= 0.95"), ("noaug", "> 1")):
            g, p = r.get(f"ft-graft-{kind}"), r.get(f"ft-plain-{kind}")
            if g and p:
                print(json.dumps({"benchmark": f"3 fine-tuning throughput ({'with' if kind == 'aug' else 'without'} augmentation): graft vs hand-written loop", "ratio_steady_epoch": ratio(g["images_per_second"], p["images_per_second"]), "goal": goal,
                                  "graft_images_per_second": round(g["images_per_second"], 1), "plain_images_per_second": round(p["images_per_second"], 1), "graft_images_per_second_including_setup": round(g["images_per_second_whole_run"], 1)}))
        print(json.dumps({"benchmark": "4 peak memory (MiB, each case in its own process)", **{k: v["peak_rss_mib"] for k, v in r.items()}}))
    finally:
        if args.keep:
            print(json.dumps({"work_dir": str(work)}), file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
