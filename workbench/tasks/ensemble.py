"""The classical baseline beside a classification run, and ensembles that average class probabilities.

A run fits the baseline on its training split (classical.py) and scores it on its eval split; at the end,
the best checkpoint's eval probabilities and the baseline's are averaged, and when that average scores
higher on the run's selection metric the run answers with it (`<run>/model/ensemble.json`), said in the
record. The probabilities the run answers with (the model's, or that mean) then get a temperature fitted on the
eval split (calibration.py; `<run>/calibration.json`, train.calibrate). `EnsemblePredictor` is the averaged
answer, and also any set of runs with the same task and labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import calibrate
from ..classical import DESCRIPTION, ClassicalModel, fit_classifiers
from ..config import Config, read_yaml
from ..errors import WorkbenchError
from ..task_table import spec_for
from ..run_paths import ENSEMBLE_FILE, RunPaths  # noqa: F401 - ENSEMBLE_FILE: imported from here too

CLASSIFICATION = spec_for("classification:ClassificationTask").name  # what its predictors answer
CLASSICAL_DIR = "classical"  # <run>/classical: the baseline's files, its eval probabilities and figures
SUMMARY_FILE, EVAL_FILE = "summary.json", "eval_probabilities.json"
MIN_GAIN = 0.0  # the ensemble must score strictly higher than the fine-tuned model alone
# the fine-tuned model's share of the mean, tried on the eval split (1.0: the model alone); the baseline alone is
# never the answer: a run answers with its model, helped by the baseline where that scores higher
MODEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25)


def figures(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of the argmax predictions (over every class of the run)."""
    from sklearn.metrics import accuracy_score, f1_score

    y_pred = probs.argmax(axis=1)
    classes = list(range(probs.shape[1]))
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0))}


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def fit_baseline(config: Config, train_texts: list[str], train_labels: list[int], eval_texts: list[str],
                 eval_labels: list[int], labels: list[str], run_dir: Path) -> dict[str, Any] | None:
    """Fit the classical baseline (plain and class-balanced, the better on the run's metric kept), score it on
    the eval split, save it in <run>/classical; returns its figures for the record (None when switched off)."""
    if not config.train.baseline:
        return None
    metric = config.train.best_metric if config.train.best_metric in ("accuracy", "f1_macro") else "accuracy"
    start = time.perf_counter()
    y = np.asarray(eval_labels)
    scored = []
    for model in fit_classifiers(train_texts, train_labels, labels, mask_personal=config.data.mask_personal):
        probs = model.probabilities(eval_texts)
        scored.append((figures(y, probs), model, probs))
    best_figures, best, probs = max(scored, key=lambda item: item[0][metric])  # ties: the plain model
    folder = run_dir / CLASSICAL_DIR
    best.save(folder)
    summary = {"method": DESCRIPTION, "class_weight": best.class_weight, **best_figures,
               "seconds": round(time.perf_counter() - start, 2), "metric": metric, "ensemble": config.train.ensemble,
               "variants": {m.class_weight: f for f, m, _ in scored}}
    write_json(folder / EVAL_FILE, {"labels": labels, "probabilities": np.round(probs, 6).tolist()})
    write_json(folder / SUMMARY_FILE, summary)
    return summary


def baseline_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CLASSICAL_DIR / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def choose_answer(run_dir: Path, rows: list[dict[str, Any]], labels: list[str],
                  calibrate: bool | None = None) -> dict[str, Any]:
    """Compare the fine-tuned model (its best checkpoint's eval `rows`, with per-class `scores`) with its mean
    with the baseline on the eval split; write model/ensemble.json when the mean wins. Then fit a temperature
    on the answering probabilities (`calibrate`; None: the run's train.calibrate) and write calibration.json.
    Returns metrics: baseline, ensemble, answers_with, calibration."""
    out, answering = _compare_with_baseline(run_dir, rows, labels)
    if answering is None and rows and "scores" in rows[0]:
        answering = np.asarray([r["scores"] for r in rows], dtype=np.float64)
    if answering is not None:
        index = {name: i for i, name in enumerate(labels)}
        record = write_calibration(run_dir, answering, np.asarray([index[r["true"]] for r in rows]),
                                   _calibrates(run_dir) if calibrate is None else calibrate,
                                   (out.get("answers_with") or {}).get("by", "fine-tuned"))
        if record is not None:
            out["calibration"] = record
    return out


def _compare_with_baseline(run_dir: Path, rows: list[dict[str, Any]], labels: list[str]
                           ) -> tuple[dict[str, Any], np.ndarray | None]:
    """choose_answer's comparison: its metrics, and the probabilities the run answers with (None: no baseline
    to compare with)."""
    summary = baseline_summary(run_dir)
    if summary is None:
        return {}, None
    out: dict[str, Any] = {"baseline": {k: v for k, v in summary.items() if k not in ("metric", "ensemble")}}
    eval_file = run_dir / CLASSICAL_DIR / EVAL_FILE
    if not rows or "scores" not in rows[0] or not eval_file.is_file():
        return out, None
    index = {name: i for i, name in enumerate(labels)}
    y = np.asarray([index[r["true"]] for r in rows])
    model_probs = np.asarray([r["scores"] for r in rows], dtype=np.float64)
    classical = np.asarray(json.loads(eval_file.read_text())["probabilities"], dtype=np.float64)
    if classical.shape != model_probs.shape:
        return out, None
    metric = summary["metric"]
    alone = figures(y, model_probs)
    tried = {w: figures(y, w * model_probs + (1 - w) * classical) for w in MODEL_WEIGHTS[1:]}
    weight = max(tried, key=lambda w: (tried[w][metric], w))  # ties: the larger share of the model
    mean = tried[weight]
    chosen = summary["ensemble"] == "auto" and mean[metric] > alone[metric] + MIN_GAIN
    weights = [weight, round(1 - weight, 4)]
    out["ensemble"] = {**mean, "members": ["fine-tuned", "classical"], "weights": weights, "chosen": chosen,
                       "tried": {str(w): f for w, f in tried.items()}}
    if chosen:
        write_json(RunPaths(run_dir).model / ENSEMBLE_FILE,
                   {"members": ["fine-tuned", "classical"], "weights": weights, "metric": metric,
                    "eval": {"fine-tuned": alone, "ensemble": mean}})
    out["answers_with"] = {
        "by": "ensemble" if chosen else "fine-tuned", **(mean if chosen else alone), "metric": metric,
        "why": (f"{weights[0]:g} x the fine-tuned model's probabilities + {weights[1]:g} x the baseline's scored "
                f"{metric} {mean[metric]:.4f} on the eval split, the model alone {alone[metric]:.4f}" if chosen else
                f"the model alone scored {metric} {alone[metric]:.4f} on the eval split, its best mean with the "
                f"baseline {mean[metric]:.4f}" + ("" if summary["ensemble"] == "auto" else
                                                   " (train.ensemble: off)"))}
    return out, (weight * model_probs + (1 - weight) * classical) if chosen else model_probs


def _calibrates(run_dir: Path) -> bool:
    """The run's train.calibrate, from its config.yaml (the default, on, when the file is not there)."""
    path = RunPaths(run_dir).config
    if not path.is_file():
        return True
    train = read_yaml(path).get("train") or {}
    return bool(train.get("calibrate", True))


def write_calibration(run_dir: Path, probs: np.ndarray, y_true: np.ndarray, on: bool,
                      of: str = "fine-tuned") -> dict[str, Any] | None:
    """Fit the temperature of the run's answering probabilities `of` (the fine-tuned model or the ensemble) on
    its eval split and write calibration.json; when `on` is off, remove any and return None."""
    path = RunPaths(run_dir).calibration
    if not on:
        path.unlink(missing_ok=True)  # a resumed run that switched calibration off answers unscaled
        return None
    record = {**calibrate(probs, y_true), "of": of}
    write_json(path, record)
    return record


def baseline_note(metrics: dict[str, Any]) -> str | None:
    """A plain sentence when the run's answer is not better than the classical baseline, else None."""
    base, answer = metrics.get("baseline"), metrics.get("answers_with")
    if not base or "accuracy" not in metrics:
        return None
    figures_now = answer or {"accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"]}
    behind = [k for k in ("accuracy", "f1_macro") if figures_now[k] < base[k]]
    if not behind:
        return None
    return ("the classical baseline (TF-IDF + logistic regression, fitted in seconds) scores higher on "
            f"{' and '.join(behind)} than this run's model: try more epochs or data, method full, "
            "train.max_length for long texts, or answer with the baseline's ensemble (train.ensemble: auto)")


class ClassicalPredictor:
    """The baseline as a predictor: `predict(texts)` gives label and per-label probabilities."""

    task = CLASSIFICATION

    def __init__(self, model: ClassicalModel, run_id: str = "") -> None:
        self.model, self.labels, self.run_id = model, model.labels, run_id

    def probabilities(self, texts: list[str]) -> np.ndarray:
        return self.model.probabilities(texts)

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        texts = [texts] if isinstance(texts, str) else texts
        return _answers(texts, self.labels, self.probabilities(texts))


class EnsemblePredictor:
    """Members with the same labels, their class probabilities averaged with `weights`."""

    task = CLASSIFICATION

    def __init__(self, members: list[Any], weights: list[float], run_id: str = "", names: list[str] | None = None):
        labels = members[0].labels
        for member in members[1:]:
            if list(member.labels) != list(labels):
                raise WorkbenchError(f"ensemble members answer with different labels ({labels} vs "
                                     f"{member.labels}): pick runs trained on the same labels")
        self.members, self.labels, self.run_id = members, list(labels), run_id
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.names = names or [getattr(m, "run_id", "") or type(m).__name__ for m in members]
        self.max_length = max((getattr(m, "max_length", 0) or 0) for m in members)

    # the first member's network, for what works on one (serve merges its adapters, optimize quantises it)
    @property
    def model(self) -> Any:
        return self.members[0].model

    @model.setter
    def model(self, value: Any) -> None:
        self.members[0].model = value

    @property
    def tokenizer(self) -> Any:
        return self.members[0].tokenizer

    @property
    def encode(self) -> Any:
        return getattr(self.members[0], "encode", None)

    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        total = np.zeros((len(texts), len(self.labels)))
        for member, weight in zip(self.members, self.weights):
            total += weight * member_probabilities(member, texts, batch_size)
        return total

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        texts = [texts] if isinstance(texts, str) else texts
        return _answers(texts, self.labels, self.probabilities(texts, batch_size))


def member_probabilities(member: Any, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """(texts, classes) probabilities of any classification predictor, in its labels' order."""
    if hasattr(member, "probabilities"):
        return np.asarray(member.probabilities(texts), dtype=np.float64)
    answers = member.predict(texts, batch_size=batch_size)
    return np.asarray([[a["scores"][name] for name in member.labels] for a in answers], dtype=np.float64)


def _answers(texts: list[str], labels: list[str], probs: np.ndarray) -> list[dict[str, Any]]:
    return [{"text": text, "label": labels[int(p.argmax())],
             "scores": {name: float(s) for name, s in zip(labels, p)}} for text, p in zip(texts, probs)]


def load_classical(run_dir: Path, run_id: str = "") -> ClassicalPredictor:
    return ClassicalPredictor(ClassicalModel.load(run_dir / CLASSICAL_DIR), run_id)
