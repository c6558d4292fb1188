"""How a detector run exports (``graft export``): one image per call, boxes, scores and labels
out (post-processing and NMS inside); parity matches every box both ways.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graft.console import plural
from graft.exporting.exported import ExportedModel
from graft.exporting.writer import Traced
from graft.tasks.detect.exported import ExportedDetector, detector_input



SCORE_TOL = {False: 1e-4, True: 2e-2}


MIN_IOU = 0.99


NMS_EDGE = 0.05  # a box whose IoU with a kept higher-scored one is this close to the NMS threshold


EDGE_SHARE = 0.01  # at most this share of the compared boxes may be NMS edge cases


class _Boxes(nn.Module):
    """A detector as a traceable function of one image: ``[1, 3, S, S]`` in 0..1 -> (boxes xyxy
    in input pixels, scores, labels 0..K-1)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.detector(image)[0]
        return d["boxes"], d["scores"], d["labels"]


def _half_detector(model: nn.Module) -> nn.Module:
    """Backbone and necks in float16; heads, box decoding and NMS stay float32 (torchvision's NMS
    has no float16 CPU kernel, and float16 anchors would round box corners to half pixels at 640)."""
    model.backbone.half()
    model.backbone.register_forward_pre_hook(lambda module, args: tuple(a.half() for a in args))
    for owner in [model.detector, *model.branches]:
        owner.backbone.fpn.half()
        owner.backbone.register_forward_hook(lambda module, args, out: OrderedDict((k, v.float()) for k, v in out.items()))
    return model


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


class DetectorExport:
    """``ExportSpec`` for detector runs."""

    task = "detect"

    def traced(self, run: Any, half: bool) -> Traced:
        model = copy.deepcopy(run.model).cpu().eval()
        model = _half_detector(model) if half else model
        size = model.size
        return Traced(_Boxes(model).eval(), torch.zeros(1, 3, size, size), ["image"], ["boxes", "scores", "labels"],
                      {"boxes": {0: "detections"}, "scores": {0: "detections"}, "labels": {0: "detections"}})

    def describe(self, run: Any, half: bool) -> dict[str, Any]:
        from graft.tasks.detect.dataset import PAD_FILL

        info = run.info
        d, det, size = info["detector"], info["config"]["detect"], run.model.size
        return {
            "preprocessing": {
                "input_size": size, "pad_value": PAD_FILL, "mean": list(info["preprocessing"]["mean"]), "std": list(info["preprocessing"]["std"]),
                "steps": ["decode as 8-bit RGB, EXIF orientation applied", "resize the longer side to input_size (PIL, bilinear); scale = new width / width",
                          "pad right and below with pad_value to input_size x input_size", "scale to 0..1 (mean and std are applied inside the model)"],
            },
            "input": {"name": "image", "shape": [1, 3, size, size], "dtype": "float32", "layout": "NCHW, RGB, 0..1, one image per call"},
            "precision": "backbone and neck float16, heads and post-processing float32" if half else "float32",
            "outputs": [
                {"name": "boxes", "shape": ["detections", 4], "dtype": "float32", "meaning": "x1 y1 x2 y2 in input pixels; divide by scale for the image's own pixels"},
                {"name": "scores", "shape": ["detections"], "dtype": "float32", "meaning": "confidence, highest first"},
                {"name": "labels", "shape": ["detections"], "dtype": "int64", "meaning": "index into classes"},
            ],
            "detector": {"head": d.get("head"), "score_thresh": d["score_thresh"], "nms_iou": det["nms_iou"], "max_detections": det["max_detections"],
                         "conf": det["conf"], "box_format": "xyxy"},
        }

    def exported(self, path: Path, meta: dict[str, Any]) -> ExportedModel:
        return ExportedDetector(path, meta)

    def parity(self, run: Any, exported: ExportedModel, checked: list, half: bool) -> dict[str, Any]:
        return _detector_parity(run, exported, checked, half)
