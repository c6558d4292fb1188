"""A finished run as a usable model: load it, predict on new images, evaluate on a labelled folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from graft.configuration import parse_config
from graft.data.dataset import ImageDataset, default_workers, eval_loader
from graft.data.folder import scan_class_folders
from graft.data.samples import Sample
from graft.data.transforms import Preprocessing, eval_transform
from graft.tasks.classify.evaluate import collect_outputs, metrics_from_outputs
from graft.models.backbones import build_model
from graft.models.classifier import GraftClassifier
from graft.prediction import Prediction, classify_files, expand_inputs


class TrainedModel:
    """A trained graft model with its classes and preprocessing (from ``model.json``)."""

    def __init__(self, model: GraftClassifier, info: dict[str, Any], run_dir: Path | None = None, device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.info = info
        self.run_dir = run_dir
        self.classes: list[str] = list(info["classes"])
        self.preprocessing = Preprocessing.from_dict(info["preprocessing"])
        self.transform = eval_transform(self.preprocessing)
        self.device = torch.device(device)
        self.model.to(self.device)

    @classmethod
    def load(cls, run_dir: Path, info: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> TrainedModel:
        cfg = parse_config(info["config"], str(run_dir / "model.json"))
        model, _ = build_model(cfg.model, int(info["num_classes"]), load_weights=False, head_blocks=info.get("head", {}).get("blocks"))
        model.load_state_dict(weights)
        return cls(model, info, run_dir, device)

    @staticmethod
    def refuse_data(data_dir: str | os.PathLike) -> None:
        """Set by ``graft.pipeline.predict.load_run``: refuses another task's labelled data."""

    # ------------------------------------------------------------------ prediction

    @torch.inference_mode()
    def predict(self, inputs: list[str | os.PathLike], *, top_k: int = 1, batch_size: int = 32) -> list[Prediction]:
        """One ``Prediction`` per image file (folders are searched recursively, in sorted order).
        A file that cannot be read gets a Prediction with ``error`` set instead of stopping the rest."""
        top_k = max(1, min(top_k, len(self.classes)))

        def classify(inputs: list[torch.Tensor]) -> list[list[tuple[str, float]]]:
            probs = self.model(torch.stack(inputs).to(self.device)).float().softmax(1).cpu()
            values, indices = probs.topk(top_k, dim=1)
            return [[(self.classes[i], v) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]

        return classify_files(inputs, self.transform, classify, batch_size)

    def evaluate(self, data_dir: str | os.PathLike, *, batch_size: int = 64, strict: bool = False) -> dict[str, Any]:
        """Metrics on a folder of class folders whose names are among this model's classes."""
        self.refuse_data(data_dir)
        _, samples, skipped, warnings = scan_class_folders(data_dir, classes=self.classes, strict=strict)
        ds = ImageDataset(samples, self.transform)
        out = collect_outputs(self.model, eval_loader(ds, batch_size=batch_size, workers=min(2, default_workers())), self.device)
        metrics = metrics_from_outputs(out, self.classes)
        metrics["skipped_files"] = [{"path": str(s.path), "reason": s.reason} for s in skipped]
        metrics["warnings"] = warnings
        metrics["data"] = str(data_dir)
        return metrics


__all__ = ["Prediction", "Sample", "TrainedModel", "expand_inputs"]


