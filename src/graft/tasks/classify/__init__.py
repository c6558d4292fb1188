"""Image classification: a folder of class folders -> a classifier (``TaskPackage`` in
``graft.tasks.interface``).

What only classifiers have lives here: class-folder data, the head over a timm backbone, the
embedding cache and its frozen-phase training, ``auto`` by range tests on embeddings, class
statistics, calibration, accuracy metrics and confusion plots, and expansion by widening the head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Classify:
    name = "classify"
    model_noun = "classifier"
    data_kind = "class folders"
    new_data = "a folder with a subfolder of images per new class"
    eval_data = "a folder with a subfolder of images per class"

    def claims(self, cfg: Any) -> bool:
        return False  # the default task: class folders are whatever no other task claims

    def claims_data(self, data_dir: str | os.PathLike) -> bool:
        return False

    def interpret_flags(self, flags: dict[str, Any]) -> None:
        pass

    def train(self, cfg: Any, run_dir: Path, payload: dict[str, Any] | None, **kwargs: Any) -> Any:
        from graft.tasks.classify.train import train_classifier

        return train_classifier(cfg, run_dir, payload, **kwargs)

    def describe_plan(self, cfg: Any, num_classes: int | None, *, decide: bool) -> dict[str, Any]:
        from graft.tasks.classify.plan import describe_plan

        return describe_plan(cfg, num_classes, decide=decide)

    def plan_header(self, plan: dict[str, Any]) -> list[str]:
        from graft.tasks.classify.plan import plan_header

        return plan_header(plan)

    def load_run(self, run_dir: Path, info: dict[str, Any], weights: dict[str, Any], device: Any) -> Any:
        from graft.tasks.classify.predict import TrainedModel

        return TrainedModel.load(run_dir, info, weights, device)

    def print_predictions(self, run: Any, args: Any) -> int:
        from graft.tasks.classify.printing import print_predictions

        return print_predictions(run, args)

    def load_source(self, run_dir: Path, trained: Any) -> Any:
        from graft.tasks.classify.expansion.source import source_from_run

        return source_from_run(run_dir, trained)

    def named_source(self, name: str) -> Any | None:
        return None

    def expand_config(self, source: Any, data_dir: Any, **kwargs: Any) -> Any:
        from graft.tasks.classify.expansion.source import expand_config

        return expand_config(source, data_dir, **kwargs)

    def expand(self, job: Any, **kwargs: Any) -> Any:
        from graft.tasks.classify.expansion.run import expand_classifier

        return expand_classifier(job, **kwargs)

    def export_spec(self) -> Any:
        from graft.tasks.classify.export import ClassifierExport

        return ClassifierExport()

    def exported_model(self, path: Path, meta: dict[str, Any]) -> Any:
        from graft.tasks.classify.exported import ExportedClassifier

        return ExportedClassifier(path, meta)

    def report_spec(self) -> Any:
        from graft.tasks.classify.report import REPORT

        return REPORT

    def demo_config(self, data_dir: Path, epochs: int | None, fine_tune_epochs: int | None) -> Any:
        from graft.tasks.classify.demo import demo_config

        return demo_config(data_dir, epochs, fine_tune_epochs)

    def write_demo_data(self, data_dir: Path) -> None:
        from graft.tasks.classify.demo import make_texture_dataset

        make_texture_dataset(data_dir)


CLASSIFY = Classify()
