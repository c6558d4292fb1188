"""Adding classes without forgetting: graft expand against the usual recipes, on real labelled data.

    .venv/bin/python benchmarks/expand.py [--old 7] [--img-size 160] [--original-augment none] [--report test]

Data: scikit-learn's handwritten digits (1797 labelled 8x8 scans, bundled with scikit-learn, no
download). Per class, a fixed 20% is the final **test** split (the same for every ``--data-seed``);
the rest is split by ``--data-seed`` into train (60% of the class), val (10%) and **tune** (10%).
Expansions calibrate on val, so val cannot judge them: settings are chosen with ``--report tune``
and only the final table reads ``--report test``. A model is trained on the first ``--old`` digits
(graft train, bundled EfficientNet-Lite0, feature extraction, ``--original-augment``) and then given
the other digits. Prints one JSON line per method, all scored on the same images of all ten digits:

- ``naive-fresh-head``: a new K+N head trained on the new classes' images alone;
- ``copy-rows``: the bare recipe: widen the head, copy the old rows, train the new rows on the new images;
- ``graft-frozen``: graft expand, no old images (negatives from the stored class statistics);
- ``graft-frozen-rehearsal``: graft expand with ``--rehearsal`` images per old class in the new data;
- ``graft-fine-tune``: graft expand --mode fine-tune --exemplars ``--rehearsal``;
- ``joint``: graft train on all classes with the original recipe (the upper bound).

After ``joint``, one ``shift-curve`` line per graft method: every accuracy pair its expanded model
reaches when a constant is added to its new logits (what the calibration's shift chooses), read at
two points: the most new-class accuracy with an old-class drop of at most 1 point (the issue's
goal), and the most at joint retraining's old-class accuracy. The constant is chosen on the scored
images themselves, so these are bounds on what any calibration of the same new rows could reach,
not results: they tell a method that lies on joint retraining's trade-off (only its operating point
differs) from one that does not.

The two baselines train the same linear layer on the same cached embeddings with the same solver
as graft expand (AdamW, lr 1e-3, cosine, ``--expand-epochs`` epochs), so the differences are the
method's. Original and joint runs: feature extraction for ``--epochs`` epochs, no augmentation.
Work folders are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


TEST_SEED = 20261201  # the final test split: fixed, never used for choosing anything


def write_digits(root: Path, seed: int = 0) -> dict[str, dict[int, list[Path]]]:
    """PNG files of the digits: per class a fixed 20% test split, the rest 60/10/10 (of the class)
    train/val/tune by ``seed``; returns {split: {digit: [paths]}}."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    fixed, rng = np.random.default_rng(TEST_SEED), np.random.default_rng(seed)
    out: dict[str, dict[int, list[Path]]] = {"train": {}, "val": {}, "tune": {}, "test": {}}
    for d in range(10):
        idx = fixed.permutation(np.flatnonzero(digits.target == d))
        n = len(idx)
        test, rest = idx[int(0.8 * n) :], rng.permutation(idx[: int(0.8 * n)])
        a, b = int(0.6 * n), int(0.7 * n)
        parts = {"train": rest[:a], "val": rest[a:b], "tune": rest[b:], "test": test}
        for split, ids in parts.items():
            paths = []
            for i in ids:
                pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
                path = root / "all" / split / f"digit{d}" / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).convert("RGB").save(path)
                paths.append(path)
            out[split][d] = paths
    return out


def link_folder(target: Path, files: dict[str, dict[int, list[Path]]], digits: list[int], splits: tuple[str, ...], limit: int | None = None) -> Path:
    for split in splits:
        for d in digits:
            for p in files[split][d][:limit]:
                dest = target / split / f"digit{d}" / p.name if len(splits) > 1 else target / f"digit{d}" / p.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(p, dest)
    return target


def cli(*args: str) -> float:
    from graft.cli import main

    started = time.perf_counter()
    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"graft {' '.join(map(str, args))} failed with exit code {code}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=int, default=7, help="digits 0..old-1 are the original classes")
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--rehearsal", type=int, default=20, help="old-class images per class for the rehearsal methods")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the original and the joint run")
    parser.add_argument("--expand-epochs", type=int, default=100, help="epochs of the new rows (graft expand's default)")
    parser.add_argument("--fine-tune-epochs", type=int, default=3)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the train/val/test split of the digits")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--original-augment", default="none", help="data.augment of the original and the joint run")
    parser.add_argument("--report", choices=["tune", "test"], default="test", help="which images score the methods (choose settings on tune)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, runs, caches)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="graft-expand-bench-"))
    try:
        os.environ["GRAFT_CACHE_DIR"] = str(work / "cache")
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        files = write_digits(work, seed=args.data_seed)
        old, new = list(range(args.old)), list(range(args.old, 10))
        common = ["--quiet", "--set", f"data.img_size={args.img_size}", "--augment", args.original_augment, "--seed", "0"]
        original_data = link_folder(work / "old", files, old, ("train", "val", "test"))
        new_data = link_folder(work / "new", files, new, ("train", "val"))
        secs_original = cli("train", "--data", original_data, "--out", work / "runs/original", "--strategy", "feature-extract", "--epochs", args.epochs, *common)
        print(json.dumps({"step": "original", "classes": len(old), "augment": args.original_augment, "img_size": args.img_size, "data_seed": args.data_seed, "report": args.report, "seconds": round(secs_original, 1)}), flush=True)

        from graft.data.folder import scan_class_folders
        from graft.data.images import load_image
        from graft.data.transforms import eval_transform
        from graft.pipeline.predict import load_run
        from graft.tasks.classify.embeddings import EmbeddingCache, backbone_fingerprint

        original = load_run(work / "runs/original", device="cpu")
        classes = original.classes + [f"digit{d}" for d in new]
        _, test, _, _ = scan_class_folders(work / "all" / args.report, classes=classes)
        labels = torch.tensor([s.label for s in test])
        is_old = labels < len(old)
        cache = EmbeddingCache(original.model.backbone, root=work / "cache", spec={}, device=torch.device("cpu"), batch_size=64)
        test_emb = cache.embed(test, eval_transform(original.preprocessing))
        with torch.no_grad():
            before = original.model.head.fc(test_emb).argmax(1)
        old_before = float((before[is_old] == labels[is_old]).double().mean())

        scored: dict[str, tuple[torch.Tensor, dict]] = {}

        def score(method: str, logits: torch.Tensor, seconds: float, **extra) -> None:
            pred = logits.argmax(1)
            acc = lambda m: round(float((pred[m] == labels[m]).double().mean()), 4)  # noqa: E731
            row = {"method": method, "old_accuracy_before": round(old_before, 4), "old_accuracy_after": acc(is_old), "new_accuracy": acc(~is_old), "overall_accuracy": acc(torch.ones_like(is_old)), "seconds": round(seconds, 1), **extra}
            print(json.dumps(row), flush=True)
            scored[method] = (logits, row)

        def run_logits(run_dir: Path) -> torch.Tensor:
            run = load_run(run_dir, device="cpu")
            with torch.no_grad():
                if backbone_fingerprint(run.model.backbone) == cache.fingerprint:
                    return run.model.head.fc(test_emb)  # same backbone: its embeddings are the cached ones
                out = []
                for i in range(0, len(test), 64):
                    x = torch.stack([run.transform(load_image(s.path)) for s in test[i : i + 64]])
                    out.append(run.model(x))
                return torch.cat(out)

        wanted = set(args.only) if args.only else None

        def want(name: str) -> bool:
            return wanted is None or name in wanted

        # The baselines train the new layer on the cached embeddings of the new classes' training images.
        _, new_train, _, _ = scan_class_folders(new_data / "train", classes=classes)
        new_x = cache.embed(new_train, eval_transform(original.preprocessing))
        new_y = torch.tensor([s.label for s in new_train])

        def fit_linear(layer: torch.nn.Module, params: list[torch.nn.Parameter]) -> float:
            started = time.perf_counter()
            opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
            steps = args.expand_epochs * ((len(new_x) + 31) // 32)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            g = torch.Generator().manual_seed(0)
            for _ in range(args.expand_epochs):
                for idx in torch.randperm(len(new_x), generator=g).split(32):
                    loss = torch.nn.functional.cross_entropy(layer(new_x[idx]), new_y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
            return time.perf_counter() - started

        if want("naive-fresh-head"):
            torch.manual_seed(0)
            head = torch.nn.Linear(test_emb.shape[1], len(classes))
            secs = fit_linear(head, list(head.parameters()))
            with torch.no_grad():
                score("naive-fresh-head", head(test_emb), secs)
        if want("copy-rows"):
            import copy

            from graft.models.surgery import widen_head

            model = copy.deepcopy(original.model)
            widen_head(model, len(new), seed=0)
            fc = model.head.fc
            secs = fit_linear(fc, list(fc.blocks[-1].parameters()))
            with torch.no_grad():
                score("copy-rows", fc(test_emb), secs)
        expand_common = ["--quiet", "--seed", "0", "--epochs", args.expand_epochs]  # otherwise graft expand's defaults
        if want("graft-frozen"):
            secs = cli("expand", work / "runs/original", "--data", new_data / "train", "--out", work / "runs/frozen", *expand_common)
            score("graft-frozen", run_logits(work / "runs/frozen"), secs, old_images_used=0)
        if want("graft-frozen-rehearsal"):
            mixed = link_folder(work / "new-rehearsal", files, new, ("train",))
            link_folder(mixed, files, old, ("train",), limit=args.rehearsal)
            secs = cli("expand", work / "runs/original", "--data", mixed, "--out", work / "runs/frozen-rehearsal", *expand_common)
            score("graft-frozen-rehearsal", run_logits(work / "runs/frozen-rehearsal"), secs, old_images_used=args.rehearsal * len(old))
        if want("graft-fine-tune"):
            secs = cli("expand", work / "runs/original", "--data", new_data / "train", "--out", work / "runs/fine-tune", "--mode", "fine-tune", "--exemplars", args.rehearsal, "--fine-tune-epochs", args.fine_tune_epochs, *expand_common)
            score("graft-fine-tune", run_logits(work / "runs/fine-tune"), secs, old_images_used=args.rehearsal * len(old))
        if want("joint"):
            all_data = link_folder(work / "joint", files, old + new, ("train", "val"))
            os.environ["GRAFT_CACHE_DIR"] = str(work / "cache-joint")  # from scratch: nothing cached
            secs = cli("train", "--data", all_data, "--out", work / "runs/joint", "--strategy", "feature-extract", "--epochs", args.epochs, *common)
            score("joint", run_logits(work / "runs/joint"), secs, old_images_used=sum(len(files["train"][d]) for d in old))
            joint_old = float((scored["joint"][0].argmax(1)[is_old] == labels[is_old]).double().mean())
            for method, (logits, _) in scored.items():
                if method.startswith("graft-"):
                    print(json.dumps({"shift_curve": method, **shift_curve(logits, labels, len(old), old_before, joint_old)}), flush=True)
    finally:
        if args.keep:
            print(json.dumps({"work_dir": str(work)}), file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def shift_curve(logits, labels, k: int, old_before: float, joint_old: float, limit: float = 8.0) -> dict:
    """The accuracies ``logits`` reach with a constant added to the new classes' logits (columns
    ``k:``): the most new-class accuracy whose old-class accuracy is within 1 point of
    ``old_before``, and the most whose old-class accuracy is at least ``joint_old``."""
    import torch

    is_old = labels < k
    margin = logits[:, :k].max(1).values - logits[:, k:].max(1).values  # a shift above it gives the image to a new class
    old_right = logits[:, :k].argmax(1) == labels
    new_right = logits[:, k:].argmax(1) + k == labels
    best = {"new_at_goal_old": None, "new_at_joint_old": None}
    edges = torch.cat([torch.tensor([-limit]), margin.clamp(-limit, limit).unique(), torch.tensor([limit])]).unique()
    for shift in ((edges[1:] + edges[:-1]) / 2).tolist():  # between two margins: one shift per distinct outcome
        to_new = margin < shift
        old_acc = float((old_right & ~to_new)[is_old].double().mean())
        new_acc = float((new_right & to_new)[~is_old].double().mean())
        point = {"shift": shift, "old_accuracy": round(old_acc, 4), "new_accuracy": round(new_acc, 4)}
        if old_before - old_acc <= 0.01 + 1e-9 and (best["new_at_goal_old"] is None or new_acc > best["new_at_goal_old"]["new_accuracy"]):
            best["new_at_goal_old"] = point
        if old_acc >= joint_old - 1e-9 and (best["new_at_joint_old"] is None or new_acc > best["new_at_joint_old"]["new_accuracy"]):
            best["new_at_joint_old"] = point
    return best


if __name__ == "__main__":
    main()
