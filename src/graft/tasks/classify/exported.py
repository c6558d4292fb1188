"""An exported classifier run without torch: the evaluation transform in NumPy and PIL, and
``predict`` as the run's.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from graft.exporting.exported import RESAMPLE, ExportedModel
from graft.prediction import Prediction, classify_files



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
