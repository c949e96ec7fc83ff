"""The classical baseline: TF-IDF features (word 1-2-grams and character 2-5-grams) and a linear model.

Every classification and regression run fits one on its own training split and scores it on its own eval
split (a few seconds on 2 CPU cores), so a fine-tuned model is always read beside what a one-second model
does on the same rows. Logistic regression for classes (fitted plain and with balanced class weights, the
better of the two on the run's selection metric kept), ridge for numbers.

Saved without pickle: the vocabularies and idf weights as JSON, the coefficients as safetensors, so loading
a run never executes code from its folder.

Fitted on masked texts (privacy.mask_text) unless data.mask_personal is "off": no e-mail address or phone
number of the training data becomes an n-gram of the saved vocabulary. A masked model masks the texts it
scores the same way, so an address in a new text reads as the [EMAIL] features it learned.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import WorkbenchError
from .privacy import mask_text

VECTORIZERS: dict[str, dict[str, Any]] = {
    # sublinear tf: a word said ten times is not ten times the evidence; min_df 2 drops one-off n-grams
    "word": {"analyzer": "word", "ngram_range": (1, 2), "sublinear_tf": True, "min_df": 1, "max_features": 200_000,
             "lowercase": True, "strip_accents": None, "token_pattern": r"(?u)\b\w+\b"},
    "char": {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True, "min_df": 2,
             "max_features": 200_000, "lowercase": True},
}
LOGISTIC_C = 10.0  # TF-IDF rows are unit vectors: sklearn's C=1 over-regularises them (measured on bbc-news)
RIDGE_ALPHA = 1.0
DESCRIPTION = "TF-IDF (word 1-2 + char 2-5 grams) + logistic regression"
REGRESSION_DESCRIPTION = "TF-IDF (word 1-2 + char 2-5 grams) + ridge regression"
WEIGHTS_FILE, VOCAB_FILE = "classical.safetensors", "classical.json"


@dataclass
class ClassicalModel:
    """Fitted vectorizers and a linear model: `probabilities(texts)` for classes, `values(texts)` for numbers."""

    kind: Literal["classifier", "regressor"]
    vectorizers: dict[str, Any]
    coef: np.ndarray  # (classes, features), or (1, features) for a regressor
    intercept: np.ndarray
    labels: list[str] = field(default_factory=list)
    class_weight: str = "none"
    seconds: float = 0.0
    masked: bool = False  # fitted on masked texts: the texts it scores are masked too

    def features(self, texts: list[str]) -> Any:
        from scipy.sparse import hstack

        if self.masked:
            texts = [mask_text(t) for t in texts]
        return hstack([v.transform(texts) for v in self.vectorizers.values()]).tocsr()

    def scores(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.features(texts) @ self.coef.T) + self.intercept

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, (texts, classes), in the order of `labels`."""
        from scipy.special import expit, softmax

        scores = self.scores(texts)
        if scores.shape[1] == 1:  # sklearn's binary model: one score, for the second class
            p = expit(scores[:, 0])
            return np.stack([1 - p, p], axis=1)
        return softmax(scores, axis=1)

    def values(self, texts: list[str]) -> np.ndarray:
        return self.scores(texts)[:, 0]

    @property
    def description(self) -> str:
        return DESCRIPTION if self.kind == "classifier" else REGRESSION_DESCRIPTION

    # --- files ---------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """classical.json (vocabularies, idf, labels) and classical.safetensors (coefficients)."""
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "labels": self.labels, "class_weight": self.class_weight, "masked": self.masked,
                "vectorizers": {name: {"vocabulary": {t: int(i) for t, i in v.vocabulary_.items()},
                                       "idf": v.idf_.tolist()} for name, v in self.vectorizers.items()}}
        tmp = folder / (VOCAB_FILE + ".tmp")
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        save_file({"coef": np.ascontiguousarray(self.coef, dtype=np.float32),
                   "intercept": np.ascontiguousarray(self.intercept, dtype=np.float32)},
                  str(folder / (WEIGHTS_FILE + ".tmp")))
        (folder / (WEIGHTS_FILE + ".tmp")).replace(folder / WEIGHTS_FILE)
        tmp.replace(folder / VOCAB_FILE)

    @classmethod
    def load(cls, folder: Path) -> "ClassicalModel":
        from safetensors.numpy import load_file

        if not (folder / VOCAB_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise WorkbenchError(f"no classical baseline in {folder}: the run was trained with train.baseline: "
                                 "false, or before baselines existed; train it again to get one")
        meta = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(folder / WEIGHTS_FILE))
        vectorizers = {name: _vectorizer(name, saved["vocabulary"], np.asarray(saved["idf"]))
                       for name, saved in meta["vectorizers"].items()}
        return cls(meta["kind"], vectorizers, weights["coef"].astype(np.float64),
                   weights["intercept"].astype(np.float64), meta["labels"], meta["class_weight"],
                   masked=bool(meta.get("masked", False)))


def _vectorizer(name: str, vocabulary: dict[str, int] | None = None, idf: np.ndarray | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    params = dict(VECTORIZERS[name])
    if vocabulary is None:
        return TfidfVectorizer(**params, dtype=np.float32)
    params.pop("max_features"), params.pop("min_df")
    vectorizer = TfidfVectorizer(**params, vocabulary=vocabulary, dtype=np.float32)
    vectorizer.idf_ = idf  # sets the fitted idf weights: transform() then needs no fit
    return vectorizer


def _fit_features(texts: list[str]) -> tuple[dict[str, Any], Any]:
    from scipy.sparse import hstack

    vectorizers: dict[str, Any] = {}
    blocks = []
    for name in VECTORIZERS:
        vectorizer = _vectorizer(name)
        try:
            blocks.append(vectorizer.fit_transform(texts))
        except ValueError:  # "empty vocabulary": texts too short or too few for this analyzer's min_df
            continue
        vectorizers[name] = vectorizer
    if not vectorizers:
        raise WorkbenchError("the classical baseline found no words in the training texts")
    return vectorizers, hstack(blocks).tocsr()


def fit_classifiers(texts: list[str], labels: list[int], names: list[str],
                    class_weights: tuple[str, ...] = ("none", "balanced"),
                    mask_personal: str = "stored") -> list[ClassicalModel]:
    """TF-IDF + logistic regression on (texts, integer labels), one model per class weighting ("none",
    "balanced"), sharing the vectorizers; `names` gives every class of the run, seen in training or not.
    Fitted on masked texts unless `mask_personal` (data.mask_personal) is "off"."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    masked = mask_personal != "off"
    vectorizers, x = _fit_features([mask_text(t) for t in texts] if masked else texts)
    shared = time.perf_counter() - start
    y, models = np.asarray(labels), []
    for weighting in class_weights:
        begun = time.perf_counter()
        model = LogisticRegression(C=LOGISTIC_C, max_iter=3000,
                                   class_weight=None if weighting == "none" else "balanced").fit(x, y)
        coef, intercept = _full_rows(model, len(names))
        models.append(ClassicalModel("classifier", vectorizers, coef, intercept, list(names), weighting,
                                     shared + time.perf_counter() - begun, masked))
    return models


def _full_rows(model: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One coefficient row per class of the run (a class absent from training gets a score of -inf)."""
    present = [int(c) for c in model.classes_]
    if len(present) == 2 and n_classes == 2:
        return model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
    coef = np.zeros((n_classes, model.coef_.shape[1]))
    intercept = np.full(n_classes, -1e9)
    if len(present) == 2:  # binary model inside a run with more classes: scores -s/2 and +s/2
        coef[present[0]], coef[present[1]] = -model.coef_[0] / 2, model.coef_[0] / 2
        intercept[present[0]], intercept[present[1]] = -model.intercept_[0] / 2, model.intercept_[0] / 2
    else:
        coef[present], intercept[present] = model.coef_, model.intercept_
    return coef, intercept


def fit_regressor(texts: list[str], values: list[float], mask_personal: str = "stored") -> ClassicalModel:
    """TF-IDF + ridge regression on (texts, numbers), fitted on masked texts unless `mask_personal` is "off"."""
    from sklearn.linear_model import Ridge

    start = time.perf_counter()
    masked = mask_personal != "off"
    vectorizers, x = _fit_features([mask_text(t) for t in texts] if masked else texts)
    model = Ridge(alpha=RIDGE_ALPHA).fit(x, np.asarray(values, dtype=np.float64))
    return ClassicalModel("regressor", vectorizers, model.coef_.reshape(1, -1).astype(np.float64),
                          np.asarray([model.intercept_], dtype=np.float64), seconds=time.perf_counter() - start,
                          masked=masked)
