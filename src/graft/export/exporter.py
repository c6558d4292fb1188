"""``graft export``: a finished run as a file another program can run (ONNX or TorchScript), with
a sidecar that says everything needed to use it, and a parity check that the file predicts as the
run does.

The parity check runs the export through ``graft.export.exported`` (the sidecar's preprocessing in NumPy
and PIL, onnxruntime for ONNX) and the run through graft's own PyTorch code, on real images of the
run's validation split, and compares: classifiers, logits within a tolerance and the same top-1;
detectors, every box matched (same class, IoU >= 0.99, score within a tolerance). The model file is
written to a temporary name, checked, and only then moved into place with its sidecar: an export
that disagrees with its model is never left behind.

Both formats are traced (``torch.onnx.export(dynamo=False)`` and ``torch.jit.trace``): torchvision's
detectors are written for the tracing exporter (their post-processing has ONNX-specific paths),
and one route for both kinds of model keeps the parity figures comparable. Classifiers get a
dynamic batch axis; detectors take one image at a time.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import os
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graft.version import __version__
from graft.console import plural
from graft.data.images import ImageError, load_image
from graft.errors import ConfigError, ExportError
from graft.export.exported import ExportedModel, classifier_input, load_export, detector_input, resize_shorter_to, sidecar_path
from graft.io import read_json, write_json
from graft.io import file_digest

FORMATS = {"onnx": "onnx", "torchscript": "pt"}
DEFAULT_OPSET = 17
PARITY_IMAGES = 16
# Tolerances: (absolute, relative to the largest magnitude) for logits; absolute for scores.
LOGIT_TOL = {False: (1e-4, 1e-4), True: (5e-2, 2e-2)}
SCORE_TOL = {False: 1e-4, True: 2e-2}
MIN_IOU = 0.99
NMS_EDGE = 0.05  # a box whose IoU with a kept higher-scored one is this close to the NMS threshold
EDGE_SHARE = 0.01  # at most this share of the compared boxes may be NMS edge cases


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    parity: dict[str, Any]


class _Boxes(nn.Module):
    """A detector as a traceable function of one image: ``[1, 3, S, S]`` in 0..1 -> (boxes xyxy
    in input pixels, scores, labels 0..K-1)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.detector(image)[0]
        return d["boxes"], d["scores"], d["labels"]


def default_path(run_dir: Path, fmt: str, half: bool) -> Path:
    return run_dir / "export" / f"model{'-fp16' if half else ''}.{FORMATS[fmt]}"


def _target(out: str | os.PathLike | None, run_dir: Path, fmt: str, half: bool) -> Path:
    """Where the export goes: ``out``, or into it when it is a folder (existing, or written with
    a trailing slash) under the default name; an extension of the other format is refused."""
    if out is None:
        return default_path(run_dir, fmt, half)
    target = Path(out)
    if target.is_dir() or str(out).endswith(("/", os.sep)):
        return target / default_path(run_dir, fmt, half).name
    other = {f".{ext}" for name, ext in FORMATS.items() if name != fmt}
    if target.suffix.lower() in other:
        raise ConfigError(f"--out {out} names a {target.suffix} file, but the format is {fmt}: name it .{FORMATS[fmt]}, or pass --format {next(n for n, e in FORMATS.items() if f'.{e}' == target.suffix.lower())}")
    return target


def export_run(run_dir: str | os.PathLike, fmt: str = "onnx", *, out: str | os.PathLike | None = None, half: bool = False, opset: int = DEFAULT_OPSET,
               images: str | os.PathLike | None = None, parity_images: int = PARITY_IMAGES, say: Any = None) -> ExportResult:
    """Export the finished run in ``run_dir`` to ``out`` (default ``RUNDIR/export/model.EXT``) and
    check it against the run on up to ``parity_images`` images (the run's validation split, or the
    image files under ``images``). Raises ``ExportError`` if the export disagrees with the run."""
    from graft.tasks.classify.predict import load_run

    say = say or (lambda msg: None)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    run = load_run(run_dir, device="cpu")  # a clear SnapshotError for a folder that is not a finished run
    task = "detect" if run.info.get("task") == "detect" else "classify"
    target = _target(out, run_dir, fmt, half)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.touch()
    except OSError as err:
        raise ExportError(f"cannot write the export to {target.parent}: {err.strerror or err}") from None
    checked = list(itertools.islice(_parity_images(run, run_dir, images), parity_images))
    if not checked and images is not None:
        why = "does not exist" if not Path(images).exists() else "holds no readable image"
        raise ExportError(f"--images {images} {why}: give a folder (or file) with a few images like the run's to check the export on")
    if not checked:
        raise ExportError("no readable images to check the export on: the run's validation images are gone (moved?); pass --images DIR with a few images like the run's")
    meta = sidecar(run, task, fmt, half, opset, run_dir)
    started = time.perf_counter()
    try:
        _trace(run, task, fmt, half, opset, tmp)
        say(f"exported {run_dir} to {fmt}{' (float16)' if half else ''} in {time.perf_counter() - started:.1f}s; checking it against the run on {plural(len(checked), 'image')}")
        exported = load_export(tmp, meta=meta)
        parity = _classifier_parity(run, exported, checked, half) if task == "classify" else _detector_parity(run, exported, checked, half)
        meta["parity"] = parity
        if not parity["passed"]:
            raise ExportError(f"the {fmt} export disagrees with the run, so it was not kept: {parity['summary']}")
        write_json(sidecar_path(target), meta)
        os.replace(tmp, target)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"exporting {run_dir} to {fmt} failed: {type(err).__name__}: {str(err)[:300]}") from err
    finally:
        tmp.unlink(missing_ok=True)
    say(f"parity: {parity['summary']}; wrote {target} and {sidecar_path(target).name}")
    return ExportResult(target, sidecar_path(target), parity)


# ---------------------------------------------------------------------------- writing


def _half_detector(model: nn.Module) -> nn.Module:
    """Backbone and necks in float16; heads, box decoding and NMS stay float32 (torchvision's NMS
    has no float16 CPU kernel, and float16 anchors would round box corners to half pixels at 640)."""
    model.backbone.half()
    model.backbone.register_forward_pre_hook(lambda module, args: tuple(a.half() for a in args))
    for owner in [model.detector, *model.branches]:
        owner.backbone.fpn.half()
        owner.backbone.register_forward_hook(lambda module, args, out: OrderedDict((k, v.float()) for k, v in out.items()))
    return model


def _trace(run: Any, task: str, fmt: str, half: bool, opset: int, path: Path) -> None:
    model = copy.deepcopy(run.model).cpu().eval()
    if half:
        model = model.half() if task == "classify" else _half_detector(model)
    dtype = torch.float16 if half and task == "classify" else torch.float32
    if task == "classify":
        size = run.preprocessing.input_size
        module, example, names, axes = model, torch.zeros(2, 3, size, size, dtype=dtype), (["input"], ["logits"]), {"input": {0: "batch"}, "logits": {0: "batch"}}
    else:
        size = model.size
        module, example, names, axes = _Boxes(model).eval(), torch.zeros(1, 3, size, size, dtype=dtype), (["image"], ["boxes", "scores", "labels"]), {"boxes": {0: "detections"}, "scores": {0: "detections"}, "labels": {0: "detections"}}
    with warnings.catch_warnings(), torch.no_grad(), _native_output_kept():
        warnings.simplefilter("ignore")  # the tracers' notes on Python control flow and the legacy exporter's deprecation
        if fmt == "onnx":
            torch.onnx.export(module, (example,), str(path), input_names=names[0], output_names=names[1], dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        else:
            torch.jit.trace(module, (example,), check_trace=False).save(str(path))


@contextlib.contextmanager
def _native_output_kept():
    """The ONNX exporter's C++ side prints the whole Torch IR graph (thousands of lines) to the
    process's stdout when an export fails, where graft's JSON goes. Both native streams go to a
    file while exporting; on failure its text becomes a note on the exception (``--debug``)."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no file descriptors to redirect
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException as err:
            log.seek(0)
            text = log.read().decode("utf-8", "replace").strip()
            if text:  # its opening says what it is; the failing op is near its end
                err.add_note("the exporter's own output:\n" + (text if len(text) <= 4000 else f"{text[:1000]}\n[...]\n{text[-3000:]}"))
            raise
        finally:
            for fd, copy_of in ((1, saved[0]), (2, saved[1])):
                os.dup2(copy_of, fd)
                os.close(copy_of)


def sidecar(run: Any, task: str, fmt: str, half: bool, opset: int, run_dir: Path) -> dict[str, Any]:
    """Everything another program needs to use the exported model (``model.onnx.json``)."""
    info = run.info
    dtype = "float16" if half else "float32"
    meta: dict[str, Any] = {
        "format": fmt, "opset": opset if fmt == "onnx" else None, "half": half, "task": task, "classes": list(run.classes),
        "graft_version": __version__, "torch_version": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir.resolve()), "model_sha256": file_digest(run_dir / "model.safetensors")},
    }
    if task == "classify":
        pre = run.preprocessing
        meta["preprocessing"] = {
            "input_size": pre.input_size, "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
            "resize_shorter_to": resize_shorter_to(pre.input_size, pre.crop_pct),
            "steps": ["decode as 8-bit RGB, EXIF orientation applied", f"resize the shorter side to resize_shorter_to (PIL, {pre.interpolation})",
                      "centre-crop input_size x input_size", "scale to 0..1, subtract mean, divide by std"],
        }
        meta["input"] = {"name": "input", "shape": ["batch", 3, pre.input_size, pre.input_size], "dtype": dtype, "layout": "NCHW, RGB, normalised"}
        meta["outputs"] = [{"name": "logits", "shape": ["batch", len(run.classes)], "dtype": dtype, "meaning": "class logits in the order of classes; softmax gives probabilities"}]
    else:
        from graft.tasks.detect.dataset import PAD_FILL

        d, det, size = info["detector"], info["config"]["detect"], run.model.size
        meta["preprocessing"] = {
            "input_size": size, "pad_value": PAD_FILL, "mean": list(info["preprocessing"]["mean"]), "std": list(info["preprocessing"]["std"]),
            "steps": ["decode as 8-bit RGB, EXIF orientation applied", "resize the longer side to input_size (PIL, bilinear); scale = new width / width",
                      "pad right and below with pad_value to input_size x input_size", "scale to 0..1 (mean and std are applied inside the model)"],
        }
        meta["input"] = {"name": "image", "shape": [1, 3, size, size], "dtype": "float32", "layout": "NCHW, RGB, 0..1, one image per call"}
        meta["precision"] = "backbone and neck float16, heads and post-processing float32" if half else "float32"
        meta["outputs"] = [
            {"name": "boxes", "shape": ["detections", 4], "dtype": "float32", "meaning": "x1 y1 x2 y2 in input pixels; divide by scale for the image's own pixels"},
            {"name": "scores", "shape": ["detections"], "dtype": "float32", "meaning": "confidence, highest first"},
            {"name": "labels", "shape": ["detections"], "dtype": "int64", "meaning": "index into classes"},
        ]
        meta["detector"] = {"head": d.get("head"), "score_thresh": d["score_thresh"], "nms_iou": det["nms_iou"], "max_detections": det["max_detections"],
                            "conf": det["conf"], "box_format": "xyxy"}
    return meta


# ---------------------------------------------------------------------------- parity


def _parity_images(run: Any, run_dir: Path, images: str | os.PathLike | None):
    """Real images, loaded: the ones under ``images``, else the run's validation split (else its
    test or training split). Unreadable ones are skipped."""
    from graft.prediction import expand_inputs

    if images is not None:
        paths = expand_inputs([images])
    else:
        splits = read_json(run_dir / "splits.json") if (run_dir / "splits.json").is_file() else {}
        root = Path(splits.get("root", "."))
        paths = []
        for split in ("val", "test", "train"):
            entries = splits.get(split) or []
            paths = [root / (e["path"] if isinstance(e, dict) else e[0]) for e in entries]
            if paths:
                break
    for p in paths:
        try:
            yield p, load_image(p)
        except ImageError:
            continue


def _classifier_parity(run: Any, exported: ExportedModel, checked: list, half: bool) -> dict[str, Any]:
    graft_in = torch.stack([run.transform(image) for _, image in checked])
    with torch.inference_mode():
        ours = run.model(graft_in).float().numpy()
    theirs = exported.logits(np.stack([classifier_input(image, exported.pre) for _, image in checked]))
    atol, rtol = LOGIT_TOL[half]
    tol = atol + rtol * float(np.abs(ours).max())
    diff = float(np.abs(ours - theirs).max())
    top = np.sort(ours, 1)
    near_tie = (top[:, -1] - top[:, -2]) <= 2 * tol if ours.shape[1] > 1 else np.zeros(len(ours), bool)
    same_top1 = ours.argmax(1) == theirs.argmax(1)
    disagree = int((~same_top1 & ~near_tie).sum())
    passed = diff <= tol and disagree == 0
    summary = (f"{plural(len(checked), 'image')}: max |logit difference| {diff:.2e} (tolerance {tol:.1e}), top-1 agrees on {int(same_top1.sum())}/{len(checked)}"
               + (f" ({int((~same_top1 & near_tie).sum())} near-ties)" if (~same_top1 & near_tie).any() else ""))
    return {"passed": passed, "images": len(checked), "max_abs_logit_diff": diff, "tolerance": tol, "top1_agree": int(same_top1.sum()), "top1_disagree_not_tie": disagree,
            "image_paths": [str(p) for p, _ in checked], "summary": summary}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _unmatched(a: tuple, b: tuple, floor: float, tol: float, nms_iou: float) -> tuple[int, list[float], int, float, float]:
    """(boxes of ``a`` scored ``floor`` or more, the scores of those without a twin in ``b``, how
    many of the rest NMS decided on a knife's edge, worst IoU and score gap among the twins).

    A twin: same label, IoU >= MIN_IOU, score within ``tol``. A box without one is an NMS edge
    case when ``b`` holds a box of its label, scored as high or higher (within ``tol``), that
    overlaps it by at least the NMS threshold less NMS_EDGE: in ``b`` that neighbour suppressed it,
    or nearly did, over a difference of rounding (or a box suppressed there at the edge let it
    live). The caller bounds how many edge cases it accepts, so a systematic shift fails."""
    boxes, scores, labels = a
    other_boxes, other_scores, other_labels = b
    keep = scores >= floor
    if not keep.any():
        return 0, [], 0, 1.0, 0.0
    iou = _iou(boxes[keep], other_boxes) if len(other_boxes) else np.zeros((int(keep.sum()), 0))
    missing, edge, worst_iou, worst_gap = [], 0, 1.0, 0.0
    for i, (s, c) in enumerate(zip(scores[keep], labels[keep])):
        same = other_labels == c
        ok = same & (iou[i] >= MIN_IOU) & (np.abs(other_scores - s) <= tol)
        if not ok.any():
            if (same & (other_scores >= s - tol) & (iou[i] >= nms_iou - NMS_EDGE)).any():
                edge += 1
            else:
                missing.append(float(s))
            continue
        j = int(np.argmax(np.where(ok, iou[i], -1)))
        worst_iou, worst_gap = min(worst_iou, float(iou[i, j])), max(worst_gap, float(abs(other_scores[j] - s)))
    return int(keep.sum()), missing, edge, worst_iou, worst_gap


def _detector_parity(run: Any, exported: ExportedModel, checked: list, half: bool) -> dict[str, Any]:
    from graft.tasks.detect.boxes import BoxSample
    from graft.tasks.detect.dataset import BoxDataset

    tol = SCORE_TOL[half]
    floor = float(exported.meta["detector"]["score_thresh"]) + tol  # boxes this close to the cut may fairly appear on one side only
    cap = int(exported.meta["detector"]["max_detections"])
    run._set_thresholds(float(run.info["detector"]["score_thresh"]), None)
    compared, missing, edge = 0, [], 0
    worst_iou, worst_gap = 1.0, 0.0
    nms_iou = float(exported.meta["detector"]["nms_iou"])
    for path, image in checked:
        w, h = image.size
        sample = BoxSample(Path(path), str(path), w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
        tensor, _ = BoxDataset([sample], run.model.size).item_from(image, 0)
        with torch.inference_mode():
            d = run.model(tensor[None])[0]
        ours = (d["boxes"].float().numpy(), d["scores"].float().numpy(), d["labels"].numpy())
        theirs = exported.detect(detector_input(image, exported.pre)[0])
        # An output filled to the per-image cap was cut at its lowest score: boxes near that cut
        # may fairly be kept by one model and not the other, as near the score threshold.
        cut = max([floor] + [float(o[1].min()) + tol for o in (ours, theirs) if len(o[1]) >= cap])
        for a, b in ((ours, theirs), (theirs, ours)):
            n, m, e, i, g = _unmatched(a, b, cut, tol, nms_iou)
            compared, missing, edge, worst_iou, worst_gap = compared + n, missing + m, edge + e, min(worst_iou, i), max(worst_gap, g)
    passed = compared > 0 and not missing and edge <= EDGE_SHARE * compared
    if not compared:
        summary = f"{plural(len(checked), 'image')}, no detection scored {floor:.3g} or more by either model: nothing to compare (pass --images with images in which the model finds objects)"
    else:
        summary = (f"{plural(len(checked), 'image')}, {plural(compared, 'detection')} compared both ways: {compared - len(missing) - edge} matched (IoU >= {MIN_IOU}, score within {tol:g}), "
                   f"{edge} kept by one and suppressed by the other at the NMS threshold (at most {EDGE_SHARE:.0%} may be), {len(missing)} unmatched"
                   + (f" (highest score among them {max(missing):.3f})" if missing else "")
                   + (f"; worst IoU {worst_iou:.4f}, largest score gap {worst_gap:.2e} among the matched" if compared > len(missing) + edge else ""))
    return {"passed": passed, "images": len(checked), "detections_compared": compared, "unmatched": len(missing), "nms_edge_cases": edge, "max_unmatched_score": max(missing, default=None), "min_iou": worst_iou, "max_score_diff": worst_gap,
            "score_tolerance": tol, "iou_threshold": MIN_IOU, "image_paths": [str(p) for p, _ in checked], "summary": summary}
