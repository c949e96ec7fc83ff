"""What the server and the optimiser both read from a trained run: its task's row, tokenizer, merged model and
evaluation split (adapter.py serves it, artifacts.py makes faster artifacts of it)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import WorkbenchError
from ..run_paths import RunPaths
from ..task_table import DEFAULT_TASK, TaskSpec, task_spec


def task_row(predictor: Any) -> TaskSpec:
    """The task-table row of a predictor's task (its `.task`). A predictor that names none classifies texts:
    the optimised artifacts' predictors (artifacts.py) are plain sequence classifiers."""
    return task_spec(getattr(predictor, "task", None) or DEFAULT_TASK)


def tokenizer_of(predictor: Any) -> Any:
    tok = getattr(predictor, "tokenizer", None)
    if tok is None and getattr(predictor, "encoder", None) is not None:
        tok = getattr(predictor.encoder, "tokenizer", None)
    return tok


def merge_adapters(model: Any) -> Any:
    """`models.adapters.merge_adapters`, imported when called (this module loads no torch)."""
    from ..models.adapters import merge_adapters as merge

    return merge(model)


def eval_split(record: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    """The run's evaluation texts, true label indices and label names, split as training split them."""
    from ..config import Config
    from ..data import prepare

    config = Config.from_dict(record["config"])
    if not task_spec(config.task).classes:
        raise WorkbenchError(f"run {record['id']} is a {config.task} run: only runs that give each text a class "
                             "have an evaluation split of labelled texts")
    split = prepare(config.data, config.train.seed)
    saved = RunPaths.of(record).labels
    labels = json.loads(saved.read_text()) if saved.is_file() else split.labels
    if labels != split.labels:
        raise WorkbenchError(f"run {record['id']}: its data now gives labels {split.labels[:5]}, the run was "
                             f"trained on {labels[:5]}: the data source changed since training")
    return split.eval_texts, split.eval_labels, labels
