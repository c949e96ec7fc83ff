"""Score a finished run on a separate labelled file: the held-out judgement a user trusts.

The file is read as training reads data (encodings, formats, column detection); the run answers with its
model (an ensemble when the run chose one), and the run's classical baseline answers the same rows, so
the two are compared on data neither was tuned on: metrics, per-class report and confusion matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import WorkbenchError
from .store import RunStore

__all__ = ["evaluate_file"]


def evaluate_file(run: str, source: str | Path, home: str | Path | None = None, text_column: str | None = None,
                  label_column: str | None = None) -> dict[str, Any]:
    """Figures of run `run` on the labelled file `source`, beside its classical baseline's."""
    from .predict import load_predictor

    store = RunStore(home)
    record = store.get(run)
    if record["status"] not in ("completed", "stopped"):
        raise WorkbenchError(f"run {record['id']} is {record['status']}: evaluate a completed run")
    config = Config.from_dict(record["config"])
    info = record.get("info") or {}
    text_column = text_column or config.data.text_column or info.get("text_column")
    label_column = label_column or config.data.label_column or info.get("label_column")
    if config.task_spec.kind == "tokens":  # tagged sentences, scored as entities
        return _entities(record, store, str(source), text_column, label_column, load_predictor)
    from .tasks.classification import ClassificationTask
    from .tasks.regression import RegressionTask

    if config.task == ClassificationTask.name:
        return _classification(record, store, str(source), text_column, label_column, load_predictor)
    if config.task == RegressionTask.name:
        return _regression(record, store, str(source), text_column, label_column, load_predictor)
    raise WorkbenchError(f"run {record['id']} is a {config.task} run: evaluate scores classification, regression "
                         "and entity runs (a chat or seq2seq run's held-out loss is in its record)")


def _entities(record: dict[str, Any], store: RunStore, source: str, tokens_column: str | None,
              tags_column: str | None, load_predictor: Any) -> dict[str, Any]:
    """Entity-level figures of a token-classification run on a CoNLL, JSONL or Parquet file of sentences
    (tags in the run's scheme, converted when the file uses the other one)."""
    from .entities import convert, entity_figures
    from .tasks.token_classification import read_ner_source

    read = read_ner_source(source, tokens_column, tags_column)
    predictor = load_predictor(record["id"], store.home)
    gold = [s.tags if read.scheme == predictor.scheme else convert(s.tags, predictor.scheme) for s in read.sentences]
    predicted = [tags for tags, _ in predictor.tag_words([s.tokens for s in read.sentences])]
    metrics, payload = entity_figures(gold, predicted, predictor.types)
    unknown = [t for t in payload["labels"] if t not in predictor.types]
    notes = read.notes + ([f"entity types {', '.join(unknown)} are not among the run's types: the run never "
                           "predicts them"] if unknown else [])
    return {"run": record["id"], "file": source, "rows": len(read.sentences), "text_column": tokens_column or "tokens",
            "label_column": tags_column or "tags", "encoding": "sentences", "scheme": read.scheme,
            "notes": notes, **metrics, **payload}


def _columns_or_detected(source: str, text_column: str | None, label_column: str | None) -> Any:
    from .data import load_labelled

    try:
        return load_labelled(source, text_column, label_column)
    except WorkbenchError as exc:
        if "not found" not in str(exc) or (text_column is None and label_column is None):
            raise
        return load_labelled(source)  # the test file names its columns differently: detect them


def _classification(record: dict[str, Any], store: RunStore, source: str, text_column: str | None,
                    label_column: str | None, load_predictor: Any) -> dict[str, Any]:
    from .tasks.ensemble import EnsemblePredictor, load_classical, member_probabilities

    texts, names, report = _columns_or_detected(source, text_column, label_column)
    predictor = load_predictor(record["id"], store.home)
    labels = list(predictor.labels)
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise WorkbenchError(f"labels {unknown[:5]} in {source!r} are not among the run's labels ({', '.join(labels)}): "
                             "drop those rows, or evaluate a run trained on them")
    y = np.asarray([labels.index(n) for n in names])
    answer = _figures(labels, y, member_probabilities(predictor, texts))
    out: dict[str, Any] = {"run": record["id"], "file": source, "rows": len(texts), "text_column": report.text_column,
                           "label_column": report.label_column, "encoding": report.encoding,
                           "blank_dropped": report.blank_dropped, "labels": labels,
                           "answers_with": "ensemble" if isinstance(predictor, EnsemblePredictor) else "fine-tuned",
                           **answer}
    if isinstance(predictor, EnsemblePredictor):
        out["fine_tuned"] = _short(_figures(labels, y, member_probabilities(predictor.members[0], texts)))
    try:
        classical = load_classical(Path(record["dir"]))
    except WorkbenchError:
        out["baseline"] = None
    else:
        out["baseline"] = {"method": classical.model.description, "class_weight": classical.model.class_weight,
                           **_short(_figures(labels, y, classical.probabilities(texts)))}
    return out


def _figures(labels: list[str], y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    pred = probs.argmax(axis=1)
    classes = list(range(len(labels)))
    report = classification_report(y, pred, labels=classes, target_names=labels, output_dict=True, zero_division=0)
    return {"accuracy": float(accuracy_score(y, pred)),
            "f1_macro": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
            "per_class": {name: {k: float(v) for k, v in report[name].items()} for name in labels},
            "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist()}


def _short(figures: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": figures["accuracy"], "f1_macro": figures["f1_macro"]}


def _regression(record: dict[str, Any], store: RunStore, source: str, text_column: str | None,
                label_column: str | None, load_predictor: Any) -> dict[str, Any]:
    from .classical import ClassicalModel
    from .tasks.ensemble import CLASSICAL_DIR

    texts, raw, report = _columns_or_detected(source, text_column, label_column)
    values = np.asarray([_number(v, source) for v in raw])
    predicted = np.asarray([a["value"] for a in load_predictor(record["id"], store.home).predict(texts)])
    out: dict[str, Any] = {"run": record["id"], "file": source, "rows": len(texts), "text_column": report.text_column,
                           "label_column": report.label_column, "encoding": report.encoding,
                           **_regression_figures(values, predicted)}
    folder = Path(record["dir"]) / CLASSICAL_DIR
    out["baseline"] = None
    if (folder / "classical.json").is_file():
        model = ClassicalModel.load(folder)
        out["baseline"] = {"method": model.description, **_regression_figures(values, model.values(texts))}
    return out


def _number(value: str, source: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WorkbenchError(f"label {value[:40]!r} in {source!r} is not a number: a text-regression run is "
                             "scored on a number column (set --label-column)") from None


def _regression_figures(values: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from scipy.stats import spearmanr

    rho = spearmanr(values, predicted).statistic if len(set(predicted.round(9))) > 1 else 0.0
    return {"rmse": float(np.sqrt(np.mean((predicted - values) ** 2))),
            "mae": float(np.mean(np.abs(predicted - values))),
            "spearman": float(rho) if np.isfinite(rho) else 0.0}
