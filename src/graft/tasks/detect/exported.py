"""An exported detector run without torch: letterboxing in NumPy and PIL, and ``predict`` as the
run's (boxes in the image's own pixels).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from graft.data.images import ImageError, load_image
from graft.errors import GraftError
from graft.exporting.exported import ExportedModel
from graft.prediction import Box, ImageDetections, expand_inputs
from typing import Any



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
