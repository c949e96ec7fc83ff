"""Metrics by slice of a labelled file: where a run is weaker than its overall figure.

A slice is the rows with one value of a metadata column, the rows in one word-count bucket (quantile buckets,
so each holds about as many rows), or the rows that contain a term from a list (and those that do not). Each
gets its rows, accuracy and macro-F1 (sklearn), or RMSE and MAE for a regression run.

A slice is flagged when all three hold:
- it has at least `min_rows` rows;
- its accuracy is more than `margin` (default 5 points) below the overall accuracy;
- its Wilson score interval (scipy's `binomtest(...).proportion_ci`) lies wholly below the overall accuracy,
  at a confidence of 95 % Bonferroni-adjusted for the number m of slices tested (those with `min_rows` rows):
  1 - 0.05 / m. Without the adjustment, 10 slices of 100 rows with no real gap (simulated, accuracy 0.8)
  gave a false flag in 23 % of the reports; with it, chance alone flags a report at most 5 % of the time.
For regression the same rule reads on RMSE: more than `margin` (relative, default 5 %) above the overall, and
the lower end of the slice's mean-squared-error interval (normal approximation, the same adjusted confidence)
above the overall MSE.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from .errors import WorkbenchError

__all__ = ["slice_report", "word_count_buckets", "MARGIN", "MIN_ROWS", "CONFIDENCE"]

MARGIN = 0.05  # accuracy points (classification), or relative RMSE (regression), a flagged slice is worse by
MIN_ROWS = 20  # fewer rows than this: listed, never flagged
CONFIDENCE = 0.95  # of the Wilson interval and the bootstrap
LENGTH_BUCKETS = 4  # quartiles of the word counts
MAX_VALUES = 30  # values of one column listed (the most frequent); the rest are counted in a note
MISSING = "(missing)"


def word_count_buckets(texts: Sequence[str], buckets: int = LENGTH_BUCKETS) -> tuple[list[str], list[str]]:
    """Each text's word-count bucket name ("1-8 words"), and the bucket names shortest first: quantile buckets,
    merged where texts of one length span several quantiles."""
    import pandas as pd

    counts = pd.Series([len(t.split()) for t in texts])
    edges = np.unique(np.quantile(counts, np.linspace(0, 1, buckets + 1)))
    if len(edges) < 2:  # every text has one length
        name = f"{int(counts.iloc[0])} words"
        return [name] * len(texts), [name]
    codes = pd.cut(counts, edges, include_lowest=True, labels=False).to_numpy()
    names = []
    for b in range(len(edges) - 1):
        inside = counts[codes == b]
        names.append(f"{int(inside.min())}-{int(inside.max())} words" if len(inside) else "")
    return [names[c] for c in codes], [n for n in names if n]


def _classification_slice(y: np.ndarray, pred: np.ndarray, classes: int, overall: float, min_rows: int,
                          margin: float, level: float) -> dict[str, Any]:
    from scipy.stats import binomtest
    from sklearn.metrics import f1_score

    n, correct = len(y), int((y == pred).sum())
    accuracy = correct / n
    ci = binomtest(correct, n).proportion_ci(confidence_level=level, method="wilson")
    low, high = float(ci.low), float(ci.high)
    return {"rows": n, "accuracy": accuracy,
            "f1_macro": float(f1_score(y, pred, labels=list(range(classes)), average="macro", zero_division=0)),
            "interval": [low, high], "gap": accuracy - overall,
            "flagged": bool(n >= min_rows and overall - accuracy > margin and high < overall)}


def _regression_slice(y: np.ndarray, pred: np.ndarray, overall: float, min_rows: int, margin: float,
                      level: float) -> dict[str, Any]:
    from scipy.stats import norm

    err = (pred - y) ** 2
    rmse = float(np.sqrt(err.mean()))
    half = norm.ppf(1 - (1 - level) / 2) * (err.std(ddof=1) if len(err) > 1 else 0.0) / np.sqrt(len(err))
    low, high = float(np.sqrt(max(err.mean() - half, 0.0))), float(np.sqrt(err.mean() + half))
    return {"rows": len(y), "rmse": rmse, "mae": float(np.abs(pred - y).mean()), "interval": [low, high],
            "gap": rmse - overall,
            "flagged": bool(len(y) >= min_rows and rmse > overall * (1 + margin) and low > overall)}


def _groups(texts: list[str], columns: dict[str, Sequence[Any]] | None, terms: Sequence[str] | None,
            with_lengths: bool) -> tuple[list[tuple[str, str, str, np.ndarray]], list[str]]:
    """(kind, group, value, row mask) of every slice, and notes."""
    n, out, notes = len(texts), [], []
    for column, values in (columns or {}).items():
        if len(values) != n:
            raise WorkbenchError(f"slice column {column!r} has {len(values)} values for {n} texts: give one value "
                                 "per row")
        keys = np.asarray([MISSING if _missing(v) else str(v) for v in values], dtype=object)
        distinct, counts = np.unique(keys, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        if len(distinct) > MAX_VALUES:
            notes.append(f"column {column!r} has {len(distinct)} values: the {MAX_VALUES} most frequent are listed")
        out += [("column", column, str(distinct[i]), keys == distinct[i]) for i in order[:MAX_VALUES]]
    if with_lengths and n:
        names, ordered = word_count_buckets(texts)
        keys = np.asarray(names, dtype=object)
        out += [("length", "words", name, keys == name) for name in ordered]
    for term in terms or []:
        term = term.strip()
        if not term:
            continue
        pattern = re.compile(rf"(?<!\w){re.escape(term)}(?!\w)", re.IGNORECASE)
        has = np.asarray([bool(pattern.search(t)) for t in texts])
        if not has.any():
            notes.append(f"term {term!r} occurs in no text")
        out += [("term", term, "contains", has), ("term", term, "without", ~has)]
    return out, notes


def _missing(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and np.isnan(value))


def slice_report(texts: Sequence[str], y_true: Sequence[Any], y_pred: Sequence[Any],
                 label_names: Sequence[str] | None, *, columns: dict[str, Sequence[Any]] | None = None,
                 terms: Sequence[str] | None = None, length_buckets: bool = True, min_rows: int = MIN_ROWS,
                 margin: float = MARGIN) -> dict[str, Any]:
    """Metrics per slice (column values, word-count buckets, terms) beside the overall, with the flagged gaps.

    Classification: `label_names` given, `y_true` / `y_pred` as names or class indices. Regression:
    `label_names` None, numbers. Returns {"kind", "overall", "slices": [{"kind", "group", "value", "rows",
    figures, "interval", "gap", "flagged"}], "flagged": the flagged slices, "rule": the flagging rule, "notes"}.
    """
    texts = [str(t) for t in texts]
    if not (len(texts) == len(y_true) == len(y_pred)) or not texts:
        raise WorkbenchError(f"slices need one true and one predicted answer per text, got {len(texts)} texts, "
                             f"{len(y_true)} true and {len(y_pred)} predicted: pass the rows of a labelled file")
    groups, notes = _groups(texts, columns, terms, length_buckets)
    groups = [g for g in groups if g[3].any()]  # a term no text contains, or every text
    tested = max(1, sum(int(g[3].sum()) >= min_rows for g in groups))
    level = 1 - (1 - CONFIDENCE) / tested  # Bonferroni: the chance of any false flag stays under 1 - CONFIDENCE
    if label_names is None:
        y, pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
        overall_rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
        overall = {"rows": len(y), "rmse": overall_rmse, "mae": float(np.abs(pred - y).mean())}
        rule = (f"RMSE more than {margin:.0%} above the overall, {min_rows}+ rows, and the slice's {level:.2%} "
                f"interval (95 % Bonferroni-adjusted for {tested} slices) wholly above the overall")
        figures = [_regression_slice(y[m], pred[m], overall_rmse, min_rows, margin, level) for *_, m in groups]
    else:
        names = list(label_names)
        y, pred = _indices(y_true, names), _indices(y_pred, names)
        accuracy = float(np.mean(y == pred))
        overall = _classification_slice(y, pred, len(names), accuracy, min_rows, margin, CONFIDENCE)
        overall = {k: overall[k] for k in ("rows", "accuracy", "f1_macro")}
        rule = (f"accuracy more than {margin * 100:.0f} points below the overall, {min_rows}+ rows, and the "
                f"slice's {level:.2%} Wilson interval (95 % Bonferroni-adjusted for {tested} slices) wholly below "
                "the overall")
        figures = [_classification_slice(y[m], pred[m], len(names), accuracy, min_rows, margin, level)
                   for *_, m in groups]
    slices = [{"kind": kind, "group": group, "value": value, **f}
              for (kind, group, value, _), f in zip(groups, figures)]
    flagged = sorted((s for s in slices if s["flagged"]), key=lambda s: s["gap"] * (1 if label_names else -1))
    return {"kind": "regression" if label_names is None else "classification", "overall": overall,
            "slices": slices, "flagged": flagged, "rule": rule, "min_rows": min_rows, "margin": margin,
            "confidence": level, "notes": notes}


def _indices(values: Sequence[Any], names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    try:
        return np.asarray([v if isinstance(v, (int, np.integer)) else index[v] for v in values], dtype=int)
    except KeyError as exc:
        raise WorkbenchError(f"label {exc.args[0]!r} is not among the labels ({', '.join(names)}): pass labels "
                             "in the run's label names") from None
