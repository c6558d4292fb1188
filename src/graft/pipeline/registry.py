"""The one place that knows every task: ``TASKS`` maps a task's name to its package.

A run's task is resolved once, here: from the config (``task: auto`` asks each task whether the
data or model is its own), from a finished run's ``model.json``, a snapshot, or an export's
sidecar. Everything above (the pipeline, the CLI, the API) asks the package it gets back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graft.errors import ConfigError
from graft.tasks.classify import CLASSIFY
from graft.tasks.detect import DETECT
from graft.tasks.interface import TaskPackage

if TYPE_CHECKING:
    from graft.configuration import GraftConfig

TASKS: dict[str, TaskPackage] = {task.name: task for task in (CLASSIFY, DETECT)}
DEFAULT_TASK = "classify"  # what ``auto`` becomes when no other task claims the data


def task_named(name: str) -> TaskPackage:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def resolve_task(cfg: GraftConfig) -> TaskPackage:
    """The config's task; ``auto`` becomes the first task that claims the data or the model (in
    ``cfg`` too, so the saved config says which), else the default."""
    if cfg.task == "auto":
        claimed = [task.name for task in TASKS.values() if task.name != DEFAULT_TASK and task.claims(cfg)]
        cfg.task = claimed[0] if claimed else DEFAULT_TASK
    return task_named(cfg.task)


def task_of(described: Mapping[str, Any]) -> TaskPackage:
    """The task of a finished run (its ``model.json``), a snapshot or an export sidecar; runs
    written before tasks were recorded are classifiers."""
    return task_named(described.get("task") or DEFAULT_TASK)


def refuse_other_data(task: TaskPackage, data_dir: str | os.PathLike | None, run: str | os.PathLike, give: str) -> None:
    """A clear error when ``data_dir`` holds another task's labels (boxes for a classifier, say)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return
    for other in TASKS.values():
        if other is not task and other.claims_data(data_dir):
            raise ConfigError(f"{data_dir} holds {other.data_kind}, but {run} is a {task.model_noun}: {give} ({other.data_kind} are for {other.model_noun} runs)")


def interpret_flags(flags: dict[str, Any]) -> None:
    """Command-line flags that imply a task (``--model fcos``), as each task reads them."""
    for task in TASKS.values():
        task.interpret_flags(flags)
