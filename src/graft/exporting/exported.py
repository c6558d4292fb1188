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

from graft.errors import GraftError

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


# ---------------------------------------------------------------------------- preprocessing


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


def resize_shorter_to(input_size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop, as graft's evaluation transform computes it."""
    return int(math.floor(input_size / crop_pct))
