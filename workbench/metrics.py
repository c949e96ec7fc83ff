"""Classification metrics as plain values (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np

from .privacy import stored_text

MISTAKES_KEPT = 50
TEXT_CHARS_KEPT = 600
COLLAPSE_SHARE = 0.95  # a model that gives one label to this share of the rows has (nearly) stopped looking


def classification_figures(labels: list[str], y_true: np.ndarray, probs: np.ndarray,
                           texts: list[str] | None = None, mask_personal: str = "stored"
                           ) -> tuple[dict[str, float], dict, list[dict]]:
    """(figures, drill-down values, worst mistakes) of class probabilities against the true classes:
    accuracy and macro-F1; the labels, confusion matrix and per-class precision/recall/F1. The mistakes'
    texts are masked unless `mask_personal` (data.mask_personal) is "off"."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    y_pred = probs.argmax(axis=1)
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(labels)
    }
    figures = {"accuracy": float(accuracy_score(y_true, y_pred)),
               "f1_macro": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0))}
    payload = {"labels": list(labels), "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
               "per_class": per_class}
    return figures, payload, worst_mistakes(labels, y_true, probs, texts, mask_personal=mask_personal)


def worst_mistakes(labels: list[str], y_true: np.ndarray, probs: np.ndarray, texts: list[str] | None,
                   keep: int = MISTAKES_KEPT, mask_personal: str = "stored") -> list[dict]:
    """The wrong predictions made with the highest confidence, most confident first; each text cut to
    TEXT_CHARS_KEPT characters and masked (privacy.stored_text) unless `mask_personal` is "off"."""
    y_pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:keep]
    return [
        {
            "index": int(i),
            "text": (stored_text(texts[i], mask_personal)[:TEXT_CHARS_KEPT] if texts is not None else ""),
            "true": labels[int(y_true[i])],
            "predicted": labels[int(y_pred[i])],
            "confidence": float(confidence[i]),
        }
        for i in order
    ]


def collapse_note(labels: list[str], confusion_matrix: list[list[int]]) -> str | None:
    """A one-line warning when one label takes (nearly) every prediction, else None.

    Such a model scores the majority share as accuracy and looks fine on that figure alone; macro-F1 and
    the matrix's single full column give it away.
    """
    if len(labels) < 2 or not confusion_matrix:
        return None
    predicted = [sum(row[j] for row in confusion_matrix) for j in range(len(labels))]
    total = sum(predicted)
    top = max(range(len(labels)), key=predicted.__getitem__)
    if total == 0 or predicted[top] / total < COLLAPSE_SHARE:
        return None
    true_share = sum(confusion_matrix[top]) / total
    return (f"the model predicts {labels[top]!r} for {predicted[top] / total:.0%} of the held-out rows (the true "
            f"share is {true_share:.0%}): it has collapsed to one class. Try train.class_weights: balanced, "
            "another learning rate, more epochs or more data")
