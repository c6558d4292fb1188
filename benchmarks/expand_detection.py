"""Adding classes to a trained detector: graft expand against the usual recipes, on real images.

    .venv/bin/python benchmarks/expand_detection.py [--report val|test] [--seed 0] [--new face]
    .venv/bin/python benchmarks/expand_detection.py --dataset digits [--report val|test]

``--dataset digits`` is issue 22's protocol (``detection_data.write_digit_expansion``, 128 px,
COCO): the original learns digits 0-7 from 500 scenes with only those boxed (they show 8s and 9s
too, unboxed, as in VOC's "19 + 1"; ``--old-scenes old-only``: they show none) for 10 frozen + 2
fine-tuning epochs without augmentation, as the issue trained it (joint retraining likewise); the
new data is 160 scenes each showing an 8 or a 9, only those boxed, every second one also showing 1-4
old digits nobody boxed; joint retraining sees all 660 scenes with every digit boxed; the held-out
scenes (100 + 40 validation, 250 test) have every digit boxed.

Data (default, ``objects``): the ``objects`` scenes of ``detection_data.py`` (real coins,
handwritten digits and faces pasted onto real photos, 192 px; every object instance and background
band belongs to one split).
As in the incremental-detection literature (Shmelkov et al. 2017, "19 + 1" on VOC), the original
detector learns the old classes from every training scene with only their boxes labelled (the new
class is in the photos, unlabelled). The new data holds the training scenes with only the new class
labelled: they also hold old-class objects nobody labelled, as new photos do. ``--new-scenes all``
(default) gives it every training scene, as the literature's "+1" step gets every training image of
the new class; ``half`` only the second half of them, a harder setting in which the expansion has
half of joint retraining's new-class boxes. Joint retraining sees every training scene with every
class labelled. Every method is scored by
pycocotools on the same held-out scenes with every class labelled (``--report val`` to choose
settings, ``test`` for the table; 40 scenes each).

Methods, one JSON line each (old mAP before/after, new mAP, overall mAP, seconds):

- ``naive-fresh-head``: the original's backbone, neck and box head, a fresh K+N classification
  layer, trained on the new data alone;
- ``copy-rows``: the mission document's recipe: a K+N classification layer with the old rows
  copied in, trained on the new boxes plus ``--rehearsal`` old-class training scenes (old boxes
  only), then the old rows copied back;
- ``graft-frozen``: ``graft expand``, defaults: no old images given; with its pseudo-labels it
  reads the original run's training images (and their old boxes) from disk, as a user's expansion
  on the machine that trained the original would (``old_images_used`` counts them;
  ``--expand-set expand.pseudo_labels=false`` for the new data alone);
- ``graft-fine-tune``: ``graft expand --mode fine-tune``: that, then the backbone's top adapts too,
  with the old detector's features distilled towards the original's;
- ``joint``: graft train on all training scenes with every class labelled, as the original was
  trained (the upper bound).
- ``joint-matched`` (digits): joint retraining on only the boxes the original and the expansion
  had between them (old digits in the original's scenes, 8 and 9 in the new ones): what those
  labels can teach at best;
- ``original-reseeded``: the original trained again, same scenes and labels, training seed + 1. Not a
  method: how far the old classes' mAP moves between two trainings that differ only in their seed,
  to read joint retraining's old-class gain against.

The two baselines train the classification layer with graft's detection solver (AdamW, the source run's
learning rate, cosine) for as many epochs as graft expand, backbone frozen, on the same images.
Work folders are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from detection_data import CLASSES, DIGIT_SCENE, write_digit_expansion, write_objects  # noqa: E402

DIGITS_NEW = (8, 9)

SIZE = 192


def subset_voc(source: Path, target: Path, parts: dict[str, list[str]], keep: set[str]) -> Path:
    """A Pascal VOC copy of ``source`` holding the scenes ``parts[split]``, with only the boxes of
    the classes in ``keep`` (the images are links)."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (target / d).mkdir(parents=True, exist_ok=True)
    for split, stems in parts.items():
        for stem in stems:
            tree = ET.parse(source / "Annotations" / f"{stem}.xml")
            root = tree.getroot()
            for obj in list(root.findall("object")):
                if obj.findtext("name") not in keep:
                    root.remove(obj)
            tree.write(target / "Annotations" / f"{stem}.xml")
            link = target / "JPEGImages" / f"{stem}.png"
            if not link.exists():
                os.symlink(source / "JPEGImages" / f"{stem}.png", link)
        (target / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return target


def stems(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def cli(*args) -> float:
    from graft.cli import main

    started = time.perf_counter()
    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"graft {' '.join(map(str, args))} failed with exit code {code}")
    return time.perf_counter() - started


def relabelled(samples, classes_from: list[str], classes_to: list[str]):
    import dataclasses

    import numpy as np

    index = np.asarray([classes_to.index(c) for c in classes_from], dtype=np.int64)
    return [dataclasses.replace(s, labels=index[s.labels] if len(s.labels) else s.labels) for s in samples]


def score(model, samples, classes: list[str], k: int) -> dict:
    """Old-class mAP, new-class mAP and the mean AP over all classes, on fully labelled scenes."""
    from graft.data.dataset import eval_loader
    from graft.tasks.detect.dataset import BoxDataset, collate_boxes
    from graft.tasks.detect.expand_metrics import restrict, restrict_predictions
    from graft.tasks.detect.metrics import detection_metrics
    from graft.tasks.detect.task import collect_detections

    preds = collect_detections(model, eval_loader(BoxDataset(samples, model.size), batch_size=8, workers=0, collate_fn=collate_boxes), torch.device("cpu"), samples)
    out = {}
    aps = []
    for part, keep in (("old", range(0, k)), ("new", range(k, len(classes)))):
        m = detection_metrics(restrict(samples, keep), restrict_predictions(preds, keep), classes[keep.start : keep.stop]).metrics
        out[f"{part}_map"], out[f"{part}_map50"] = m["map"], m["map50"]
        aps += [v["ap"] for v in m["per_class"].values() if v["ap"] is not None]
    out["overall_map"] = sum(aps) / len(aps) if aps else None
    return out


def train_classifier_layer(model, conv_owner, samples, *, epochs: int, lr: float, batch: int, seed: int) -> float:
    """Train only ``conv_owner.cls_logits`` (the rest frozen, BatchNorm in inference mode) with the
    detector's own loss, AdamW and a cosine schedule, as graft's solver would."""
    from graft.tasks.detect.dataset import BoxDataset, collate_boxes

    for p in model.parameters():
        p.requires_grad_(False)
    params = list(conv_owner.cls_logits.parameters())
    for p in params:
        p.requires_grad_(True)
    ds = BoxDataset(samples, model.size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g, collate_fn=collate_boxes, num_workers=0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for images, targets in loader:
            losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - started


def widened_conv(old: torch.nn.Conv2d, anchors: int, k: int, n: int, *, copy_old: bool, seed: int) -> torch.nn.Conv2d:
    """One K+N classification conv in torchvision's (anchor, class) layout: fresh, or with the old
    rows copied into place."""
    conv = torch.nn.Conv2d(old.in_channels, anchors * (k + n), kernel_size=old.kernel_size, stride=old.stride, padding=old.padding)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.nn.init.normal_(conv.weight, std=0.01)
    torch.nn.init.constant_(conv.bias, -math.log(99))
    if copy_old:
        with torch.no_grad():
            for a in range(anchors):
                conv.weight[a * (k + n) : a * (k + n) + k] = old.weight[a * k : (a + 1) * k]
                conv.bias[a * (k + n) : a * (k + n) + k] = old.bias[a * k : (a + 1) * k]
    return conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["objects", "digits"], default="objects", help="objects (coins, digits, faces; VOC '19+1') or digits (issue 22's protocol: digits 0-7, then 8 and 9 from 160 scenes, half of them showing unboxed old digits)")
    parser.add_argument("--new", nargs="+", default=["face"], choices=CLASSES, help="objects: the classes added; the others are the original's")
    parser.add_argument("--old-scenes", choices=["any", "old-only"], default="any", help="digits: the original's scenes show any digit, 8 and 9 unboxed (default), or old digits only")
    parser.add_argument("--report", choices=["val", "test"], default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-scenes", choices=["all", "half"], default="all", help="training scenes the new data holds (new-class boxes only)")
    parser.add_argument("--rehearsal", type=int, default=10, help="old-class training scenes given to copy-rows")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--work", type=Path, default=None, help="work folder; an original trained there before is reused")
    parser.add_argument("--expand-set", nargs="*", default=[], metavar="KEY=VALUE", help="settings for graft expand (to compare on --report val)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, runs, caches)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = args.work or Path(tempfile.mkdtemp(prefix="graft-expand-det-bench-"))
    try:
        os.environ["GRAFT_CACHE_DIR"] = str(work / "cache")
        if args.dataset == "digits":
            protocol = write_digit_expansion(work / "digits", seed=args.seed, old_scenes=args.old_scenes)
            full, old_data, new_data, joint_data = protocol["full"], protocol["old"], protocol["new"], protocol["joint"]
            new_classes = [str(d) for d in DIGITS_NEW]
            old_classes = [str(d) for d in range(10) if d not in DIGITS_NEW]
            size, old_train_scenes = DIGIT_SCENE, None
            # the settings for the original and joint retraining
            common = ["--quiet", "--img-size", size, "--seed", args.seed, "--device", "cpu", "--epochs", 10, "--fine-tune-epochs", 2, "--augment", "none"]
        else:
            full = write_objects(work / "objects", seed=args.seed)
            old_classes = [c for c in CLASSES if c not in args.new]
            new_classes = [c for c in CLASSES if c in args.new]
            train, val, test = stems(full, "train"), stems(full, "val"), stems(full, "test")
            half, val_half = len(train) // 2, len(val) // 2
            old_data = subset_voc(full, work / "old", {"train": train, "val": val, "test": test}, set(old_classes))
            new_train_scenes, new_val_scenes = (train, val) if args.new_scenes == "all" else (train[half:], val[val_half:])
            new_data = subset_voc(full, work / f"new-{args.new_scenes}", {"train": new_train_scenes, "val": new_val_scenes}, set(new_classes))
            joint_data = None
            size, old_train_scenes = SIZE, len(train)
            common = ["--quiet", "--img-size", size, "--seed", args.seed, "--device", "cpu"]
        classes = old_classes + new_classes
        k = len(old_classes)
        reuse = args.work is not None and (work / "runs/original/model.json").is_file()  # a second look at the same split: the same original
        secs = 0.0 if reuse else cli("train", "--data", old_data, "--out", work / "runs/original", *common)
        print(json.dumps({"step": "original", "dataset": args.dataset, "old_classes": old_classes, "new_classes": new_classes, "report": args.report, "seed": args.seed, "seconds": round(secs, 1)}), flush=True)

        from graft.configuration import parse_config
        from graft.tasks.detect.runner import scan
        from graft.pipeline.predict import load_run

        original = load_run(work / "runs/original", device="cpu")
        report_splits = scan(parse_config({"task": "detect", "data": {"dir": str(full)}}))
        held = relabelled(getattr(report_splits, args.report), report_splits.classes, classes)
        before = score(original.model, held, old_classes, k)
        rows = []

        def emit(method: str, model, seconds: float, **extra) -> None:
            after = score(model, held, classes, k)
            row = {"method": method, "split": args.report, "old_map_before": round(before["old_map"], 4), "old_map_after": round(after["old_map"], 4),
                   "new_map": round(after["new_map"], 4), "overall_map": round(after["overall_map"], 4), "old_map50_after": round(after["old_map50"], 4), "new_map50": round(after["new_map50"], 4), "seconds": round(seconds, 1), **extra}
            rows.append(row)
            print(json.dumps(row), flush=True)

        def want(name: str) -> bool:
            return args.only is None or name in args.only

        expand_cfg = parse_config(original.info["config"])
        epochs, lr, batch = expand_cfg.train.epochs, expand_cfg.solver.base_lr, expand_cfg.solver.batch_size
        new_splits = scan(parse_config({"task": "detect", "data": {"dir": str(new_data)}}))
        new_train = relabelled(new_splits.train, new_splits.classes, classes)
        head = original.model.detector.head.classification_head
        anchors = head.num_anchors
        if want("naive-fresh-head"):
            model = copy.deepcopy(original.model)
            h = model.detector.head.classification_head
            h.cls_logits, h.num_classes = widened_conv(h.cls_logits, anchors, k, len(new_classes), copy_old=False, seed=args.seed), len(classes)
            emit("naive-fresh-head", model, train_classifier_layer(model, h, new_train, epochs=epochs, lr=lr, batch=batch, seed=args.seed), old_images_used=0)
        if want("copy-rows"):
            model = copy.deepcopy(original.model)
            h = model.detector.head.classification_head
            old_conv = copy.deepcopy(h.cls_logits)
            h.cls_logits, h.num_classes = widened_conv(old_conv, anchors, k, len(new_classes), copy_old=True, seed=args.seed), len(classes)
            old_splits = scan(parse_config({"task": "detect", "data": {"dir": str(old_data)}}))
            rehearsal = relabelled(old_splits.train[: args.rehearsal], old_splits.classes, classes)
            secs = train_classifier_layer(model, h, new_train + rehearsal, epochs=epochs, lr=lr, batch=batch, seed=args.seed)
            with torch.no_grad():  # the old rows copied back
                n = len(classes)
                for a in range(anchors):
                    h.cls_logits.weight[a * n : a * n + k] = old_conv.weight[a * k : (a + 1) * k]
                    h.cls_logits.bias[a * n : a * n + k] = old_conv.bias[a * k : (a + 1) * k]
            emit("copy-rows", model, secs, old_images_used=len(rehearsal))
        if want("graft-frozen"):
            secs = cli("expand", work / "runs/original", "--data", new_data, "--out", work / "runs/frozen", "--quiet", "--overwrite", *sum((["--set", kv] for kv in args.expand_set), []))
            emit("graft-frozen", load_run(work / "runs/frozen", device="cpu").model, secs, **pseudo_record(work / "runs/frozen"))
        if want("graft-fine-tune"):
            secs = cli("expand", work / "runs/original", "--data", new_data, "--out", work / "runs/fine-tune", "--mode", "fine-tune", "--quiet", "--overwrite", *sum((["--set", kv] for kv in args.expand_set), []))
            emit("graft-fine-tune", load_run(work / "runs/fine-tune", device="cpu").model, secs, **pseudo_record(work / "runs/fine-tune"))
        if want("joint"):
            if joint_data is None:
                joint_data = subset_voc(full, work / "joint", {"train": train, "val": val}, set(CLASSES))
            os.environ["GRAFT_CACHE_DIR"] = str(work / "cache-joint")
            if reuse and (work / "runs/joint/model.json").is_file():  # the same scenes and seed: the same joint run
                secs = json.loads((work / "runs/joint/metrics.json").read_text())["train_seconds"]
            else:
                secs = cli("train", "--data", joint_data, "--out", work / "runs/joint", *common)
            joint = load_run(work / "runs/joint", device="cpu")
            order = [joint.classes.index(c) for c in classes]
            if order != list(range(len(classes))):  # the joint run sorts its classes: score it in the expansion's order
                emit_model = _reordered(joint.model, order)
            else:
                emit_model = joint.model
            emit("joint", emit_model, secs, old_images_used=old_train_scenes if old_train_scenes is not None else len(scan(parse_config({"task": "detect", "data": {"dir": str(old_data)}})).train))
        if want("joint-matched") and args.dataset == "digits":
            # Joint retraining on the labels the original and the expansion had between them: the
            # bound of what an expansion can learn from them (the 'joint' row has every digit boxed).
            os.environ["GRAFT_CACHE_DIR"] = str(work / "cache-matched")
            if reuse and (work / "runs/joint-matched/model.json").is_file():
                secs = json.loads((work / "runs/joint-matched/metrics.json").read_text())["train_seconds"]
            else:
                secs = cli("train", "--data", protocol["matched"], "--out", work / "runs/joint-matched", *common)
            matched = load_run(work / "runs/joint-matched", device="cpu")
            order = [matched.classes.index(c) for c in classes]
            emit("joint-matched", matched.model if order == list(range(len(classes))) else _reordered(matched.model, order), secs, old_images_used=500)
        if want("original-reseeded"):
            os.environ["GRAFT_CACHE_DIR"] = str(work / "cache-reseeded")
            reseeded = [*common[: common.index("--seed") + 1], args.seed + 1, *common[common.index("--seed") + 2 :]]
            secs = cli("train", "--data", old_data, "--out", work / "runs/original-reseeded", "--overwrite", *reseeded)
            again = score(load_run(work / "runs/original-reseeded", device="cpu").model, held, old_classes, k)
            row = {"method": "original-reseeded", "split": args.report, "old_map_before": round(before["old_map"], 4), "old_map_after": round(again["old_map"], 4), "old_map50_after": round(again["old_map50"], 4), "seconds": round(secs, 1), "training_seed": args.seed + 1}
            print(json.dumps(row), flush=True)
        print(f"\n| method | old mAP before -> after | new mAP | overall mAP | {args.report} scenes | seconds |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['old_map_before']:.3f} -> {r['old_map_after']:.3f} | {r['new_map']:.3f} | {r['overall_map']:.3f} | {len(held)} | {r['seconds']} |")
    finally:
        if args.keep or args.work is not None:
            print(json.dumps({"work_dir": str(work)}), file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def pseudo_record(run: Path) -> dict:
    """What an expansion took from the original's training images (graft expand's pseudo-labels)."""
    p = json.loads((run / "expand_metrics.json").read_text()).get("pseudo_labels") or {}
    if not p.get("used"):
        return {"old_images_used": 0}
    return {"old_images_used": p["images"], "pseudo_boxes": p["boxes"], "pseudo_seconds": p["seconds"]}


class _Reordered(torch.nn.Module):
    """A detector whose output labels are mapped to another class order."""

    def __init__(self, model, order: list[int]) -> None:
        super().__init__()
        self.model, self.size = model, model.size
        self.to_new = torch.tensor([order.index(i) for i in range(len(order))])

    def forward(self, images, targets=None):
        out = self.model(images, targets)
        for o in out:
            o["labels"] = self.to_new[o["labels"]]
        return out


def _reordered(model, order: list[int]):
    return _Reordered(model, order).eval()


if __name__ == "__main__":
    main()
