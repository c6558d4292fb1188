"""A finished detection run as a usable detector: predict boxes on new images, evaluate on a
labelled folder in any of the three formats (drawing them: ``graft.prediction.draw``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.configuration import parse_config
from graft.data.dataset import default_workers
from graft.data.images import ImageError, load_image
from graft.tasks.detect.boxes import BoxSample
from graft.tasks.detect.build import build_detection_model
from graft.tasks.detect.data import scan_evaluation
from graft.tasks.detect.dataset import BoxDataset
from graft.tasks.detect.model import GraftDetector
from graft.tasks.detect.widen import rebuild_blocks
from graft.errors import DataError
from graft.prediction import Box, ImageDetections, expand_inputs


class TrainedDetector:
    """A trained graft detector with its classes and preprocessing (from ``model.json``)."""

    def __init__(self, model: GraftDetector, info: dict[str, Any], run_dir: Path | None = None, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        self.info, self.run_dir = info, run_dir
        self.classes: list[str] = list(info["classes"])
        self.device = torch.device(device)
        self.model.to(self.device)

    @classmethod
    def load(cls, run_dir: Path, info: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> TrainedDetector:
        cfg = parse_config(info["config"], str(run_dir / "model.json"))
        blocks = info["detector"].get("class_blocks") or [int(info["num_classes"])]
        model, _ = build_detection_model(cfg, int(blocks[0]), load_weights=False, level_sizes=info["detector"]["level_sizes"], frozen_bn=info["detector"].get("frozen_bn"))
        rebuild_blocks(model, blocks, info["detector"].get("block_kinds"))  # an expanded detector: its added classes as blocks of their own
        model.load_state_dict(weights)
        return cls(model, info, run_dir, device)

    @staticmethod
    def refuse_data(data_dir: str | os.PathLike) -> None:
        """Set by ``graft.pipeline.predict.load_run``: refuses another task's labelled data."""

    def _set_thresholds(self, conf: float, iou: float | None) -> None:
        for d in [self.model.detector, *self.model.branches]:
            holder = d.roi_heads if hasattr(d, "roi_heads") else d
            holder.score_thresh = min(conf, float(self.info["detector"]["score_thresh"]))
            if iou is not None:
                holder.nms_thresh = iou

    @torch.inference_mode()
    def predict(self, inputs: list[str | os.PathLike], *, conf: float | None = None, iou: float | None = None, batch_size: int = 8) -> list[ImageDetections]:
        """Boxes at or above ``conf`` (default the run's ``detect.conf``) in each image's own pixels.
        A file that cannot be read gets an entry with ``error`` instead of stopping the rest."""
        conf = float(self.info["config"]["detect"]["conf"]) if conf is None else conf
        self._set_thresholds(conf, iou)
        size = self.model.size
        results: list[ImageDetections] = []
        batch: list[tuple[str, torch.Tensor, float, tuple[int, int]]] = []

        def flush() -> None:
            if not batch:
                return
            x = torch.stack([t for _, t, _, _ in batch]).to(self.device)
            for (path, _, scale, (w, h)), det in zip(batch, self.model(x)):
                keep = det["scores"] >= conf
                boxes = (det["boxes"][keep].float().cpu().numpy() / scale).clip(0, [w, h, w, h])
                found = [Box(self.classes[int(c)], float(s), *map(float, b)) for b, s, c in zip(boxes, det["scores"][keep].tolist(), det["labels"][keep].tolist())]
                results.append(ImageDetections(path, sorted(found, key=lambda b: -b.score)))
            batch.clear()

        for path in expand_inputs(inputs):
            try:
                image = load_image(path)
            except ImageError as err:
                flush()
                results.append(ImageDetections(str(path), error=str(err)))
                continue
            w, h = image.size
            sample = BoxSample(Path(path), str(path), w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
            tensor, target = BoxDataset([sample], size).item_from(image, 0)
            batch.append((str(path), tensor, float(target["scale"]), (w, h)))
            if len(batch) >= batch_size:
                flush()
        flush()
        return results

    def evaluate(self, data_dir: str | os.PathLike, *, batch_size: int = 8, strict: bool = False) -> dict[str, Any]:
        """COCO metrics on DIR's test split, else its val split, else all of it."""
        from graft.tasks.detect.runner import evaluate_detector

        self.refuse_data(data_dir)
        split, samples, splits = scan_evaluation(data_dir, strict=strict)
        unknown = [c for c in splits.classes if c not in self.classes]
        if unknown:
            raise DataError(f"{data_dir} has classes this model does not know: {', '.join(unknown)} (it knows {', '.join(self.classes)})")
        remap = np.array([self.classes.index(c) for c in splits.classes], np.int64)
        samples = [BoxSample(s.path, s.image_id, s.width, s.height, s.boxes, remap[s.labels] if len(s.labels) else s.labels, s.crowd, s.difficult) for s in samples]
        self._set_thresholds(float(self.info["detector"]["score_thresh"]), None)
        _, result = evaluate_detector(self.model, samples, self.classes, device=self.device, amp=False, workers=min(2, default_workers()), batch_size=batch_size, conf=float(self.info["config"]["detect"]["conf"]))
        return {**result.metrics, "split": split, "data": str(data_dir), "data_format": splits.format,
                "skipped_files": [{"path": str(s.path), "reason": s.reason} for s in splits.skipped], "annotation_problems": splits.problems, "warnings": splits.warnings}


