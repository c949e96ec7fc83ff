"""Predictions from a finished run's best weights: each task rebuilds its own predictor (tasks/), and a
classification run that fitted a temperature (calibration.json) answers with calibrated scores, "uncertain"
below its train.abstain_below."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .calibration import CalibratedPredictor, read_calibration
from .errors import WorkbenchError
from .store import RunStore

if TYPE_CHECKING:
    from .tasks import Predictor

__all__ = ["load_predictor", "predict", "with_calibration"]


def load_predictor(run_id: str = "latest", home: str | Path | None = None, calibrated: bool = True) -> "Predictor":
    """Rebuild the run's model (base weights + the run's trained parameters): a classification run's
    predictor gives labels and scores, a regression run's values, a chat run's answers, a seq2seq run's
    translations (each `.predict(texts)`). `calibrated`: a classification run's predictor scaled by its fitted
    temperature (and abstaining below train.abstain_below); off: the model's raw probabilities."""
    store = RunStore(home)
    record = store.get(run_id)
    method = record["config"].get("method", {}).get("name", "")
    if method.startswith("zero-shot"):
        raise WorkbenchError(f"run {record['id']} is a {method} baseline: it trained no model to load; "
                             "pick a trained run")
    from .tasks import task_of  # torch loads here, not on `import workbench`

    predictor = task_of(record["config"]).load_predictor(record, store.home)
    return with_calibration(predictor, record) if calibrated else predictor


def with_calibration(predictor: Any, record: dict[str, Any]) -> Any:
    """`predictor` (of run `record`, or an optimised artifact of it) with the run's fitted temperature and its
    train.abstain_below, when it has either; else `predictor` itself."""
    calibration = read_calibration(record["dir"])
    abstain = ((record.get("config") or {}).get("train") or {}).get("abstain_below")
    if calibration is None and abstain is None:
        return predictor
    return CalibratedPredictor(predictor, calibration["temperature"] if calibration else 1.0, abstain)


def predict(run_id: str, texts: str | list[str], home: str | Path | None = None) -> list[dict[str, Any]]:
    return load_predictor(run_id, home).predict(texts)
