"""Course settings for the teaching notebooks: run sizes that fit 2 CPU cores, and answer checks.

The notebooks import this file from their own folder. Everything heavy lives in `workbench` and
`widgets`; this file only chooses small sizes and checks exercise answers.

Environment variables (all optional):

- WORKBENCH_HOME: where runs are stored (default: ./workbench-runs next to the notebooks)
- WORKBENCH_COURSE_MODEL: the model to fine-tune (default: the catalog's minilm-l6)
- WORKBENCH_COURSE_SCALE: "course" (default, a few minutes per notebook) or "smoke" (seconds; the tests)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd  # imported up front: plotly looks for pandas while widget threads may import it

from workbench import Config

MODEL = os.environ.get("WORKBENCH_COURSE_MODEL", "minilm-l6")
SCALE = os.environ.get("WORKBENCH_COURSE_SCALE", "course")

# rows, tokens and passes per run: "course" fits 2 CPU cores in a few minutes per notebook
SIZES: dict[str, dict[str, int]] = {
    "course": {"max_train_samples": 240, "max_eval_samples": 100, "max_length": 64, "epochs": 1, "batch_size": 16},
    "smoke": {"max_train_samples": 32, "max_eval_samples": 24, "max_length": 32, "epochs": 1, "batch_size": 8},
}
if SCALE not in SIZES:
    raise ValueError(f"WORKBENCH_COURSE_SCALE = {SCALE!r} is not allowed: one of {', '.join(SIZES)}")


def home() -> Path:
    """The notebooks' own run store, so course runs never mix with other work."""
    return Path(os.environ.get("WORKBENCH_HOME", "workbench-runs")).resolve()


def size(name: str) -> int:
    return SIZES[SCALE][name]


def config(name: str, method: str = "lora", source: str = "bbc-news", **sections: dict[str, Any]) -> Config:
    """A course-sized Config; `sections` override fields, e.g. train={"epochs": 3}."""
    s = SIZES[SCALE]
    raw: dict[str, Any] = {
        "model": MODEL,
        "name": name,
        "data": {"source": source, "max_train_samples": s["max_train_samples"],
                 "max_eval_samples": s["max_eval_samples"]},
        "method": {"name": method},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "learning_rate": 1e-3, "early_stopping_patience": 0},
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    if SCALE == "smoke":
        raw["train"]["threads"] = 1  # TRAPS.md: under load from other processes 1 thread holds up best
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return Config.from_dict(raw)


# --- exercises ---------------------------------------------------------------------------

class WrongAnswer(AssertionError):
    """An exercise answer that does not match; the message says why and hints at the way."""


def check_answer(question: str, answer: Any, expected: Any, hint: str = "", tolerance: float = 1e-6) -> None:
    """Compare an exercise answer with the value computed from the runs.

    `answer` left as None means "not attempted yet": a note is printed and nothing fails, so the notebook
    still runs top to bottom. A wrong answer raises WrongAnswer with the hint.
    """
    if answer is None:
        print(f"[{question}] not answered yet: replace None with your answer. {hint}".rstrip())
        return
    if isinstance(expected, float) or isinstance(answer, float):
        try:
            ok = math.isclose(float(answer), float(expected), rel_tol=max(tolerance, 1e-9), abs_tol=tolerance)
        except (TypeError, ValueError):
            ok = False
    elif isinstance(expected, str):
        ok = str(answer).strip().lower() == expected.strip().lower()
    else:
        ok = answer == expected
    if not ok:
        raise WrongAnswer(f"[{question}] {answer!r} is not right. {hint}".rstrip())
    print(f"[{question}] correct: {answer!r}")


def last_train_losses(points: list[dict[str, Any]], steps: int) -> float:
    """Mean training loss over the last `steps` optimiser steps."""
    losses = [p["loss"] for p in points if p["kind"] == "train"][-steps:]
    return sum(losses) / max(len(losses), 1)


def table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run record (indexed by method): the measured numbers the comparison notebook discusses."""
    rows = []
    for r in records:
        info, timings, metrics = r["info"] or {}, r["timings"] or {}, r["metrics"] or {}
        rows.append({
            "method": r["config"]["method"]["name"],
            "accuracy": round(metrics.get("accuracy", float("nan")), 3),
            "trainable params": info.get("trainable_params"),
            "trainable %": info.get("trainable_percent"),
            "train seconds": timings.get("train_seconds"),
            "peak memory MB": timings.get("peak_memory_mb"),
            "status": r["status"],
        })
    return pd.DataFrame(rows).set_index("method")


def check_choice(question: str, answer: Any, allowed: list[Any], hint: str = "") -> None:
    """Like check_answer, when several answers are right (e.g. a tie); text compares case-blind."""
    if answer is None:
        check_answer(question, None, None, hint)
        return
    norm = [a.strip().lower() if isinstance(a, str) else a for a in allowed]
    given = answer.strip().lower() if isinstance(answer, str) else answer
    if given not in norm:
        raise WrongAnswer(f"[{question}] {answer!r} is not right. {hint}".rstrip())
    print(f"[{question}] correct: {answer!r}")
