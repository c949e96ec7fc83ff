"""The task layer: one file per task, each implementing the `base.Task` protocol, and the one registry that
maps a config (or a stored run) to its task. Nothing else in the core switches on the task's name."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import WorkbenchError
from .base import Evaluation, Predictor, Task
from .chat import ChatTask
from .classification import ClassificationTask
from .regression import RegressionTask
from .seq2seq import Seq2SeqTask

TASKS: dict[str, type] = {
    "text-classification": ClassificationTask,
    "text-regression": RegressionTask,
    "chat": ChatTask,
    "seq2seq": Seq2SeqTask,
}

__all__ = ["TASKS", "Evaluation", "Predictor", "Task", "get_task", "task_of"]


def get_task(name: str) -> Task:
    """The task registered under `name`."""
    if name not in TASKS:
        raise WorkbenchError(f"task {name!r} is unknown: choose from {', '.join(TASKS)}")
    return TASKS[name]()


def task_of(config: Config | dict[str, Any]) -> Task:
    """The task of a config, or of a stored run's config dict."""
    name = config.task if isinstance(config, Config) else config.get("task", "text-classification")
    return get_task(name)
