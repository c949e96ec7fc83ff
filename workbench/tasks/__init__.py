"""The task layer: one file per task, each implementing the `base.Task` protocol, found through the task
table (`workbench.task_table`: each row names its module and class). Nothing else in the core switches on a
task's name."""

from __future__ import annotations

import importlib
from typing import Any

from ..config import Config
from ..task_table import DEFAULT_TASK, TASKS, task_spec
from .base import Evaluation, Predictor, Task

__all__ = ["TASKS", "Evaluation", "Predictor", "Task", "get_task", "task_of", "task_class"]


def task_class(name: str) -> type:
    """The class that implements the task `name` (its table row's `runner`, imported on first use)."""
    module, _, cls = task_spec(name).runner.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_task(name: str) -> Task:
    """The task registered under `name`."""
    return task_class(name)()


def task_of(config: Config | dict[str, Any]) -> Task:
    """The task of a config, or of a stored run's config dict."""
    name = config.task if isinstance(config, Config) else config.get("task", DEFAULT_TASK)
    return get_task(name)
