"""How a classifier run exports (``graft export``): traced with a dynamic batch axis, logits out;
parity is logits within a tolerance and the same top-1 on real images.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.console import plural
from graft.exporting.exported import ExportedModel, resize_shorter_to
from graft.exporting.writer import Traced
from graft.tasks.classify.exported import ExportedClassifier, classifier_input



# Tolerances: (absolute, relative to the largest magnitude) for logits; absolute for scores.
LOGIT_TOL = {False: (1e-4, 1e-4), True: (5e-2, 2e-2)}


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


class ClassifierExport:
    """``ExportSpec`` for classifier runs."""

    task = "classify"

    def traced(self, run: Any, half: bool) -> Traced:
        model = copy.deepcopy(run.model).cpu().eval()
        model = model.half() if half else model
        size = run.preprocessing.input_size
        example = torch.zeros(2, 3, size, size, dtype=torch.float16 if half else torch.float32)
        return Traced(model, example, ["input"], ["logits"], {"input": {0: "batch"}, "logits": {0: "batch"}})

    def describe(self, run: Any, half: bool) -> dict[str, Any]:
        pre, dtype = run.preprocessing, "float16" if half else "float32"
        return {
            "preprocessing": {
                "input_size": pre.input_size, "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
                "resize_shorter_to": resize_shorter_to(pre.input_size, pre.crop_pct),
                "steps": ["decode as 8-bit RGB, EXIF orientation applied", f"resize the shorter side to resize_shorter_to (PIL, {pre.interpolation})",
                          "centre-crop input_size x input_size", "scale to 0..1, subtract mean, divide by std"],
            },
            "input": {"name": "input", "shape": ["batch", 3, pre.input_size, pre.input_size], "dtype": dtype, "layout": "NCHW, RGB, normalised"},
            "outputs": [{"name": "logits", "shape": ["batch", len(run.classes)], "dtype": dtype, "meaning": "class logits in the order of classes; softmax gives probabilities"}],
        }

    def exported(self, path: Path, meta: dict[str, Any]) -> ExportedModel:
        return ExportedClassifier(path, meta)

    def parity(self, run: Any, exported: ExportedModel, checked: list, half: bool) -> dict[str, Any]:
        return _classifier_parity(run, exported, checked, half)
