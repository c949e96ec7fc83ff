"""Course settings for the teaching notebooks: run sizes that fit 2 CPU cores, and answer checks.

Each notebook's first cell puts this folder on `sys.path`, found from the installed `workbench` package
(`pip install -e .` keeps it in this repository), so `import course` works whatever the kernel's working
directory. Everything heavy lives in `workbench` and `widgets`; this file chooses small sizes, reads run
records into tables and checks exercise answers.

Environment variables (all optional):

- WORKBENCH_HOME: where runs are stored (default: ./workbench-runs in the working directory)
- WORKBENCH_COURSE_MODEL: the model to fine-tune (default: the catalog's minilm-l6)
- WORKBENCH_COURSE_CHAT_MODEL: the chat model of 07_chat_tuning (default: the catalog's smollm2-135m-instruct)
- WORKBENCH_COURSE_SCALE: "course" (default, a few minutes per notebook) or "smoke" (seconds; the tests)
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd  # imported up front: plotly looks for pandas while widget threads may import it

from workbench import Config

MODEL = os.environ.get("WORKBENCH_COURSE_MODEL", "minilm-l6")
CHAT_MODEL = os.environ.get("WORKBENCH_COURSE_CHAT_MODEL", "smollm2-135m-instruct")
SCALE = os.environ.get("WORKBENCH_COURSE_SCALE", "course")

# rows, tokens and passes per run: "course" fits 2 CPU cores in a few minutes per notebook
SIZES: dict[str, dict[str, int]] = {
    "course": {"max_train_samples": 240, "max_eval_samples": 100, "max_length": 64, "epochs": 1, "batch_size": 16},
    "smoke": {"max_train_samples": 32, "max_eval_samples": 24, "max_length": 32, "epochs": 1, "batch_size": 8},
}
# 07_chat_tuning: SmolLM2-135M answers; "course" keeps the whole notebook under 5 minutes on 2 CPU cores
CHAT_SIZES: dict[str, dict[str, int]] = {
    "course": {"max_train_samples": 64, "max_eval_samples": 24, "max_length": 64, "epochs": 2, "batch_size": 8,
               "eval_every": 8, "sample_prompts": 5, "max_new_tokens": 32},
    "smoke": {"max_train_samples": 24, "max_eval_samples": 8, "max_length": 48, "epochs": 1, "batch_size": 8,
              "eval_every": 0, "sample_prompts": 3, "max_new_tokens": 8},
}
if SCALE not in SIZES:
    raise ValueError(f"WORKBENCH_COURSE_SCALE = {SCALE!r} is not allowed: one of {', '.join(SIZES)}")


def home() -> Path:
    """The notebooks' own run store (next to this file, whatever the working directory), so course runs
    never mix with other work."""
    default = Path(__file__).resolve().parent / "workbench-runs"
    return Path(os.environ.get("WORKBENCH_HOME") or default).resolve()


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
        raw["train"]["threads"] = 1  # under load from other processes, 1 thread holds up best
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


# --- 07_chat_tuning: chat runs, read as tables ------------------------------------------------------

def chat_config(name: str, source: str = "chatterbot", system_prompt: str | None = None,
                **sections: dict[str, Any]) -> Config:
    """A course-sized LoRA chat run (task chat) of the course's chat model; `sections` override fields."""
    s = CHAT_SIZES[SCALE]
    raw: dict[str, Any] = {
        "task": "chat",
        "model": CHAT_MODEL,
        "name": name,
        "data": {"source": source, "max_train_samples": s["max_train_samples"],
                 "max_eval_samples": s["max_eval_samples"]},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "learning_rate": 1e-3, "warmup_ratio": 0.1, "eval_every": s["eval_every"],
                  "early_stopping_patience": 0},
        "chat": {"max_new_tokens": s["max_new_tokens"], "sample_prompts": s["sample_prompts"],
                 "eval_at_start": True, "system_prompt": system_prompt},
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    if SCALE == "smoke":
        raw["train"]["threads"] = 1
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.from_dict(raw)


def wait_for_eval(handle: Any, step: int = 0, timeout: float | None = None) -> dict[str, Any]:
    """The evaluation point of a launched run at `step` (0: the base model, before any training step),
    waiting on the run's state, not on a clock: until the point exists or the run has ended (on 2 busy cores
    the first evaluation took 13 minutes, 40 s when quiet). `timeout` (seconds) gives up earlier."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = [p for p in handle.points("eval") if p["step"] == step]
        if found:
            return found[-1]
        record = handle.record
        if record["status"] in ("completed", "failed", "stopped"):
            raise RuntimeError(f"run {handle.id} ended {record['status']} before its step-{step} evaluation: "
                               f"{record['error'] or 'see ' + str(handle.log_path)}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no step-{step} evaluation of run {handle.id} after {timeout:.0f} s: "
                               f"see {handle.log_path}")
        time.sleep(1)


def samples(point: dict[str, Any]) -> pd.DataFrame:
    """An evaluation's sample answers: one row per held-out question, with the reference answer."""
    return pd.DataFrame(point["samples"], columns=["question", "reference", "answer"])


def eval_table(points: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per evaluation of a chat run: held-out loss per answer token and perplexity exp(loss)."""
    rows = [{"step": p["step"], "held-out loss": round(p["eval_loss"], 3), "perplexity": round(p["perplexity"], 2)}
            for p in points if p["kind"] == "eval"]
    return pd.DataFrame(rows).set_index("step")


@contextlib.contextmanager
def base_model(predictor: Any):
    """Inside this block the tuned predictor answers as the base model: its LoRA adapters are switched off."""
    switch = getattr(predictor.model, "disable_adapter", None)
    if switch is None:
        raise ValueError("this run has no adapters to switch off (method full?): train it with method lora")
    with switch():
        yield predictor


def conversation(question: str, answer: str | None = None, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Messages as the chat template reads them: an optional system turn, the question, the answer."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns.append({"role": "user", "content": question})
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def answer_loss(predictor: Any, question: str, reference: str) -> float:
    """The mean loss per answer token of `reference` after `question` (the training loss of one example)."""
    import torch

    enc = predictor.encoder.encode(conversation(question, reference, predictor.system_prompt))
    if enc is None:
        return float("nan")  # the answer did not fit in max_length
    batch = {k: torch.tensor([v]) for k, v in enc.items()}
    with torch.no_grad():
        return float(predictor.model(**batch).loss)


def side_by_side(base: dict[str, Any], tuned: dict[str, Any], predictor: Any) -> pd.DataFrame:
    """The same held-out questions before and after tuning: answers, and the loss of the reference answer."""
    table = samples(base).rename(columns={"answer": "base answer"})
    table["tuned answer"] = samples(tuned)["answer"]
    with base_model(predictor):
        table["base loss"] = [answer_loss(predictor, q, r) for q, r in zip(table["question"], table["reference"])]
    table["tuned loss"] = [answer_loss(predictor, q, r) for q, r in zip(table["question"], table["reference"])]
    return table.round(3)


def persona_table(predictor: Any, questions: list[str], persona: str,
                  plain: str = "You are a helpful assistant.") -> pd.DataFrame:
    """What a system prompt alone does (base model, plain vs persona) and what tuning adds (tuned, persona)."""
    rows = []
    for q in questions:
        with base_model(predictor):
            plain_answer = predictor.answer(conversation(q, system_prompt=plain))
            base_answer = predictor.answer(conversation(q, system_prompt=persona))
        rows.append({"question": q, "base, plain prompt": plain_answer, "base, persona": base_answer,
                     "tuned, persona": predictor.answer(conversation(q, system_prompt=persona))})
    return pd.DataFrame(rows)


def loss_mask(predictor: Any, question: str, answer: str) -> pd.DataFrame:
    """One example as training encodes it: each token, its id, and its label (-100: not in the loss)."""
    enc = predictor.encoder.encode(conversation(question, answer, predictor.system_prompt))
    if enc is None:
        raise ValueError("the answer does not fit in the run's max_length: pick a shorter example")
    tok = predictor.tokenizer
    return pd.DataFrame({"token": [tok.decode([i]) for i in enc["input_ids"]], "id": enc["input_ids"],
                         "label": enc["labels"], "in the loss": [lab != -100 for lab in enc["labels"]]})


def show_mask(mask: pd.DataFrame) -> Any:
    """The encoded example as text: tokens in the loss on green, tokens labelled -100 in grey."""
    from IPython.display import HTML

    cells = []
    for token, on in zip(mask["token"], mask["in the loss"]):
        colour = "background:#c8e6c9; color:#1b5e20" if on else "background:#eeeeee; color:#757575"
        cells.append(f'<span style="{colour}; border:1px solid #bdbdbd; margin:1px; padding:0 2px; '
                     f'white-space:pre">{html.escape(token.replace(chr(10), chr(8629)))}</span>')
    legend = (f"<p>{int(mask['in the loss'].sum())} of {len(mask)} tokens carry a label (green); "
              "the rest are -100 (grey). &#8629; is a line break.</p>")
    return HTML(legend + '<div style="line-height:2; font-family:monospace">' + "".join(cells) + "</div>")


# --- 08_text_regression: a number per text; RMSE, Spearman and the mean-prediction baseline --------------

# MiniLM on the catalog's movie-ratings (-4..+4); "course" keeps the notebook (two runs) under 5 minutes on 2 cores
REGRESSION_SIZES: dict[str, dict[str, int]] = {
    "course": {"max_train_samples": 600, "max_eval_samples": 200, "max_length": 48, "epochs": 2, "batch_size": 16},
    "smoke": {"max_train_samples": 48, "max_eval_samples": 32, "max_length": 32, "epochs": 1, "batch_size": 8},
}


def regression_config(name: str, method: str = "lora", source: str = "movie-ratings",
                      **sections: dict[str, Any]) -> Config:
    """A course-sized text-regression run of the course model; `sections` override fields."""
    s = REGRESSION_SIZES[SCALE]
    raw: dict[str, Any] = {
        "task": "text-regression",
        "model": MODEL,
        "name": name,
        "data": {"source": source, "max_train_samples": s["max_train_samples"],
                 "max_eval_samples": s["max_eval_samples"]},
        "method": {"name": method},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "learning_rate": 1e-3, "early_stopping_patience": 0,
                  # 1 thread: on 2 cores shared with other work (load 8), LoRA ran 6 samples/s on 1 thread and
                  # 0.6-1 on 2 (threads spin while waiting); a quiet machine can set train={"threads": 2}
                  "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.from_dict(raw)


def regression_split(config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and held-out rows (text, value) exactly as a run of `config` splits them."""
    from workbench.tasks.regression import load_regression_data

    data = load_regression_data(config.data, config.train.seed)
    return (pd.DataFrame({"text": data.train_texts, "value": data.train_values}),
            pd.DataFrame({"text": data.eval_texts, "value": data.eval_values}))


def regression_predictions(record: dict[str, Any]) -> pd.DataFrame:
    """Every held-out prediction of a regression run's best evaluation: text, true, predicted, error."""
    import json

    path = Path(record["metrics"]["predictions_file"])
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    table = pd.DataFrame(rows, columns=["text", "true", "predicted"])
    table["error"] = table["predicted"] - table["true"]
    return table


def regression_scores(true: Any, predicted: Any) -> dict[str, float]:
    """RMSE, MAE (lower is better) and the Pearson and Spearman correlations (higher is better)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    y, p = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    constant = np.ptp(p) == 0 or np.ptp(y) == 0  # a correlation with a constant is undefined
    return {"RMSE": float(np.sqrt(np.mean((p - y) ** 2))), "MAE": float(np.mean(np.abs(p - y))),
            "Pearson": float("nan") if constant else float(pearsonr(y, p)[0]),
            "Spearman": float("nan") if constant else float(spearmanr(y, p)[0])}


def scores_table(true: Any, variants: dict[str, Any]) -> pd.DataFrame:
    """One row of regression_scores per named set of predictions of the same true values."""
    return pd.DataFrame({name: regression_scores(true, p) for name, p in variants.items()}).T.round(3)


def regression_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per regression run (indexed by method): its best evaluation's figures and its cost."""
    rows = []
    for r in records:
        info, timings, metrics = r["info"] or {}, r["timings"] or {}, r["metrics"] or {}
        rows.append({"method": r["config"]["method"]["name"],
                     **{k: round(metrics.get(k, float("nan")), 3)
                        for k in ("rmse", "baseline_rmse", "mae", "spearman", "pearson", "r2")},
                     "trainable params": info.get("trainable_params"), "train seconds": timings.get("train_seconds"),
                     "status": r["status"]})
    return pd.DataFrame(rows).set_index("method")


# --- 06_deploy: a trained run reused, the optimize report as a table --------------------------------------

def trained_run(config: Config, home_dir: Any = None) -> dict[str, Any]:
    """A completed run of this config (its name aside) from the store, else one trained now in this process
    (course mode: about a minute on 2 CPU cores). Re-running the lab reuses its run."""
    from workbench import RunStore, train

    store = RunStore(home_dir or home())
    wanted = {k: v for k, v in config.to_dict().items() if k != "name"}
    for r in store.list():
        same = {k: v for k, v in (r.get("config") or {}).items() if k != "name"} == wanted
        if same and r["status"] == "completed" and (Path(r["dir"]) / "model" / "trainable.safetensors").is_file():
            return r
    record = train(config, store=store)
    if record["status"] != "completed":
        raise RuntimeError(f"run {record['id']} ended {record['status']}: {record.get('error') or 'see its log.txt'}")
    return record


def report_table(report: dict[str, Any]) -> pd.DataFrame:
    """The optimize report, one row per artifact against fp32: size, latency, throughput, accuracy, marks."""
    rows = []
    for name, a in [("fp32", report["fp32"]), *report["artifacts"].items()]:
        rows.append({"artifact": name + (f" ({a['backend']})" if a.get("backend") else ""),
                     "size MB": a["size_mb"], "batch-1 p50 ms": a["latency_ms"]["batch_1"]["p50"],
                     "batch-32 p50 ms": a["latency_ms"]["batch_32"]["p50"], "samples/s": a["samples_per_s"],
                     "speedup": a.get("speedup", 1.0), "accuracy": a["accuracy"],
                     "agreement": a.get("agreement", 1.0), "marked": "; ".join(a.get("reasons") or []) or "-"})
    return pd.DataFrame(rows).set_index("artifact")


# --- 04_your_own_data: settings left to the run, and the cheap baseline beside the model ----------------

def own_data_config(name: str, source: str, **sections: dict[str, Any]) -> Config:
    """A course-sized run on a file of one's own with the workbench's defaults: learning rate, max length,
    class weights and the checkpoint metric are left out (None/auto), so the run chooses them from the data
    and says why. Only the epochs stay course-sized (left out, a small file gets up to 40 passes)."""
    raw = config(name, source=source, **sections).to_dict()
    for field in ("learning_rate", "max_length", "class_weights", "best_metric"):
        raw["train"].pop(field, None)
    raw["train"].update({key: value for key, value in sections.get("train", {}).items()})
    return Config.from_dict(raw)


def _figures(figures: dict[str, Any] | None) -> dict[str, Any]:
    figures = figures or {}
    return {"accuracy": _round(figures.get("accuracy")), "macro-F1": _round(figures.get("f1_macro"))}


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, (int, float)) else None


def baseline_table(record: dict[str, Any]) -> pd.DataFrame:
    """The fine-tuned model, the classical baseline and their ensemble on the run's eval split (accuracy,
    macro-F1), and which of them the run answers with."""
    metrics = record.get("metrics") or {}
    by = (metrics.get("answers_with") or {}).get("by")
    rows = {"fine-tuned model": {**_figures(metrics), "answers": by == "fine-tuned"}}
    if metrics.get("baseline"):
        rows["classical baseline (TF-IDF + LR)"] = {**_figures(metrics["baseline"]), "answers": False}
    if metrics.get("ensemble"):
        rows["ensemble of both"] = {**_figures(metrics["ensemble"]), "answers": by == "ensemble"}
    return pd.DataFrame(rows).T


def decisions_table(record: dict[str, Any]) -> pd.DataFrame:
    """What the run chose from the data (info.decisions): setting, value, why."""
    decisions = (record.get("info") or {}).get("decisions") or []
    return pd.DataFrame(decisions, columns=["field", "value", "why"]).set_index("field")


def evaluation_table(result: dict[str, Any]) -> pd.DataFrame:
    """evaluate_file's figures on a separate test file: the run's answer, the fine-tuned model alone (when an
    ensemble answers) and the classical baseline."""
    rows = {f"the run's answer ({result['answers_with']})": _figures(result)}
    if result.get("fine_tuned"):
        rows["the fine-tuned model alone"] = _figures(result["fine_tuned"])
    if result.get("baseline"):
        rows["classical baseline"] = _figures(result["baseline"])
    return pd.DataFrame(rows).T


# --- 09_named_entities: a tag per word, scored as entities; figures per type and the entities missed ------

# MiniLM on the catalog's wnut-16 tweets; "course" keeps the notebook (one run) near 5 minutes on 2 quiet cores
NER_SIZES: dict[str, dict[str, int]] = {
    "course": {"max_train_samples": 600, "max_eval_samples": 200, "max_length": 64, "epochs": 3, "batch_size": 8},
    "smoke": {"max_train_samples": 48, "max_eval_samples": 32, "max_length": 32, "epochs": 1, "batch_size": 8},
}


# full fine-tuning at 2e-4: at course size (600 tweets, 225 steps of 8) it reached entity F1 0.10 after 2 epochs,
# while LoRA (lr 1e-3, 3e-3, 5e-3, 1e-2; 100-225 steps) tagged every word O (token accuracy 0.94, F1 0)
NER_LEARNING_RATES: dict[str, float] = {"full": 2e-4}


def ner_config(name: str, method: str = "full", source: str = "wnut-16", **sections: dict[str, Any]) -> Config:
    """A course-sized named-entity run (task token-classification) of the course model; `sections` override
    fields, e.g. train={"epochs": 5}. Another method than full takes its own default learning rate."""
    s = NER_SIZES[SCALE]
    raw: dict[str, Any] = {
        "task": "token-classification",
        "model": MODEL,
        "name": name,
        "data": {"source": source, "max_train_samples": s["max_train_samples"],
                 "max_eval_samples": s["max_eval_samples"]},
        "method": {"name": method},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "learning_rate": NER_LEARNING_RATES.get(method), "early_stopping_patience": 0,
                  "threads": 1},  # 1 thread: on 2 shared cores, 2 threads spin while they wait (see regression_config)
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.from_dict(raw)


def _sentence_rows(sentences: list[Any]) -> pd.DataFrame:
    from workbench.entities import sentence_spans

    rows = []
    for s in sentences:
        text, spans = sentence_spans(s.tokens, s.tags)
        rows.append({"text": text, "tokens": s.tokens, "tags": s.tags,
                     "entities": [(span["type"], span["text"]) for span in spans]})
    return pd.DataFrame(rows, columns=["text", "tokens", "tags", "entities"])


def ner_split(config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and held-out sentences exactly as a run of `config` splits them: one row per sentence
    with its text, tokens, a tag per token, and its entities as (type, text) pairs."""
    from workbench.tasks.token_classification import load_ner_data

    data = load_ner_data(config.data, config.train.seed)
    return _sentence_rows(data.train), _sentence_rows(data.held)


def entity_counts(train: pd.DataFrame, held_out: pd.DataFrame) -> pd.DataFrame:
    """Entities per type in the training and held-out sentences, the most frequent type first."""
    def count(frame: pd.DataFrame) -> pd.Series:
        return pd.Series([kind for pairs in frame["entities"] for kind, _ in pairs], dtype=object).value_counts()

    table = pd.DataFrame({"training": count(train), "held out": count(held_out)}).fillna(0).astype(int)
    return table.sort_values(["training", "held out"], ascending=False).rename_axis("entity type")


def per_type_table(record: dict[str, Any]) -> pd.DataFrame:
    """The best evaluation's entity-level precision, recall, F1 and support (held-out entities) per type,
    beside the number of training entities of each type; the most frequent type first."""
    per_type = (record.get("metrics") or {}).get("per_type") or {}
    trained = (record.get("info") or {}).get("train_entity_counts") or {}
    rows = [{"entity type": kind, "precision": round(f["precision"], 3), "recall": round(f["recall"], 3),
             "F1": round(f["f1"], 3), "support": f["support"], "training entities": trained.get(kind, 0)}
            for kind, f in per_type.items()]
    table = pd.DataFrame(rows, columns=["entity type", "precision", "recall", "F1", "support", "training entities"])
    return table.sort_values(["support", "training entities"], ascending=False).set_index("entity type")


def best_eval_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every held-out sentence of the run's best evaluation (<run>/eval/step-N.json): text, tokens, gold
    and predicted tags, and gold and predicted spans."""
    import json

    from workbench.run_paths import RunPaths

    path = RunPaths.of(record).eval_step(int(record["metrics"]["step"]))
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def _what_was_said(gold: dict[str, Any], predicted: list[dict[str, Any]]) -> str:
    """What the model predicted where a gold entity is: nothing, another type, or a span with other ends."""
    same_ends = [p for p in predicted if (p["start"], p["end"]) == (gold["start"], gold["end"])]
    if same_ends:
        return f"wrong type: {same_ends[0]['type']}"
    overlapping = [p for p in predicted if p["start"] < gold["end"] and gold["start"] < p["end"]]
    if overlapping:
        return "wrong ends: " + ", ".join(f"{p['text']!r} ({p['type']})" for p in overlapping)
    return "nothing"


def missed_entities(record: dict[str, Any]) -> pd.DataFrame:
    """The gold entities of the best evaluation that the model did not find exactly (type and both ends, as
    the entity-level recall counts them): sentence, type, entity, and what the model predicted there."""
    rows = []
    for row in best_eval_rows(record):
        found = {(p["type"], p["start"], p["end"]) for p in row["predicted_spans"]}
        for gold in row["gold_spans"]:
            if (gold["type"], gold["start"], gold["end"]) not in found:
                rows.append({"sentence": row["index"], "type": gold["type"], "entity": gold["text"],
                             "model said": _what_was_said(gold, row["predicted_spans"]), "text": row["text"]})
    return pd.DataFrame(rows, columns=["sentence", "type", "entity", "model said", "text"])


def entity_spans(answers: list[dict[str, Any]]) -> pd.DataFrame:
    """The entities of `EntityPredictor.predict` answers: one row per entity, with the text it came from."""
    rows = [{"text": a["text"], "type": e["type"], "entity": e["text"], "start": e["start"], "end": e["end"],
             "score": round(e["score"], 3)} for a in answers for e in a["entities"]]
    return pd.DataFrame(rows, columns=["text", "type", "entity", "start", "end", "score"])


# --- 10_fewer_labels ---------------------------------------------------------------------

FEWER_SIZES: dict[str, dict[str, int]] = {
    "course": {"start": 100, "pool": 300, "test": 150, "add": 50, "lm_lines": 300, "epochs": 3, "max_length": 64,
               "batch_size": 16},
    "smoke": {"start": 24, "pool": 60, "test": 24, "add": 8, "lm_lines": 60, "epochs": 1, "max_length": 32,
              "batch_size": 8},
}


def fewer_sets(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Rotten-tomatoes reviews split for the lab, written to `folder`: a small labelled start file, an unlabelled
    pool (its true labels kept aside in `pool_labels`: the lab's stand-in for a person labelling), a test file,
    and raw review lines (reviews none of the others hold) for continued pretraining."""
    from workbench.data import load_catalog_dataset

    s = FEWER_SIZES[SCALE]
    reviews = load_catalog_dataset("rotten-tomatoes").drop_duplicates("text").sample(frac=1.0, random_state=seed)
    cuts = [s["start"], s["start"] + s["pool"], s["start"] + s["pool"] + s["test"]]
    start, pool, test = reviews.iloc[:cuts[0]], reviews.iloc[cuts[0]:cuts[1]], reviews.iloc[cuts[1]:cuts[2]]
    raw = reviews.iloc[cuts[2]: cuts[2] + s["lm_lines"]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"start": folder / "start.csv", "pool": folder / "pool.txt", "test": folder / "test.csv",
             "raw": folder / "reviews.txt"}
    start[["text", "label"]].to_csv(paths["start"], index=False)
    test[["text", "label"]].to_csv(paths["test"], index=False)
    paths["pool"].write_text("\n".join(" ".join(t.split()) for t in pool["text"]) + "\n", encoding="utf-8")
    paths["raw"].write_text("\n".join(" ".join(t.split()) for t in raw["text"]) + "\n", encoding="utf-8")
    pool_labels = {" ".join(t.split()): label for t, label in zip(pool["text"], pool["label"])}
    return {**paths, "pool_labels": pool_labels}


def fewer_config(name: str, source: Any, task: str = "text-classification", model: str | None = None,
                 **sections: dict[str, Any]) -> Config:
    """A course-sized run of the lab: LoRA on `source` (a path), 1 thread, no baseline fuss; `task`
    language-modeling for continued pretraining; `model` run:<id> to start from such a run."""
    s = FEWER_SIZES[SCALE]
    raw: dict[str, Any] = {
        "task": task, "model": model or MODEL, "name": name,
        "data": {"source": str(source), "eval_fraction": 0.2},
        "method": {"name": "lora"},
        "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "max_length": s["max_length"],
                  "early_stopping_patience": 0, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False},
    }
    if task != "text-classification":
        raw["train"]["epochs"] = 1
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.from_dict(raw)


def label_and_add(start: Path, grown: Path, texts: list[str], pool_labels: dict[str, str]) -> int:
    """A copy of the start file with `texts` labelled (by the kept-aside labels, as a person would label them),
    appended with workbench.active.append_labels; returns the rows added."""
    import shutil

    from workbench.active import append_labels

    shutil.copy(start, grown)
    rows = [{"text": t, "label": pool_labels[" ".join(t.split())]} for t in texts]
    return append_labels(grown, rows)


def figures_table(named: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Accuracy and macro-F1 of several evaluate_file results, one row each."""
    return pd.DataFrame([{"model": name, "accuracy": round(r["accuracy"], 3), "macro-F1": round(r["f1_macro"], 3)}
                         for name, r in named.items()])
