"""An exported graft model (``graft export``) run without graft's PyTorch code: the model file,
its sidecar (``model.onnx.json``) and the preprocessing the sidecar describes, in NumPy and PIL.

This is what ``graft predict EXPORT images`` runs, and what the export's parity check compares
with the run: if the sidecar described the preprocessing wrongly, the check would fail. For ONNX
nothing here imports torch; onnxruntime runs the model. A TorchScript export needs torch to run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from graft.data.images import ImageError, load_image
from graft.errors import GraftError
from graft.prediction import Box, ImageDetections, Prediction, classify_files, expand_inputs

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


# ---------------------------------------------------------------------------- preprocessing


def classifier_input(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """float32 ``[3, S, S]``: the shorter side resized to ``floor(S / crop_pct)`` (PIL, as
    torchvision's Resize does for a PIL image), the centre ``S x S`` cut out, scaled to 0..1 and
    normalised with ``mean`` and ``std``: graft's evaluation transform."""
    size, resize = int(pre["input_size"]), int(pre["resize_shorter_to"])
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=RESAMPLE[pre["interpolation"]])
    pixels = np.asarray(image, dtype=np.uint8)
    if new_w < size or new_h < size:  # torchvision's CenterCrop pads with zeros first
        pad_h, pad_w = max(0, size - new_h), max(0, size - new_w)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        new_h, new_w = pixels.shape[:2]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = pixels[top : top + size, left : left + size].astype(np.float32) / 255.0
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    return ((crop - mean) / std).transpose(2, 0, 1)


def detector_input(image: Image.Image, pre: dict[str, Any]) -> tuple[np.ndarray, float]:
    """(float32 ``[3, S, S]`` in 0..1, scale): the longer side resized to S (PIL bilinear), padded
    right and below with grey to ``S x S``; boxes come back divided by ``scale``."""
    size = int(pre["input_size"])
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.BILINEAR), dtype=np.uint8)
    canvas = np.full((size, size, 3), pre["pad_value"], dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0), new_w / w


# ---------------------------------------------------------------------------- the model


class ExportedModel:
    """An exported model and its sidecar; ``logits`` / ``detect`` run it on prepared inputs.
    ``load_export`` gives the subclass whose ``predict`` takes image files as the run's does."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]) -> None:
        """``meta``: the sidecar's content (``read_sidecar``)."""
        self.path, self.meta = Path(path), meta
        self.task, self.classes, self.pre, self.format = meta["task"], list(meta["classes"]), meta["preprocessing"], meta["format"]
        self.dtype = np.float16 if self.meta["input"].get("dtype") == "float16" else np.float32
        self._run = self._onnx() if self.format == "onnx" else self._torchscript()

    def _onnx(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise GraftError("running an ONNX export needs onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})

    def _torchscript(self):
        import warnings

        import torch
        import torchvision  # noqa: F401 - registers torchvision::nms, which a detector's TorchScript calls

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice: the format still loads
            module = torch.jit.load(str(self.path), map_location="cpu").eval()

        def run(x: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                out = module(torch.from_numpy(x))
            return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

        return run

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Classifier logits (float32) for prepared inputs ``[B, 3, S, S]``."""
        return np.asarray(self._run(np.ascontiguousarray(batch, dtype=self.dtype))[0], dtype=np.float32)

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes xyxy in input pixels, scores, labels) for one prepared image ``[3, S, S]``."""
        boxes, scores, labels = self._run(np.ascontiguousarray(image[None], dtype=self.dtype))
        return np.asarray(boxes, np.float32), np.asarray(scores, np.float32), np.asarray(labels, np.int64)


class ExportedClassifier(ExportedModel):
    """An exported classifier; ``predict`` as the run's ``TrainedModel.predict``."""

    def predict(self, inputs: list[str | os.PathLike], *, top_k: int = 1, batch_size: int = 32) -> list[Prediction]:
        top_k = max(1, min(top_k, len(self.classes)))

        def classify(inputs: list[np.ndarray]) -> list[list[tuple[str, float]]]:
            logits = self.logits(np.stack(inputs))
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            return [[(self.classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:top_k]] for p in probs]

        return classify_files(inputs, lambda image: classifier_input(image, self.pre), classify, batch_size)


class ExportedDetector(ExportedModel):
    """An exported detector; ``predict`` as the run's ``TrainedDetector.predict``."""

    def predict(self, inputs: list[str | os.PathLike], *, conf: float | None = None, iou: float | None = None, batch_size: int = 1) -> list[ImageDetections]:
        """Boxes at or above ``conf`` (default: the run's) in each image's own pixels, as the run's
        ``TrainedDetector.predict`` gives them. The NMS IoU was fixed at export; one image per call."""
        if iou is not None:
            raise GraftError(f"--iou is fixed in an exported detector (NMS IoU {self.meta['detector']['nms_iou']}); export the run again with detect.nms_iou set")
        conf = float(self.meta["detector"]["conf"]) if conf is None else conf
        results = []
        for path in expand_inputs(inputs):
            try:
                image = load_image(path)
            except ImageError as err:
                results.append(ImageDetections(str(path), error=str(err)))
                continue
            x, scale = detector_input(image, self.pre)
            boxes, scores, labels = self.detect(x)
            keep = scores >= conf
            w, h = image.size
            boxes = (boxes[keep] / scale).clip(0, [w, h, w, h])
            found = [Box(self.classes[int(c)], float(s), *map(float, b)) for b, s, c in zip(boxes, scores[keep], labels[keep])]
            results.append(ImageDetections(str(path), sorted(found, key=lambda b: -b.score)))
        return results


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of the exported model at ``path``, checked for what running it needs."""
    meta_path = sidecar_path(path)
    if not path.is_file():
        raise GraftError(f"no such exported model: {path}")
    if not meta_path.is_file():
        raise GraftError(f"{path} has no sidecar {meta_path.name} beside it: graft export writes one, and it holds the classes and preprocessing")
    try:
        meta = json.loads(meta_path.read_text())
        missing = [k for k in ("task", "classes", "preprocessing", "format", "input") if k not in meta]
    except ValueError as err:
        raise GraftError(f"{meta_path} is not a graft export sidecar (ValueError: {err})") from None
    if missing:
        raise GraftError(f"{meta_path} is not a graft export sidecar (no {', '.join(missing)})")
    return meta


def load_export(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> ExportedClassifier | ExportedDetector:
    """The exported model at ``path`` as a classifier or a detector; ``meta``: its sidecar's
    content when the sidecar is not (yet) beside it, as during graft export's parity check."""
    path = Path(path)
    if meta is None:
        meta = read_sidecar(path)
    elif not path.is_file():
        raise GraftError(f"no such exported model: {path}")
    return (ExportedDetector if meta["task"] == "detect" else ExportedClassifier)(path, meta)


def resize_shorter_to(input_size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop, as graft's evaluation transform computes it."""
    return int(math.floor(input_size / crop_pct))
