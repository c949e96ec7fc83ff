"""Ensembles of finished runs: several classification runs (and a classical baseline) as one model.

`create_ensemble` checks that the runs share their task, labels and eval split, averages their best
checkpoints' class probabilities on that split, measures the average beside every member, and registers the
result as a run of its own (`<run>/model/ensemble.json` names its members), with a temperature fitted on the
average (`<run>/calibration.json`, when the first run's train.calibrate is on). Everything that takes a run
(predict, evaluate, serve, the playground, compare) then takes the ensemble: `load_predictor` builds its
members and averages them. Members that overfit differently make different mistakes; averaging their
probabilities cancels part of them, which is why an ensemble is the usual answer to overfitting.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import WorkbenchError
from .store import RunStore
from .tasks import task_of
from .tasks.classification import ClassificationTask
from .tasks.ensemble import CLASSICAL_DIR, ENSEMBLE_FILE, EVAL_FILE, figures, write_calibration, write_json
from .run_paths import RunPaths

__all__ = ["create_ensemble"]


def _member(store: RunStore, run: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    record = store.get(run)
    if record["status"] != "completed":
        raise WorkbenchError(f"run {record['id']} is {record['status']}: an ensemble takes completed runs")
    if task_of(record["config"]).name != ClassificationTask.name:
        raise WorkbenchError(f"run {record['id']} is a {record['config']['task']} run: ensembles average class "
                             "probabilities of text-classification runs")
    preds = (record.get("metrics") or {}).get("predictions_file")
    if not preds or not Path(preds).is_file():
        raise WorkbenchError(f"run {record['id']} has no predictions file: train it again to ensemble it")
    rows = json.loads(Path(preds).read_text())["rows"]
    if not rows or "scores" not in rows[0]:
        raise WorkbenchError(f"run {record['id']} was trained before predictions carried class scores: train it "
                             "again to ensemble it")
    return record, rows


def _check_same_split(records: list[dict[str, Any]], rows: list[list[dict[str, Any]]]) -> list[str]:
    labels = (records[0].get("metrics") or {}).get("labels") or []
    for record, these in zip(records[1:], rows[1:]):
        if ((record.get("metrics") or {}).get("labels") or []) != labels:
            raise WorkbenchError(f"runs {records[0]['id']} and {record['id']} have different labels: an ensemble "
                                 "averages runs trained on the same labels")
        if [r["text"] for r in these] != [r["text"] for r in rows[0]]:
            raise WorkbenchError(f"runs {records[0]['id']} and {record['id']} were evaluated on different rows "
                                 "(another data source, eval_fraction or seed): an ensemble is measured on one "
                                 "shared eval split")
    return labels


def create_ensemble(runs: list[str], home: str | Path | None = None, with_baseline: bool = True,
                    name: str | None = None) -> dict[str, Any]:
    """Register the average of `runs` (and the first run's classical baseline) as a run; returns its record."""
    store = RunStore(home)
    if len(runs) + int(with_baseline) < 2:
        raise WorkbenchError("an ensemble needs two members: give two runs or more, or one run with its baseline")
    pairs = [_member(store, run) for run in runs]
    records, rows = [p[0] for p in pairs], [p[1] for p in pairs]
    if len({r["id"] for r in records}) < len(records):
        raise WorkbenchError("the same run is named twice: give each member once")
    labels = _check_same_split(records, rows)
    index = {n: i for i, n in enumerate(labels)}
    y = np.asarray([index[r["true"]] for r in rows[0]])
    probs = [np.asarray([r["scores"] for r in these]) for these in rows]
    members = {rec["id"]: figures(y, p) for rec, p in zip(records, probs)}
    baseline_dir = Path(records[0]["dir"]) / CLASSICAL_DIR
    if with_baseline:
        if not (baseline_dir / EVAL_FILE).is_file():
            raise WorkbenchError(f"run {records[0]['id']} has no classical baseline: leave it out (--no-baseline)")
        classical = np.asarray(json.loads((baseline_dir / EVAL_FILE).read_text())["probabilities"])
        probs.append(classical)
        members["classical"] = figures(y, classical)
    mean = figures(y, np.mean(probs, axis=0))
    best_member = max(members, key=lambda m: members[m]["accuracy"])
    metrics = {**mean, "labels": labels, "ensemble_of": [r["id"] for r in records],
               "with_baseline": with_baseline, "members": members, "best_member": best_member,
               "beats_members": all(mean["accuracy"] >= f["accuracy"] and mean["f1_macro"] >= f["f1_macro"]
                                    for f in members.values()),
               "answers_with": {"by": "ensemble", **mean, "metric": "accuracy",
                                "why": f"the mean of {len(probs)} members' class probabilities"}}
    return _register(store, records, metrics, baseline_dir if with_baseline else None, name,
                     (np.mean(probs, axis=0), y))


def _register(store: RunStore, records: list[dict[str, Any]], metrics: dict[str, Any], baseline_dir: Path | None,
              name: str | None, answering: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Register the ensemble as a completed run; `answering`: its eval probabilities and true classes, which
    its temperature is fitted on (when the first run's train.calibrate is on)."""
    settings = Config.from_dict(records[0]["config"])
    config = settings.to_dict()
    label = name or "ensemble of " + ", ".join(r.get("name") or r["id"] for r in records)
    config["name"] = label
    run_id = store.create_run(config, label)
    store.mark_running(run_id, os.getpid())
    run_dir = store.run_dir(run_id)
    if baseline_dir is not None:
        shutil.copytree(baseline_dir, run_dir / CLASSICAL_DIR)
        metrics["baseline"] = {k: v for k, v in json.loads((baseline_dir / "summary.json").read_text()).items()
                               if k not in ("metric", "ensemble")}
    write_json(RunPaths(run_dir).model / ENSEMBLE_FILE, {"runs": metrics["ensemble_of"], "baseline": baseline_dir is not None,
                                                   "weights": [1.0] * (len(records) + int(baseline_dir is not None))})
    calibration = write_calibration(run_dir, *answering, settings.train.calibrate, "ensemble")
    if calibration is not None:
        metrics["calibration"] = calibration
    info = {"ensemble_of": metrics["ensemble_of"], "labels": metrics["labels"],
            "train_rows": (records[0].get("info") or {}).get("train_rows"),
            "eval_rows": (records[0].get("info") or {}).get("eval_rows"), "trainable_params": 0,
            "total_params": sum((r.get("info") or {}).get("total_params") or 0 for r in records)}
    store.set_info(run_id, info)
    store.finish(run_id, "completed", metrics=metrics, timings={"wall_seconds": 0.0, "created_at": time.time()})
    return store.get(run_id)
