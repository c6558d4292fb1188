"""Object detection: boxes (COCO, YOLO or Pascal VOC) -> a detector (``TaskPackage`` in
``graft.tasks.interface``).

What only detectors have lives here: the three box formats, box-aware augmentation, FCOS /
RetinaNet / Faster R-CNN heads over a timm backbone (and torchvision's COCO detectors), the
feature cache of the frozen phase, ``auto`` by short trainings, COCO mAP, box plots, and expansion
by a branch or a widened layer, with distillation and pseudo-labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Detect:
    name = "detect"
    model_noun = "detector"
    data_kind = "box annotations"
    new_data = "boxes of the new classes (COCO, YOLO or Pascal VOC)"
    eval_data = "boxes (COCO, YOLO or Pascal VOC)"

    def claims(self, cfg: Any) -> bool:
        """Box annotations in ``data.dir``, or a torchvision detector as ``model.name``."""
        from graft.tasks.detect.data import is_detection_data
        from graft.tasks.detect.torchvision_models import is_torchvision_detector

        return bool(cfg.data.dir and is_detection_data(cfg.data.dir)) or is_torchvision_detector(cfg.model.name)

    def claims_data(self, data_dir: str | os.PathLike) -> bool:
        from graft.tasks.detect.data import is_detection_data

        return is_detection_data(data_dir)

    def interpret_flags(self, flags: dict[str, Any]) -> None:
        """``--model fcos`` names a detector head (over the default backbone), and means detection;
        ``--model fasterrcnn_resnet50_fpn`` names a torchvision detector."""
        from graft.errors import GraftError
        from graft.tasks.detect.model import HEADS
        from graft.tasks.detect.torchvision_models import is_torchvision_detector

        if flags.get("model.name") and is_torchvision_detector(flags["model.name"]):
            flags["task"] = flags.get("task") or "detect"
        if flags.get("model.name") in HEADS:
            if flags.get("task") == "classify":
                raise GraftError(f"--model {flags['model.name']} is a detector, but --task is classify")
            flags["detect.head"], flags["model.name"] = flags["model.name"], None
            flags["task"] = "detect"

    def train(self, cfg: Any, run_dir: Path, payload: dict[str, Any] | None, **kwargs: Any) -> Any:
        from graft.tasks.detect.runner import train_detection

        return train_detection(cfg, run_dir, payload, **kwargs)

    def describe_plan(self, cfg: Any, num_classes: int | None, *, decide: bool) -> dict[str, Any]:
        from graft.tasks.detect.plan import describe_detection_plan

        return describe_detection_plan(cfg, num_classes, decide=decide)

    def plan_header(self, plan: dict[str, Any]) -> list[str]:
        from graft.tasks.detect.plan import format_detection_header

        return format_detection_header(plan)

    def load_run(self, run_dir: Path, info: dict[str, Any], weights: dict[str, Any], device: Any) -> Any:
        from graft.tasks.detect.predict import TrainedDetector

        return TrainedDetector.load(run_dir, info, weights, device)

    def print_predictions(self, run: Any, args: Any) -> int:
        from graft.tasks.detect.printing import print_predictions

        return print_predictions(run, args)

    def load_source(self, run_dir: Path, trained: Any) -> Any:
        from graft.tasks.detect.expand import load_detection_source

        return load_detection_source(run_dir, trained.model, trained.info)

    def named_source(self, name: str) -> Any | None:
        """``coco:MODEL``: torchvision's COCO detector with its COCO classes."""
        if not name.startswith("coco:"):
            return None
        from graft.tasks.detect.expand import coco_source

        return coco_source(name)

    def expand_config(self, source: Any, data_dir: Any, **kwargs: Any) -> Any:
        from graft.tasks.detect.expand import detection_expand_config

        return detection_expand_config(source, data_dir, **kwargs)

    def expand(self, job: Any, **kwargs: Any) -> Any:
        from graft.tasks.detect.expand import expand_detector

        return expand_detector(job, **kwargs)

    def export_spec(self) -> Any:
        from graft.tasks.detect.export import DetectorExport

        return DetectorExport()

    def exported_model(self, path: Path, meta: dict[str, Any]) -> Any:
        from graft.tasks.detect.exported import ExportedDetector

        return ExportedDetector(path, meta)

    def report_spec(self) -> Any:
        from graft.tasks.detect.report import REPORT

        return REPORT

    def demo_config(self, data_dir: Path, epochs: int | None, fine_tune_epochs: int | None) -> Any:
        from graft.tasks.detect.demo import detection_demo_config

        return detection_demo_config(data_dir, epochs, fine_tune_epochs)

    def write_demo_data(self, data_dir: Path) -> None:
        from graft.tasks.detect.deepforest import write_tree_tiles

        write_tree_tiles(data_dir)


DETECT = Detect()
