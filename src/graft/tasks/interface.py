"""What a task package gives the pipeline: the one interface every task implements.

A task (``classify``, ``detect``) is a package under ``graft/tasks/`` whose ``__init__`` defines
one object with the attributes and methods below; ``graft.pipeline.registry.TASKS`` lists them.
The pipeline (train, expand, resume, plan, eval, predict, export, report, demo) is written once
and asks the task for everything that differs; the task builds on the engine (the loop and its
``Task`` seam, phases, solver, snapshots, run folder) and the shared leaves, never on another task.

Heavy imports stay inside the methods, so that resolving a task costs nothing (loading an ONNX
export needs neither torch nor the task's training code).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from graft.configuration import GraftConfig
    from graft.engine.run_folder import ExpandResult, TrainResult
    from graft.exporting.exported import ExportedModel
    from graft.report.html import ReportSpec
    from graft.exporting.writer import ExportSpec


@dataclass
class ExpansionJob:
    """An expansion the pipeline has checked (source, output folder, snapshot), handed to its task."""

    cfg: GraftConfig
    source: Any  # the task's source (``load_source``): ``dir``, ``name``, ``info``, ``model``, ``digest``
    run_dir: Path
    replace: bool  # run_dir holds another run that --overwrite replaces (stashed once validated)
    payload: dict[str, Any] | None  # the snapshot a resumed expansion continues
    started: float  # time.perf_counter() when the command started


class TaskPackage(Protocol):
    name: str  # the config's ``task``, model.json's ``task`` and the export sidecar's ``task``
    model_noun: str  # what a run of the task is called in messages: "classifier", "detector"
    data_kind: str  # what its labelled data is, for messages: "box annotations"
    eval_data: str  # what ``graft eval`` takes, for messages
    new_data: str  # what ``graft expand --data`` takes, for messages

    # ------------------------------------------------------------------ which task

    def claims(self, cfg: GraftConfig) -> bool:
        """Is a ``task: auto`` config this task's (by its data or model name)? The default task
        (``registry.DEFAULT_TASK``) takes whatever no other task claims."""

    def claims_data(self, data_dir: str | os.PathLike) -> bool:
        """Does the folder hold this task's kind of labels? Used to refuse data of another task
        with a message that says which kind the run needs."""

    def interpret_flags(self, flags: dict[str, Any]) -> None:
        """Command-line flags that imply this task (``--model fcos`` means detection): set
        ``flags['task']`` and rewrite them in place; raise ``GraftError`` on a contradiction."""

    # ------------------------------------------------------------------ train, resume, plan

    def train(self, cfg: GraftConfig, run_dir: Path, payload: dict[str, Any] | None, *, replace: bool, device: torch.device,
              source_run: Path | None, data_dir: str | os.PathLike | None, started: float, quiet: bool, hooks: list[Any]) -> TrainResult:
        """Train a run into ``run_dir`` (``payload``: the snapshot a resumed run continues). The
        pipeline has resolved the task, the device and whether ``run_dir`` holds a run to replace
        (the task stashes it only once the config and data are validated)."""

    def describe_plan(self, cfg: GraftConfig, num_classes: int | None, *, decide: bool) -> dict[str, Any]:
        """``graft plan``: the phases with their trainable layers and groups (JSON-able)."""

    def plan_header(self, plan: dict[str, Any]) -> list[str]:
        """The lines above the phases in ``graft plan``'s text output."""

    # ------------------------------------------------------------------ a finished run

    def load_run(self, run_dir: Path, info: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> Any:
        """The finished run as a model with ``classes``, ``info``, ``predict`` and ``evaluate``."""

    def print_predictions(self, run: Any, args: argparse.Namespace) -> int:
        """``graft predict``: predict ``args.inputs`` with ``run`` (a finished run or an export)
        and print them in ``args.format``; the exit status."""

    # ------------------------------------------------------------------ expansion

    def load_source(self, run_dir: Path, trained: Any) -> Any:
        """The finished run ``trained`` (from ``load_run``) as the source of an expansion."""

    def named_source(self, name: str) -> Any | None:
        """A source given by name instead of a run folder (``coco:MODEL``), or None."""

    def expand_config(self, source: Any, data_dir: str | os.PathLike | None, *, config_file: str | os.PathLike | None,
                      overrides: list[str] | tuple[str, ...], flags: dict[str, Any] | None) -> GraftConfig:
        """The expansion's config: the source run's, with expansion defaults and the user's changes."""

    def expand(self, job: ExpansionJob, *, data_dir: str | os.PathLike | None, quiet: bool, hooks: list[Any]) -> ExpandResult:
        """Add the classes in ``job.cfg.data.dir`` to ``job.source`` (or continue the snapshot
        ``job.payload``, its data now under ``data_dir`` if given)."""

    # ------------------------------------------------------------------ export, report, demo

    def export_spec(self) -> ExportSpec:
        """How a run of this task is traced, described in the sidecar, and checked for parity."""

    def exported_model(self, path: Path, meta: dict[str, Any]) -> ExportedModel:
        """An exported model of this task with its sidecar (onnxruntime only for ONNX)."""

    def report_spec(self) -> ReportSpec:
        """What the run's ``report.html`` shows where tasks differ (headline figures, columns, plots)."""

    def demo_config(self, data_dir: Path, epochs: int | None, fine_tune_epochs: int | None) -> GraftConfig:
        """``graft demo --task NAME``: the config that trains on the demo's data in ``data_dir``."""

    def write_demo_data(self, data_dir: Path) -> None:
        """Write the demo's data (real images shipped by an installed package, nothing downloaded)."""
