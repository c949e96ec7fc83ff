"""Predictions from a finished run's best weights: each task rebuilds its own predictor (tasks/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .errors import WorkbenchError
from .store import RunStore

if TYPE_CHECKING:
    from .tasks import Predictor

__all__ = ["load_predictor", "predict"]


def load_predictor(run_id: str = "latest", home: str | Path | None = None) -> "Predictor":
    """Rebuild the run's model (base weights + the run's trained parameters): a classification run's
    predictor gives labels and scores, a regression run's values, a chat run's answers, a seq2seq run's
    translations (each `.predict(texts)`)."""
    store = RunStore(home)
    record = store.get(run_id)
    method = record["config"].get("method", {}).get("name", "")
    if method.startswith("zero-shot"):
        raise WorkbenchError(f"run {record['id']} is a {method} baseline: it trained no model to load; "
                             "pick a trained run")
    from .tasks import task_of  # torch loads here, not on `import workbench`

    return task_of(record["config"]).load_predictor(record, store.home)


def predict(run_id: str, texts: str | list[str], home: str | Path | None = None) -> list[dict[str, Any]]:
    return load_predictor(run_id, home).predict(texts)
