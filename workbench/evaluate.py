"""Score a finished run on a separate labelled file: the held-out judgement a user trusts.

The file is read as training reads data (encodings, formats, column detection); the run answers with its
model (an ensemble when the run chose one), and the run's classical baseline answers the same rows, so
the two are compared on data neither was tuned on: metrics, per-class report and confusion matrix, and for a
classifier the expected calibration error of its probabilities on the file.

Beside them, a classification or regression run is scored by slice (`workbench.slices`: word-count buckets,
the file's own metadata columns, texts with given terms), and with `robustness=True` under perturbed texts and
on out-of-domain texts (`workbench.robustness`). Both reports go to the run folder (`RunPaths.slices`,
`RunPaths.robustness`: JSON, written atomically, texts masked as `data.mask_personal` says) and into the result
under "slices" and "robustness"; `trust_lines(result)` gives their short tables for a terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import time
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import Config
from .errors import WorkbenchError
from .run_paths import RunPaths
from .store import RunStore

__all__ = ["evaluate_file", "TrustOptions", "terms_from", "trust_lines"]


@dataclass(frozen=True)
class TrustOptions:
    """What evaluate measures beyond the figures: slices always (word-count buckets at least), robustness and
    out-of-domain confidence when asked."""

    robustness: bool = False
    slice_columns: Sequence[str] = ()
    slice_terms: Sequence[str] = ()
    ood: str | Path | None = None  # a file of out-of-domain texts; None: the built-in sets
    seed: int = 0


def terms_from(value: str | Sequence[str] | None) -> list[str]:
    """Slice terms from a list, a file of one term per line, or a comma-separated string."""
    if value is None:
        return []
    if not isinstance(value, str):
        return [str(t).strip() for t in value if str(t).strip()]
    path = Path(value).expanduser()
    if path.is_file():
        from .data import load_texts

        return [t.strip() for t in load_texts(str(path)) if t.strip()]
    return [t.strip() for t in value.split(",") if t.strip()]


def evaluate_file(run: str, source: str | Path, home: str | Path | None = None, text_column: str | None = None,
                  label_column: str | None = None, robustness: bool = False,
                  slice_columns: Sequence[str] | None = None, slice_terms: str | Sequence[str] | None = None,
                  ood: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Figures of run `run` on the labelled file `source`, beside its classical baseline's; metrics by slice
    (`slice_columns` of the file, `slice_terms` as a list, a file or "a,b,c"), and with `robustness` the
    perturbation and out-of-domain report (`ood`: a file of texts, else the built-in sets)."""
    from .predict import load_predictor

    trust = TrustOptions(robustness, tuple(slice_columns or ()), tuple(terms_from(slice_terms)), ood, seed)

    store = RunStore(home)
    record = store.get(run)
    if record["status"] not in ("completed", "stopped"):
        raise WorkbenchError(f"run {record['id']} is {record['status']}: evaluate a completed run")
    config = Config.from_dict(record["config"])
    info = record.get("info") or {}
    text_column = text_column or config.data.text_column or info.get("text_column")
    label_column = label_column or config.data.label_column or info.get("label_column")
    if config.task_spec.kind == "tokens":  # tagged sentences, scored as entities
        if trust.robustness or trust.slice_columns or trust.slice_terms:
            raise WorkbenchError(f"run {record['id']} tags entities: robustness and slices score classification "
                                 "and regression runs; evaluate it without --robustness and --slice-*")
        return _entities(record, store, str(source), text_column, label_column, load_predictor)
    from .tasks.classification import ClassificationTask
    from .tasks.regression import RegressionTask

    if config.task == ClassificationTask.name:
        return _classification(record, store, str(source), text_column, label_column, load_predictor, trust)
    if config.task == RegressionTask.name:
        return _regression(record, store, str(source), text_column, label_column, load_predictor, trust)
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
                    label_column: str | None, load_predictor: Any, trust: TrustOptions) -> dict[str, Any]:
    from .tasks.ensemble import EnsemblePredictor, load_classical, member_probabilities

    texts, names, report = _columns_or_detected(source, text_column, label_column)
    columns = _slice_columns(source, trust.slice_columns, report, texts)
    predictor = load_predictor(record["id"], store.home)
    labels = list(predictor.labels)
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise WorkbenchError(f"labels {unknown[:5]} in {source!r} are not among the run's labels ({', '.join(labels)}): "
                             "drop those rows, or evaluate a run trained on them")
    y = np.asarray([labels.index(n) for n in names])
    probs = member_probabilities(predictor, texts)
    answer = _figures(labels, y, probs)
    raw = getattr(predictor, "inner", predictor)  # a calibrated predictor wraps the run's own
    out: dict[str, Any] = {"run": record["id"], "file": source, "rows": len(texts), "text_column": report.text_column,
                           "label_column": report.label_column, "encoding": report.encoding,
                           "blank_dropped": report.blank_dropped, "labels": labels,
                           "answers_with": "ensemble" if isinstance(raw, EnsemblePredictor) else "fine-tuned",
                           **answer, "ece": _ece(probs, y)}
    if isinstance(raw, EnsemblePredictor):
        out["fine_tuned"] = _short(_figures(labels, y, member_probabilities(raw.members[0], texts)))
    try:
        classical = load_classical(Path(record["dir"]))
    except WorkbenchError:
        out["baseline"] = None
    else:
        out["baseline"] = {"method": classical.model.description, "class_weight": classical.model.class_weight,
                           **_short(_figures(labels, y, classical.probabilities(texts)))}
    from .slices import slice_report

    out["slices"] = _written(record, RunPaths.of(record).slices, source, slice_report(
        texts, y, probs.argmax(axis=1), labels, columns=columns, terms=list(trust.slice_terms)))
    out["robustness"] = _robustness(record, source, predictor, texts, y, labels, trust)
    return out


def _ece(probs: np.ndarray, y: np.ndarray) -> float | None:
    try:
        from .calibration import expected_calibration_error
    except ImportError:  # a tree without calibration.py
        return None
    return expected_calibration_error(probs, y)


def _robustness(record: dict[str, Any], source: str, predictor: Any, texts: list[str], y: Any,
                labels: list[str] | None, trust: TrustOptions) -> dict[str, Any] | None:
    """The robustness report, written to the run folder (None when not asked for)."""
    if not trust.robustness:
        return None
    from .data import load_texts
    from .robustness import robustness_report

    ood = load_texts(str(trust.ood)) if trust.ood is not None else None
    report = robustness_report(predictor, texts, y, labels, seed=trust.seed, ood_texts=ood)
    if report.get("ood") and trust.ood is not None:
        report["ood"]["file"] = str(trust.ood)
    return _written(record, RunPaths.of(record).robustness, source, report)


def _written(record: dict[str, Any], path: Path, source: str, report: dict[str, Any]) -> dict[str, Any]:
    """`report` with the file and time it was measured on and its texts masked, written atomically to `path`."""
    from .privacy import stored_text
    from .tasks.classification import write_json

    mode = (record.get("config") or {}).get("data", {}).get("mask_personal", "stored")
    for row in report.get("perturbations", []):
        for example in row.get("examples", []):
            for key in ("clean", "perturbed"):
                example[key] = stored_text(example[key], mode)
    for ood_set in (report.get("ood") or {}).get("sets", []):
        ood_set["examples"] = [stored_text(t, mode) for t in ood_set.get("examples", [])]
    for piece in report.get("slices", []):  # a column's values and the terms are data; bucket names are not
        key = {"column": "value", "term": "group"}.get(piece["kind"])
        if key:
            piece[key] = stored_text(piece[key], mode)
    if "slices" in report:
        report["notes"] = [stored_text(n, mode) for n in report.get("notes", [])]
    report = {"run": record["id"], "file": source, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **report}
    write_json(path, report)
    return report


def _slice_columns(source: str, wanted: Sequence[str], report: Any, texts: list[str]) -> dict[str, list[Any]]:
    """The file's columns `wanted`, one value per row that was scored (rows dropped as blank are left out)."""
    if not wanted:
        return {}
    from .data import load_table

    df, _ = load_table(source)
    df = df.rename(columns=str)
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise WorkbenchError(f"slice column {missing[0]!r} not found in {source!r}: columns found are "
                             f"{', '.join(df.columns)} (set --slice-column)")
    kept = _kept_rows(df[report.text_column].tolist(), texts)
    if kept is None:
        raise WorkbenchError(f"could not match the scored rows of {source!r} to its {', '.join(wanted)} column: "
                             "drop its rows without a text or a label and evaluate again")
    return {c: df[c].iloc[kept].tolist() for c in wanted}


def _kept_rows(raw: list[Any], texts: list[str]) -> list[int] | None:
    """The positions of the scored `texts` among the file's raw text values (the loader keeps file order and
    only drops rows), or None when they do not match."""
    if len(raw) == len(texts):
        return list(range(len(raw)))
    kept, j = [], 0
    for i, value in enumerate(raw):
        text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
        if j < len(texts) and unicodedata.normalize("NFC", text) == texts[j]:
            kept.append(i)
            j += 1
    return kept if j == len(texts) else None


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
                label_column: str | None, load_predictor: Any, trust: TrustOptions) -> dict[str, Any]:
    from .classical import ClassicalModel
    from .slices import slice_report
    from .tasks.ensemble import CLASSICAL_DIR

    texts, raw, report = _columns_or_detected(source, text_column, label_column)
    values = np.asarray([_number(v, source) for v in raw])
    columns = _slice_columns(source, trust.slice_columns, report, texts)
    predictor = load_predictor(record["id"], store.home)
    predicted = np.asarray([a["value"] for a in predictor.predict(texts)])
    out: dict[str, Any] = {"run": record["id"], "file": source, "rows": len(texts), "text_column": report.text_column,
                           "label_column": report.label_column, "encoding": report.encoding,
                           **_regression_figures(values, predicted)}
    folder = Path(record["dir"]) / CLASSICAL_DIR
    out["baseline"] = None
    if (folder / "classical.json").is_file():
        model = ClassicalModel.load(folder)
        out["baseline"] = {"method": model.description, **_regression_figures(values, model.values(texts))}
    out["slices"] = _written(record, RunPaths.of(record).slices, source, slice_report(
        texts, values, predicted, None, columns=columns, terms=list(trust.slice_terms)))
    out["robustness"] = _robustness(record, source, predictor, texts, values, None, trust)
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


def trust_lines(result: dict[str, Any], slices_shown: int = 8) -> list[str]:
    """Short tables of an evaluation's robustness and slices, for a terminal (empty when it has neither)."""
    lines: list[str] = []
    rob = result.get("robustness")
    if rob:
        regression = rob["kind"] == "regression"
        clean = rob["clean"]
        lines.append(f"robustness (seed {rob['seed']}): clean " + (f"rmse {clean['rmse']:.4f}" if regression else
                     f"accuracy {clean['accuracy']:.4f}, mean confidence {clean['mean_confidence']:.3f}"))
        lines.append(f"  {'perturbation':<18} {'changed':>7}  " + ("rmse     mean |change|" if regression else
                                                                "accuracy  drop     flip rate"))
        for p in rob["perturbations"]:
            if regression:
                change = "-" if p["mean_abs_change"] is None else f"{p['mean_abs_change']:.4f}"
                lines.append(f"  {p['name']:<18} {p['changed']:>7}  {p['rmse']:.4f}   {change}")
            else:
                flips = "-" if p["flip_rate"] is None else f"{p['flip_rate']:.3f} ({p['flips']})"
                lines.append(f"  {p['name']:<18} {p['changed']:>7}  {p['accuracy']:.4f}    "
                             f"{p['accuracy_drop']:+.4f}  {flips}")
        ood = rob.get("ood")
        if ood:
            lines.append(f"  out of domain ({ood['source']}): in-domain mean confidence "
                         f"{ood['in_domain_confidence']:.3f}")
            for s in ood["sets"]:
                lines.append(f"    {s['name']:<22} {s['rows']:>5} texts  mean confidence {s['mean_confidence']:.3f} "
                             f"(shift {s['shift']:+.3f}), AUROC in vs out {s['auroc']:.3f}")
            lines += [f"    note: {n}" for n in ood.get("notes", [])]
    sl = result.get("slices")
    if sl:
        metric = "rmse" if sl["kind"] == "regression" else "accuracy"
        overall = sl["overall"]
        lines.append(f"slices ({overall['rows']} rows, overall {metric} {overall[metric]:.4f}); flagged: {sl['rule']}")
        rest = [s for s in sl["slices"] if not s["flagged"]]
        shown = sl["flagged"] + rest[:max(0, slices_shown - len(sl["flagged"]))]
        for s in shown:
            mark = "  FLAGGED" if s["flagged"] else ""
            lines.append(f"  {s['kind']:<6} {s['group'][:20]:<20} {s['value'][:22]:<22} {s['rows']:>6} rows  "
                         f"{metric} {s[metric]:.4f} ({s['gap']:+.4f}){mark}")
        if len(sl["slices"]) > len(shown):
            lines.append(f"  ... {len(sl['slices']) - len(shown)} more slices in --json")
        lines += [f"  note: {n}" for n in sl.get("notes", [])]
    return lines
