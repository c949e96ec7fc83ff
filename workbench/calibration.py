"""Calibration of a classifier's class probabilities: expected calibration error, reliability bins, temperature.

A model is calibrated when, of the answers it gives with confidence 0.8, 80 % are right. The expected
calibration error (ECE) is the gap between confidence and accuracy, averaged over equal-width confidence bins
weighted by their rows (top-label ECE, Guo et al. 2017). Temperature scaling divides the log-probabilities by
one number T fitted to minimise the negative log-likelihood on labelled rows: T > 1 softens an overconfident
model, T < 1 sharpens an underconfident one, and the argmax (so accuracy) never changes. It works on
probabilities, so it also calibrates an averaged ensemble. `CalibratedPredictor` wraps any classification
predictor with a fitted temperature and an optional abstain threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from .errors import WorkbenchError
from .run_paths import RunPaths

__all__ = ["expected_calibration_error", "reliability_bins", "negative_log_likelihood", "fitted_temperature",
           "fit_temperature", "scale", "calibrate", "read_calibration", "CalibratedPredictor",
           "UNCERTAIN"]

ECE_BINS = 15  # the ECE's bins (Guo et al. 2017)
DIAGRAM_BINS = 10  # the reliability diagram's bins
TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures the fit searches
EPS = 1e-12  # probabilities are clipped here before their log
UNCERTAIN = "uncertain"  # the label of an answer below the abstain threshold
OWN_ATTRIBUTES = ("inner", "temperature", "abstain_below")  # CalibratedPredictor's; the rest is the inner one's


def _checked(probs: Any, y_true: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or p.shape[1] < 2:
        raise WorkbenchError(f"calibration needs (rows, classes) probabilities with two classes or more, got "
                             f"shape {p.shape}: pass each row's probabilities in the labels' order")
    if y.shape != (p.shape[0],):
        raise WorkbenchError(f"calibration got {p.shape[0]} probability rows and {y.size} true labels: pass one "
                             "true class index per row")
    if p.shape[0] and (y.min() < 0 or y.max() >= p.shape[1]):
        raise WorkbenchError(f"true labels must be class indices 0..{p.shape[1] - 1}, got {y.min()}..{y.max()}: "
                             "map label names to their index in the labels' order")
    return p, y.astype(int)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins (lower, upper]; a confidence of exactly 0 goes to the first."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


def expected_calibration_error(probs: Any, y_true: Any, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (rows in bin / rows) x |accuracy - confidence|."""
    p, y = _checked(probs, y_true)
    if not len(y):
        return 0.0
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    index = _bin_index(confidence, bins)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, minlength=bins) - np.bincount(index, confidence, minlength=bins))
    return float(gap.sum() / len(y)) if counts.sum() else 0.0


def reliability_bins(probs: Any, y_true: Any, bins: int = DIAGRAM_BINS) -> list[dict[str, Any]]:
    """Each equal-width confidence bin: lower, upper, count, mean confidence and accuracy (None when empty)."""
    p, y = _checked(probs, y_true)
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    index = _bin_index(confidence, bins)
    out = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        out.append({"lower": round(b / bins, 6), "upper": round((b + 1) / bins, 6), "count": count,
                    "confidence": float(confidence[inside].mean()) if count else None,
                    "accuracy": float(correct[inside].mean()) if count else None})
    return out


def negative_log_likelihood(probs: Any, y_true: Any) -> float:
    """Mean -log p(true class)."""
    p, y = _checked(probs, y_true)
    if not len(y):
        return 0.0
    return float(-np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0)).mean())


def scale(probs: Any, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities with temperature T (rows renormalised; T = 1 leaves them)."""
    if not temperature > 0:
        raise WorkbenchError(f"a temperature must be above 0, got {temperature}: fit one with fit_temperature")
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:  # exactly the probabilities given, not their log's round trip
        return p / p.sum(axis=-1, keepdims=True)
    return softmax(np.log(np.clip(p, EPS, 1.0)) / float(temperature), axis=-1)


def fitted_temperature(probs: Any, y_true: Any) -> float:
    """The temperature (in TEMPERATURE_RANGE) minimising the NLL of softmax(log p / T), searched on log T."""
    p, y = _checked(probs, y_true)
    if not len(y):
        return 1.0
    log_p = np.log(np.clip(p, EPS, 1.0))
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(log_p / np.exp(log_t), axis=1)[rows, y].mean())

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    # the bounded search can miss a flat optimum at 1.0: keep T = 1 when it is at least as good
    return 1.0 if nll(0.0) <= found.fun else round(float(np.exp(found.x)), 6)  # as stored: 6 decimals


def fit_temperature(probs: Any, y_true: Any) -> float:
    """The NLL-fitted temperature, or 1.0 when scaling by it would raise the ECE on these rows."""
    return _unless_worse(probs, y_true, fitted_temperature(probs, y_true))


def _unless_worse(probs: Any, y_true: Any, temperature: float) -> float:
    before = expected_calibration_error(probs, y_true)
    return temperature if expected_calibration_error(scale(probs, temperature), y_true) <= before else 1.0


def calibrate(probs: Any, y_true: Any) -> dict[str, Any]:
    """Fit a temperature on labelled rows; the record of it: temperature, ECE and NLL before and after,
    reliability bins before and after, rows and a note on what the figures were measured on."""
    p, y = _checked(probs, y_true)
    fitted = fitted_temperature(p, y)
    temperature = _unless_worse(p, y, fitted)
    after = scale(p, temperature)
    record = {"method": "temperature", "temperature": temperature,
              "ece_before": expected_calibration_error(p, y), "ece_after": expected_calibration_error(after, y),
              "nll_before": negative_log_likelihood(p, y), "nll_after": negative_log_likelihood(after, y),
              "bins_before": reliability_bins(p, y), "bins_after": reliability_bins(after, y), "rows": int(len(y)),
              "note": "the temperature is fitted and the ECE measured on the same eval split: ece_after is an "
                      "in-sample figure, optimistic for new texts"}
    if temperature != fitted:
        record["kept_identity"] = (f"the NLL-fitted temperature {fitted:.4g} raised the ECE on the eval split, "
                                   "so the probabilities are left unscaled (temperature 1)")
    return record


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's calibration record (calibration.json), None when it has none."""
    path = RunPaths(Path(run_dir)).calibration
    return json.loads(path.read_text()) if path.is_file() else None


class CalibratedPredictor:
    """A classification predictor whose scores are scaled by a temperature; below `abstain_below` (top
    calibrated probability) an answer's label is "uncertain", with `abstained` and the argmax as `top_label`.
    Every other attribute is the wrapped predictor's (`inner`)."""

    def __init__(self, inner: Any, temperature: float, abstain_below: float | None = None) -> None:
        if abstain_below is not None and not 0.0 <= abstain_below <= 1.0:
            raise WorkbenchError(f"abstain_below must be between 0 and 1, got {abstain_below}: it is the lowest "
                                 "top-class probability that still answers")
        scale(np.ones((1, 2)) / 2, temperature)  # refuses a temperature <= 0
        self.inner, self.temperature, self.abstain_below = inner, float(temperature), abstain_below

    def __getattr__(self, name: str) -> Any:
        if name in OWN_ATTRIBUTES:  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # the server merges adapters with `predictor.model = ...`: that is the inner predictor's model
        if name in OWN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def around(self, inner: Any) -> "CalibratedPredictor":
        """The same temperature and threshold around another predictor of the run (an optimised artifact)."""
        return CalibratedPredictor(inner, self.temperature, self.abstain_below)

    def probabilities(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """(texts, classes) calibrated probabilities, in the order of `labels`."""
        answers = self.inner.predict(list(texts), batch_size=batch_size)
        raw = np.asarray([[a["scores"][name] for name in self.inner.labels] for a in answers], dtype=np.float64)
        return scale(raw.reshape(len(answers), len(self.inner.labels)), self.temperature)

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """The inner predictor's answers with calibrated scores; "uncertain" below the abstain threshold."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        labels = list(self.inner.labels)
        out = []
        for text, p in zip(texts, self.probabilities(texts, batch_size)):
            top = labels[int(p.argmax())]
            answer = {"text": text, "label": top, "scores": {name: float(s) for name, s in zip(labels, p)}}
            if self.abstain_below is not None and float(p.max()) < self.abstain_below:
                answer.update({"label": UNCERTAIN, "abstained": True, "top_label": top})
            out.append(answer)
        return out
