"""``graft``: the command line, a thin layer over the Python API.

Exit status: 0 success; 1 an unexpected error (a bug: rerun with --debug for the traceback);
2 a usage, config or data error (the message says what to fix); 130 interrupted (a resumable
snapshot was written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from graft import __version__
from graft.console import progress, tell_data
from graft.errors import GraftError, Interrupted
from graft.pipeline.registry import DEFAULT_TASK, TASKS

# Flags of `graft train` that set a config key (flag dest -> key).
TRAIN_FLAGS = {
    "task": "task",
    "data": "data.dir",
    "model": "model.name",
    "weights": "model.weights",
    "strategy": "train.strategy",
    "epochs": "train.epochs",
    "fine_tune_epochs": "train.fine_tune_epochs",
    "fine_tune_at": "train.fine_tune_at",
    "img_size": "data.img_size",
    "batch_size": "solver.batch_size",
    "seed": "solver.seed",
    "augment": "data.augment",
    "early_stopping": "train.early_stopping",
    "device": "train.device",
}


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def _opset(value: str) -> int:
    """ONNX opsets graft's models export to: 11 has the Pad and NMS-era ops the detectors need;
    20 is the newest torch's exporter writes."""
    n = int(value)
    if not 11 <= n <= 20:
        raise argparse.ArgumentTypeError(f"graft exports to opsets 11 to 20, got {n}")
    return n


def _count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _layer(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description="Adapt pretrained image models to your own images.")
    parser.add_argument("--version", action="version", version=f"graft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")

    t = sub.add_parser("train", help="train a classifier or a detector on your images", description="Train a classifier (class folders) or a detector (COCO, YOLO or Pascal VOC boxes): two-phase transfer learning by default.")
    t.add_argument("--data", metavar="DIR", help="folder of class folders, or of train/ val/ test/ folders; or detection data: COCO annotations/*.json, a YOLO data.yaml, Pascal VOC Annotations/")
    t.add_argument("--task", choices=["auto", *TASKS], help="default auto: detect when --data holds box annotations")
    t.add_argument("--out", metavar="RUNDIR", help="run folder to write (with --resume: default is the snapshot's run)")
    t.add_argument("--config", metavar="FILE", help="YAML config (see examples/)")
    t.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override a config key, e.g. solver.base_lr=0.001 (repeatable)")
    t.add_argument("--model", metavar="NAME", help="timm backbone name (default tf_efficientnet_lite0); for detection also a detector head: fcos, retinanet, fasterrcnn")
    t.add_argument("--weights", metavar="PATH", help="start from these weights: bundled, hub, none, a file, or a run folder")
    t.add_argument("--resume", metavar="SNAPSHOT", help="continue a run exactly from a snapshot (e.g. RUNDIR/snapshots/last)")
    t.add_argument("--strategy", choices=["feature-extract", "fine-tune", "two-phase"])
    t.add_argument("--epochs", type=_count, metavar="N", help="epochs of the first (frozen-base) phase, or of the only phase")
    t.add_argument("--fine-tune-epochs", type=_count, metavar="M", help="epochs of the fine-tuning phase of two-phase")
    t.add_argument("--fine-tune-at", type=_layer, metavar="LAYER", help="first layer that learns when fine-tuning: index or name (see graft plan)")
    t.add_argument("--img-size", type=_positive, metavar="S")
    t.add_argument("--batch-size", type=_positive, metavar="B")
    t.add_argument("--seed", type=_count, metavar="K")
    t.add_argument("--augment", choices=["auto", "none", "flip", "flip-rotate", "flip-scale", "strong"], help="default auto: the best of none, flip and flip-rotate on the validation split (detectors: of none and flip, by validation mAP after the frozen phase's first 2 epochs, the winner's kept as the run's; flip-scale and strong also jitter the scale)")
    t.add_argument("--early-stopping", type=_positive, metavar="PATIENCE", help="end a phase after PATIENCE epochs without a better validation figure (train.early_stopping_monitor: val_loss by default; detectors val_map); keep the best epoch's weights")
    t.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:N or mps")
    t.add_argument("--devices", type=_positive, metavar="N", help="train in N processes on this machine (DistributedDataParallel through torchrun; one per GPU, or N CPU processes); --batch-size stays the global batch")
    t.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in RUNDIR")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    common(t)

    e = sub.add_parser("eval", help="evaluate a finished run on labelled data", description="Print JSON metrics of a finished run: accuracy on a folder of class folders, or COCO mAP on detection data (its test split, else val, else all of it).")
    e.add_argument("run", metavar="RUNDIR")
    e.add_argument("--data", metavar="DIR", required=True, help="class folders named like the model's classes, or COCO / YOLO / VOC data")
    e.add_argument("--batch-size", type=_positive, default=64)
    e.add_argument("--device", default="auto")
    e.add_argument("--strict", action="store_true")
    e.add_argument("--out", metavar="FILE", help="also write the JSON here")
    common(e)

    p = sub.add_parser("predict", help="classify new images, or find objects in them", description="Classify image files or folders of images with a finished run, or with a model graft export wrote (model.onnx with its model.onnx.json; needs only onnxruntime); with a detector, one row per box (x1 y1 x2 y2 in the image's own pixels).")
    p.add_argument("run", metavar="RUNDIR_OR_EXPORT")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--top-k", type=_positive, default=1)
    p.add_argument("--conf", type=float, metavar="C", help="detectors: keep boxes scoring at least C (default the run's detect.conf)")
    p.add_argument("--iou", type=float, metavar="T", help="detectors: NMS IoU threshold (default the run's detect.nms_iou)")
    p.add_argument("--save-images", metavar="DIR", help="detectors: write each image with its boxes drawn into DIR")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--device", default="auto")
    common(p)

    pl = sub.add_parser("plan", help="show what learns, at which rate, before training", description="Print the phases, layers and parameter groups a config would train.")
    pl.add_argument("--config", metavar="FILE")
    pl.add_argument("--set", metavar="KEY=VALUE", action="append", default=[])
    pl.add_argument("--task", choices=["auto", *TASKS], help="default auto: detect when --data holds box annotations")
    pl.add_argument("--model", metavar="NAME", help="backbone, or for detection a head: fcos, retinanet, fasterrcnn")
    pl.add_argument("--strategy", choices=["feature-extract", "fine-tune", "two-phase"])
    pl.add_argument("--fine-tune-at", type=_layer, metavar="LAYER")
    pl.add_argument("--img-size", type=_positive, metavar="S", help="input size, as for graft train (detectors: levels and anchors depend on it)")
    pl.add_argument("--weights", metavar="bundled|hub|none|coco|FILE|RUNDIR", help="starting weights, as for graft train (only --decide loads them)")
    pl.add_argument("--classes", type=_positive, default=None, metavar="K", help="number of classes (default: from --data or 2)")
    pl.add_argument("--data", metavar="DIR", help="count classes from this folder")
    pl.add_argument("--layers", action="store_true", help="list every backbone layer with its index")
    pl.add_argument("--decide", action="store_true", help="decide what is auto (augmentation, head lr) on --data's validation split now, as graft train would; the embeddings are cached for the run")
    pl.add_argument("--device", default="auto")
    pl.add_argument("--format", choices=["text", "json"], default="text")
    common(pl)

    x = sub.add_parser(
        "expand",
        help="add classes to a trained run without forgetting the old ones",
        description="Widen a finished run's last layer with the classes in --data (folders not named like an old class); "
        "folders named like old classes are optional rehearsal images. Writes a new run with expand_metrics.json. "
        "A detection run (or coco:MODEL, torchvision's COCO detector) takes boxes instead: COCO, YOLO or Pascal VOC, new classes by name.",
    )
    x.add_argument("run", metavar="RUNDIR", nargs="?", help="the finished run to expand, or coco:MODEL for torchvision's COCO detector (not needed with --resume)")
    x.add_argument("--data", metavar="DIR", help="classifier: folder of class folders; detector: boxes (COCO, YOLO, VOC). The new classes, and optionally some old ones")
    x.add_argument("--out", metavar="RUNDIR", help="run folder to write the expanded model to")
    x.add_argument("--mode", choices=["frozen", "fine-tune"], help="frozen (default): only the new rows learn; fine-tune: the backbone's top adapts too, with distillation")
    x.add_argument("--exemplars", type=_count, metavar="N", help="old-class images kept per class for rehearsal (herding), from old-class folders in --data or else the original training images")
    x.add_argument("--config", metavar="FILE", help="YAML config overriding the run's own (see examples/)")
    x.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override a config key, e.g. expand.calibrate=norm (repeatable)")
    x.add_argument("--resume", metavar="SNAPSHOT", help="continue an expansion exactly from its snapshot")
    x.add_argument("--epochs", type=_count, metavar="N", help="classifiers: epochs of the new rows on cached embeddings (default 100); detectors: of the new classes' block on cached features (default: the run's own frozen-phase epochs)")
    x.add_argument("--fine-tune-epochs", type=_count, metavar="M", help="fine-tune mode: epochs of adapting the backbone (classifiers: default 5; detectors: the run's own)")
    x.add_argument("--fine-tune-at", type=_layer, metavar="LAYER")
    x.add_argument("--batch-size", type=_positive, metavar="B")
    x.add_argument("--seed", type=_count, metavar="K")
    x.add_argument("--augment", choices=["none", "flip", "flip-rotate", "flip-scale", "strong"], help="classifiers: default none (the class statistics describe un-augmented images); detectors: default what the run used (flip-scale: detectors only)")
    x.add_argument("--device", metavar="DEV")
    x.add_argument("--devices", type=_positive, metavar="N", help="expand in N processes on this machine (as graft train --devices)")
    x.add_argument("--strict", action="store_true")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--quiet", action="store_true")
    common(x)

    ex = sub.add_parser("export", help="export a finished run to ONNX or TorchScript, checked against the run",
                        description="Write RUNDIR/export/model.onnx (or model.pt) and a sidecar model.onnx.json with the classes, preprocessing and input/output layout; "
                        "then run the export and the run on the run's validation images and keep the export only if they agree (parity figures in the sidecar).")
    ex.add_argument("run", metavar="RUNDIR")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--half", action="store_true", help="float16 weights (classifiers: throughout; detectors: backbone and neck, heads and NMS stay float32)")
    ex.add_argument("--opset", type=_opset, default=None, metavar="N", help="ONNX opset, 11 to 20 (default 17)")
    ex.add_argument("--out", metavar="FILE", help="default RUNDIR/export/model.onnx (model-fp16.onnx with --half; .pt for torchscript)")
    ex.add_argument("--images", metavar="DIR", help="check parity on the images under DIR instead of the run's validation split")
    ex.add_argument("--parity-images", type=_positive, default=16, metavar="N", help="images the parity check uses (default 16)")
    ex.add_argument("--quiet", action="store_true")
    common(ex)

    r = sub.add_parser("report", help="write a finished run's report.html", description="Write RUNDIR/report.html again: one self-contained page (images embedded, nothing fetched) with what was trained, the figures, plots and per-class metrics. Every run writes it at its end.")
    r.add_argument("run", metavar="RUNDIR")
    r.add_argument("--out", metavar="FILE", help="write the page here instead of RUNDIR/report.html")
    common(r)

    c = sub.add_parser("cache", help="list, clear or prune the shared cache (~/.cache/graft)",
                       description="The shared cache holds backbone embeddings, decoded images and detector feature spills that later runs reuse. "
                       "It is capped at GRAFT_CACHE_MAX_GB (default 10; 0 for no cap), least recently used entries going first.")
    c.add_argument("action", choices=["list", "clear", "prune"], help="list: sizes, last use and what each kind holds; clear: remove entries; prune: remove least recently used entries down to a size")
    c.add_argument("--dir", metavar="DIR", help="the cache folder (default $GRAFT_CACHE_DIR, else $XDG_CACHE_HOME/graft, else ~/.cache/graft)")
    c.add_argument("--kind", action="append", choices=["embeddings", "decoded", "features"], help="clear: only this kind (repeatable)")
    c.add_argument("--max-gb", type=float, metavar="G", help="prune: down to G gigabytes (default GRAFT_CACHE_MAX_GB, else 10)")
    c.add_argument("--unused-days", type=float, metavar="D", help="prune: also remove entries not used for D days")
    c.add_argument("--entries", action="store_true", help="list: every entry, not only the totals")
    common(c)

    d = sub.add_parser("demo", help="fine-tune the bundled EfficientNet-Lite0 on real photos (no download)", description="Classify: a texture dataset from photos scikit-image ships. Detect: tree boxes in aerial photos from the deepforest wheel the set-up fetched. Either runs the two-phase recipe.")
    d.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK)
    d.add_argument("--out", metavar="RUNDIR", help="default runs/demo (classify) or runs/demo-detect (detect)")
    d.add_argument("--epochs", type=_count, default=None)
    d.add_argument("--fine-tune-epochs", type=_count, default=None)
    d.add_argument("--quiet", action="store_true")
    common(d)
    return parser


# ---------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from graft.configuration import resolve_config
    from graft.pipeline.registry import interpret_flags
    from graft.pipeline.train import train

    flags = {key: getattr(args, dest) for dest, key in TRAIN_FLAGS.items()}
    if args.strict:
        flags["data.strict"] = True
    interpret_flags(flags)
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k in TRAIN_FLAGS and k != "data" and v is not None]
        if args.weights:
            raise GraftError("give either --weights (start from weights with a fresh solver) or --resume (continue a snapshot exactly), not both")
        if args.config or args.set or given or args.strict:
            extra = (["--config"] if args.config else []) + (["--set"] if args.set else []) + (["--strict"] if args.strict else []) + given
            raise GraftError(
                f"--resume continues the snapshot's run with its saved config, so {', '.join(x.strip() for x in extra)} cannot be changed; "
                "to train with other settings start from its weights: --weights SNAPSHOT"
            )
        train(None, args.out, resume=args.resume, data_dir=args.data, overwrite=args.overwrite, quiet=args.quiet)
        return 0
    cfg = resolve_config(args.config, args.set, flags)
    train(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from graft.data.samples import Skipped
    from graft.io import write_json
    from graft.pipeline.predict import load_run

    if args.out and Path(args.out).is_dir():
        raise GraftError(f"--out {args.out} is a folder; give a file name for the JSON, e.g. {Path(args.out) / 'eval.json'}")
    run = load_run(args.run, device=args.device)
    metrics = run.evaluate(args.data, batch_size=args.batch_size, strict=args.strict)
    text = json.dumps(metrics, indent=2)
    if args.out:
        write_json(args.out, metrics)
    print(text)
    skipped = [Skipped(Path(s["path"]), s["reason"]) for s in metrics.get("skipped_files", [])]
    tell_data(warnings=metrics.get("warnings", []), problems=metrics.get("annotation_problems", []), skipped=skipped,
              listed_in=args.out or "the JSON output")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from graft.pipeline.export import export_run

    say = progress(args.quiet)
    result = export_run(args.run, args.format, out=args.out, half=args.half, opset=args.opset, images=args.images, parity_images=args.parity_images, say=say)
    print(json.dumps({"model": str(result.path), "sidecar": str(result.sidecar), "parity": {k: v for k, v in result.parity.items() if k != "image_paths"}}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    for item in args.inputs:
        if not os.path.exists(item):
            raise GraftError(f"no such file or folder: {item}")
    if os.path.isfile(args.run) or Path(args.run).suffix in (".onnx", ".pt"):  # an exported model: onnxruntime and the sidecar, no torch for ONNX
        from graft.exporting.exported import sidecar_path
        from graft.pipeline.export import load_export
        from graft.pipeline.registry import task_named

        if Path(args.run).parent.name == "snapshots" and not sidecar_path(Path(args.run)).is_file():
            raise GraftError(f"{args.run} is a snapshot, for --resume or --weights, not a model to predict with: predict with the run folder {Path(args.run).parent.parent}")

        exported = load_export(args.run)
        return task_named(exported.task).print_predictions(exported, args)
    from graft.pipeline.predict import load_run
    from graft.pipeline.registry import task_of

    run = load_run(args.run, device=args.device)
    return task_of(run.info).print_predictions(run, args)


def cmd_plan(args: argparse.Namespace) -> int:
    from graft.configuration import resolve_config
    from graft.pipeline.plan import describe_plan, format_plan
    from graft.pipeline.registry import interpret_flags

    flags = {"task": args.task, "model.name": args.model, "train.strategy": args.strategy, "train.fine_tune_at": args.fine_tune_at, "data.dir": args.data, "data.img_size": args.img_size, "model.weights": args.weights, "train.device": args.device}
    interpret_flags(flags)
    cfg = resolve_config(args.config, args.set, flags)
    plan = describe_plan(cfg, num_classes=args.classes, decide=args.decide)
    print(json.dumps(plan, indent=2) if args.format == "json" else format_plan(plan, layers=args.layers))
    return 0


EXPAND_FLAGS = {
    "mode": "expand.mode",
    "exemplars": "expand.exemplars",
    "epochs": "train.epochs",
    "fine_tune_epochs": "train.fine_tune_epochs",
    "fine_tune_at": "train.fine_tune_at",
    "batch_size": "solver.batch_size",
    "seed": "solver.seed",
    "augment": "data.augment",
    "device": "train.device",
}


def cmd_expand(args: argparse.Namespace) -> int:
    from graft.pipeline.expand import expand, expand_config, load_source

    flags = {key: getattr(args, dest) for dest, key in EXPAND_FLAGS.items()}
    if args.strict:
        flags["data.strict"] = True
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None] + (["RUNDIR"] if args.run else [])
        if args.config or args.set or given:
            raise GraftError("--resume continues the snapshot's expansion with its saved settings; give only --resume (and --out, --data if the new data moved, --overwrite, --quiet)")
        expand(None, args.out, resume=args.resume, data_dir=args.data, overwrite=args.overwrite, quiet=args.quiet)
        return 0
    if not args.run:
        raise GraftError("which run? graft expand RUNDIR --data NEW_CLASSES --out NEW_RUNDIR")
    if not args.data:
        raise GraftError("no data: pass --data DIR, a folder with a subfolder of images per new class")
    if not args.out:
        raise GraftError("no output folder: pass --out RUNDIR for the expanded run")
    source = load_source(args.run)
    cfg = expand_config(source, args.data, config_file=args.config, overrides=args.set, flags=flags)
    expand(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from graft.pipeline.report import write_report

    if args.out and Path(args.out).is_dir():
        raise GraftError(f"--out {args.out} is a folder; give a file name for the page, e.g. {Path(args.out) / 'report.html'}")
    print(write_report(args.run, args.out))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from graft import cache
    from graft.io import human_bytes

    root = cache.cache_root(args.dir)
    misplaced = (args.kind and args.action != "clear") or ((args.max_gb, args.unused_days) != (None, None) and args.action != "prune") or (args.entries and args.action != "list")
    if misplaced:
        raise GraftError("--kind goes with clear, --max-gb and --unused-days with prune, --entries with list")
    if not root.is_dir():
        print(f"cache {root}: empty (no such folder)")
        return 0
    if args.action == "list":
        print("\n".join(cache.summary(root, each=args.entries)))
        return 0
    swept = cache.sweep(root)
    if args.action == "clear":
        gone = cache.clear(root, args.kind)
    else:
        if args.max_gb is not None and args.max_gb < 0:
            raise GraftError(f"--max-gb {args.max_gb:g} is negative")
        cap = int(args.max_gb * 1e9) if args.max_gb is not None else cache.max_bytes()
        old = time.time() - args.unused_days * 86400 if args.unused_days is not None else None
        gone = cache.prune(root, 0, keep=lambda e: e.used >= old) if old is not None else []
        gone += cache.prune(root, cap)
    print(f"removed {len(gone)} entries ({human_bytes(sum(e.bytes for e in gone))}) and {len(swept)} leftover temporary files from {root}; "
          f"{human_bytes(sum(e.bytes for e in cache.entries(root)))} left")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from graft.demo import run_demo

    run_demo(Path(args.out or ("runs/demo" if args.task == DEFAULT_TASK else f"runs/demo-{args.task}")), task=args.task, epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs, quiet=args.quiet)
    return 0


def one_line(err: Exception) -> str:
    """The user's message of an error, also when a DataLoader worker wrapped it in its traceback."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith("graft.errors.") and ": " in last else last
    return text


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "plan": cmd_plan, "expand": cmd_expand, "export": cmd_export, "report": cmd_report, "cache": cmd_cache, "demo": cmd_demo}


def _resume_hint(args: argparse.Namespace, err: GraftError) -> str:
    """After a full disk stopped a run: the snapshot to continue from, once there is room."""
    from graft.errors import DiskFullError

    out = getattr(args, "out", None)
    if not isinstance(err, DiskFullError) or args.command not in ("train", "expand") or not out:
        return ""
    last = Path(out) / "snapshots" / "last"
    return f"; then continue with: graft {args.command} --resume {last}" if last.is_file() else ""


def _launched() -> bool:
    """One of several processes torchrun started (read from the environment: no torch import)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _say_failure(message: str) -> None:
    """An error, printed once for the whole run: by the first rank that fails (see
    ``graft.engine.distributed.first_error_here``), on the process's real stderr."""
    if _launched():
        from graft.engine.distributed import first_error_here

        if not first_error_here():
            return
    print(message, file=sys.__stderr__ if _launched() else sys.stderr, flush=True)


def _without_devices(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--devices":
            skip = True
        elif not item.startswith("--devices="):
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("GRAFT_DEBUG") == "1"
    devices = getattr(args, "devices", None)
    if devices is not None and _launched():
        print("error: --devices starts the processes itself; under torchrun leave it out (torchrun's --nproc-per-node says how many)", file=sys.stderr)
        return 2
    if devices is not None and devices > 1:
        from graft.engine.distributed import launch_here

        return launch_here(devices, _without_devices(argv))
    try:
        code = COMMANDS[args.command](args)
        if _launched():  # every rank done with every collective before any closes its connections
            from graft.engine.distributed import leave

            leave()
        return code
    except Interrupted as stop:
        if stop.snapshot is None:  # e.g. while auto was still being decided: nothing to resume yet
            print("interrupted before the first snapshot: nothing to resume; start the run again", file=sys.stderr)
        else:
            print(f"interrupted: a resumable snapshot is at {stop.snapshot}; continue with: graft {'expand' if args.command == 'expand' else 'train'} --resume {stop.snapshot}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except GraftError as err:
        if debug:
            raise
        _say_failure(f"error: {one_line(err)}{_resume_hint(args, err)}")
        return 2
    except Exception as err:  # a bug, or a failure graft did not anticipate
        if debug:
            raise
        _say_failure(f"error: unexpected {type(err).__name__}: {str(err)[:300]} (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
