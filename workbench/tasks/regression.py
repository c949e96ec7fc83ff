"""Text regression (`task: text-regression`): one number per text, e.g. a review's 1-10 rating.

- Data: a text column and a numeric column (data.label_column, else one named score/rating/stars/value/
  label/target, else the only numeric column). Rows whose value is not a number are dropped and counted;
  blank texts and exact duplicates too. A seeded split holds out data.eval_fraction (or data.eval_source).
- Model: an encoder with a one-output head (transformers' regression problem type). The target is
  standardised with the training rows' mean and standard deviation, so the head starts near the answer's
  scale whatever the units; predictions are mapped back. Methods: full, head-only, lora, qlora, adalora,
  ia3, prompt-tuning (config.REGRESSION_METHODS).
- Loss: mean squared error on the standardised target, a mean over the batch's rows. Under train.truncation
  "chunks" a long text is several rows (its chunks, each with the text's value), and a text's answer in
  evaluation, predict and serve is the mean of its chunks' values, so every figure is per text.
- Evaluation: RMSE, MAE, Pearson and Spearman correlation, R^2, and the RMSE of predicting the training
  mean for every row (the baseline a model must beat); the worst errors; every prediction in
  <run>/eval/step-N.json for the scatter plot. The best checkpoint has the lowest RMSE.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..catalog import ModelSource, resolve_model
from ..config import Config, DataConfig
from ..data import VALUE_NAMES, detect_columns, load_table
from ..errors import WorkbenchError
from ..models.built import CHUNK_BATCH, BuiltModel, pool_chunks, predictor_encodings, text_indices
from ..models.classifier import build_model, check_model_fits
from ..models.state import load_trainable_state, set_seed
from ..task_table import spec_for
from .base import Evaluation, EvalResult
from .classification import (chunk_info, encoder_run_info, gather_outputs, pad_batch, shown_text,
                             trained_model_dir, write_json)
from ..run_paths import RunPaths, TASK_FILE, TRAINABLE_FILE

WORST_KEPT = 50
OUTPUT = ["value"]  # the head's one output


@dataclass
class RegressionData:
    """Texts and their numbers, split, with the training target's mean and spread."""

    train_texts: list[str]
    train_values: list[float]
    eval_texts: list[str]
    eval_values: list[float]
    source: str
    text_column: str
    value_column: str
    mean: float = 0.0
    std: float = 1.0
    rows_read: int = 0
    notes: list[str] = field(default_factory=list)


def _value_column(df: Any, cfg: DataConfig) -> str:
    columns = [str(c) for c in df.columns]
    if cfg.label_column is not None:
        if cfg.label_column not in columns:
            raise WorkbenchError(f"data.label_column = {cfg.label_column!r} not found: columns found are "
                                 f"{', '.join(columns)}")
        return cfg.label_column
    lower = {c.lower(): c for c in columns}
    named = next((lower[n] for n in VALUE_NAMES if n in lower and lower[n] != cfg.text_column), None)
    if named is not None:
        return named
    import pandas as pd

    numeric = [c for c in columns if c != cfg.text_column and pd.api.types.is_numeric_dtype(df[c])]
    if len(numeric) == 1:
        return numeric[0]
    raise WorkbenchError(f"no numeric value column detected among {', '.join(columns)}: set data.label_column "
                         "to the column holding the number to predict")


def _read(source: str, cfg: DataConfig, notes: list[str]) -> tuple[list[str], list[float], str, str, int]:
    import pandas as pd

    df, _ = load_table(source)
    if df.empty:
        raise WorkbenchError(f"data source {source!r} has no rows: add rows with a text and a number")
    df = df.rename(columns=str)
    value_col = _value_column(df, cfg)
    text_col, _ = detect_columns(df, cfg.text_column, value_col)
    values = pd.to_numeric(df[value_col], errors="coerce")
    texts = df[text_col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    keep = values.notna() & np.isfinite(values.fillna(0)) & (texts.str.strip() != "")
    dropped = int((~keep).sum())
    if dropped:
        notes.append(f"dropped {dropped} rows of {source} without a text or a numeric {value_col!r}")
    table = pd.DataFrame({"text": texts[keep], "value": values[keep].astype(float)}).drop_duplicates()
    if len(table) < 2:
        raise WorkbenchError(f"data source {source!r} has {len(table)} rows with a text and a numeric "
                             f"{value_col!r}: a regression needs more (is data.label_column the number to predict?)")
    return table["text"].tolist(), table["value"].tolist(), text_col, value_col, len(df)


def load_regression_data(cfg: DataConfig, seed: int) -> RegressionData:
    """Read, clean and split the texts and numbers the config names."""
    notes: list[str] = []
    texts, values, text_col, value_col, rows = _read(cfg.source, cfg, notes)
    if cfg.eval_source:
        eval_texts, eval_values, *_ = _read(cfg.eval_source, cfg, notes)
        train = list(range(len(texts)))
    else:
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * cfg.eval_fraction))
        if n_eval >= len(order):
            raise WorkbenchError(f"only {len(order)} usable rows: too few to hold some out; add rows or lower "
                                 "data.eval_fraction")
        held, train = order[:n_eval], order[n_eval:]
        eval_texts, eval_values = [texts[i] for i in held], [values[i] for i in held]
    if cfg.max_eval_samples is not None:
        eval_texts, eval_values = eval_texts[: cfg.max_eval_samples], eval_values[: cfg.max_eval_samples]
    train = train[: cfg.max_train_samples] if cfg.max_train_samples is not None else train
    train_values = [values[i] for i in train]
    std = float(np.std(train_values))
    if std == 0.0:
        raise WorkbenchError(f"every training row of {cfg.source!r} has the value {train_values[0]}: nothing to "
                             "learn; check data.label_column")
    return RegressionData([texts[i] for i in train], train_values, eval_texts, eval_values, cfg.source, text_col,
                          value_col, float(np.mean(train_values)), std, rows, notes)


def regression_result(step: int, epoch: float, y_true: np.ndarray, y_pred: np.ndarray, train_mean: float,
                      texts: list[str], mask_personal: str = "stored") -> EvalResult:
    """The figures of one evaluation (scikit-learn and scipy do the arithmetic) and the worst errors, their
    texts masked as data.mask_personal (`mask_personal`) says."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    constant = np.ptp(y_pred) == 0 or np.ptp(y_true) == 0  # correlation is undefined for a constant
    errors = np.abs(y_pred - y_true)
    worst = np.argsort(-errors, kind="stable")[:WORST_KEPT]
    mse = float(mean_squared_error(y_true, y_pred))
    rmse = math.sqrt(mse)
    spearman = float("nan") if constant else float(spearmanr(y_true, y_pred)[0])
    pearson = float("nan") if constant else float(pearsonr(y_true, y_pred)[0])
    mae = float(mean_absolute_error(y_true, y_pred))
    baseline_rmse = float(np.sqrt(np.mean((y_true - train_mean) ** 2)))
    line = f"  mean baseline rmse {baseline_rmse:.4f}, pearson {pearson:.3f}"
    return EvalResult(
        step, float(epoch), mse, {"rmse": rmse, "mae": mae, "spearman": spearman},
        {"pearson": pearson, "r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else float("nan"),
         "baseline_rmse": baseline_rmse, "labels": [], "confusion_matrix": []},
        mistakes=[{"index": int(i), "text": shown_text(texts[i], mask_personal), "true": float(y_true[i]),
                   "predicted": float(y_pred[i]), "error": float(y_pred[i] - y_true[i])} for i in worst],
        lines=[line])


SPEC = spec_for("regression:RegressionTask")


class RegressionTask:
    name = SPEC.name
    best_metric = SPEC.best_metric
    greater_is_better = SPEC.greater_is_better
    examples = "training rows"

    def load_data(self, config: Config, home: Path) -> RegressionData:
        return load_regression_data(config.data, config.train.seed)

    def train_size(self, data: RegressionData) -> int:
        return len(data.train_texts)

    def check_model(self, config: Config, source: ModelSource, data: RegressionData) -> None:
        check_model_fits(config, source, 1, regression=True)

    def build(self, config: Config, source: ModelSource, data: Any, total_steps: int | None) -> BuiltModel:
        built = build_model(config, source, OUTPUT, total_steps=total_steps, regression=True)
        built.truncation = config.train.truncation
        return built

    def fit_baseline(self, config: Config, data: RegressionData, run_dir: Path) -> dict[str, Any] | None:
        """TF-IDF + ridge regression on this run's split, scored like the model (None when switched off)."""
        if not config.train.baseline:
            return None
        from scipy.stats import spearmanr

        from ..classical import REGRESSION_DESCRIPTION, fit_regressor
        from .ensemble import CLASSICAL_DIR, SUMMARY_FILE

        model = fit_regressor(data.train_texts, data.train_values)
        predicted, truth = model.values(data.eval_texts), np.asarray(data.eval_values, dtype=np.float64)
        rho = spearmanr(truth, predicted).statistic if len(set(predicted.round(9))) > 1 else 0.0
        summary = {"method": REGRESSION_DESCRIPTION, "rmse": float(np.sqrt(np.mean((predicted - truth) ** 2))),
                   "mae": float(np.mean(np.abs(predicted - truth))),
                   "spearman": float(rho) if np.isfinite(rho) else 0.0, "seconds": round(model.seconds, 2)}
        model.save(run_dir / CLASSICAL_DIR)
        write_json(run_dir / CLASSICAL_DIR / SUMMARY_FILE, summary)
        return summary

    def encode(self, config: Config, built: BuiltModel, data: RegressionData) -> tuple[list[dict], list[dict]]:
        def standardised(texts: list[str], values: list[float]) -> list[dict]:
            encoded = built.encode(texts, config.train.max_length)  # a chunk carries its text's value
            return [{**e, "labels": [(values[owner] - data.mean) / data.std]}
                    for e, owner in zip(encoded, text_indices(encoded))]

        return standardised(data.train_texts, data.train_values), standardised(data.eval_texts, data.eval_values)

    def collate(self, built: BuiltModel, examples: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
        batch = pad_batch(built.tokenizer, [examples[i] for i in indices])
        batch["labels"] = batch["labels"].float()
        return batch

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def loss(self, built: BuiltModel, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss  # transformers' mean squared error (problem_type regression)

    def run_info(self, config: Config, built: BuiltModel, data: RegressionData, train: list[dict],
                 held: list[dict]) -> dict[str, Any]:
        return {"task": self.name, "train_rows": len(data.train_texts),
                "eval_rows": len(data.eval_texts), "text_column": data.text_column,
                "label_column": data.value_column, "labels": [], "target_mean": data.mean, "target_std": data.std,
                "data_notes": data.notes, **encoder_run_info(built), **chunk_info(train, held)}

    def eval_at_start(self, config: Config) -> bool:
        return False

    def evaluate(self, model: torch.nn.Module, accelerator: Any, config: Config, built: BuiltModel,
                 data: RegressionData, held: list[dict], step: int, epoch: float) -> Evaluation:
        outputs = gather_outputs(model, accelerator, built.tokenizer, held, config.train.effective_eval_batch_size)
        standardised = pool_chunks(outputs[:, 0].double().numpy(), text_indices(held), len(data.eval_texts))
        predicted = standardised * data.std + data.mean
        if not np.isfinite(predicted).all():
            raise WorkbenchError(f"predictions are not finite at step {step}: lower train.learning_rate")
        result = regression_result(step, epoch, np.asarray(data.eval_values), predicted, data.mean, data.eval_texts,
                                   getattr(data, "mask_personal", "stored"))
        return Evaluation(result, result["rmse"], predicted)

    def write_evaluation(self, run_dir: Path, evaluation: Evaluation, data: RegressionData) -> None:
        mode = getattr(data, "mask_personal", "stored")
        rows = [{"index": i, "text": shown_text(t, mode), "true": y, "predicted": float(p)}
                for i, (t, y, p) in enumerate(zip(data.eval_texts, data.eval_values, evaluation.details))]
        step = evaluation.result.step
        write_json(RunPaths(run_dir).eval_step(step), {"step": step, "task": self.name, "rows": rows})

    def model_files(self, data: RegressionData) -> dict[str, Any]:
        return {TASK_FILE: {"task": self.name, "target_mean": data.mean, "target_std": data.std}}

    def final_metrics(self, best: dict[str, Any], first: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
        summary = {k: v for k, v in best.items() if k not in ("seq", "kind", "time", "mistakes")}
        summary["predictions_file"] = str(RunPaths(run_dir).eval_step(best['step']))
        from .ensemble import baseline_summary

        baseline = baseline_summary(run_dir)
        if baseline is not None:
            summary["baseline"] = baseline
        return summary

    def load_predictor(self, record: dict[str, Any], home: Path) -> "RegressionPredictor":
        from safetensors.torch import load_file

        config, model_dir = Config.from_dict(record["config"]), trained_model_dir(record)
        target = json.loads((model_dir / TASK_FILE).read_text())
        set_seed(config.train.seed)
        built = self.build(config, resolve_model(config.model, home, config.trust_remote_code), None, None)
        load_trainable_state(built.model, load_file(str(model_dir / TRAINABLE_FILE)))
        return RegressionPredictor(built.model, built.tokenizer, config.train.max_length, target["target_mean"],
                                   target["target_std"], record["id"], built.encode)


class RegressionPredictor:
    """A trained regressor: `predict(texts)` gives each text's value, in the training data's units."""

    task = SPEC.name

    def __init__(self, model: Any, tokenizer: Any, max_length: int, mean: float, std: float, run_id: str = "",
                 encode: Any = None) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.mean, self.std, self.run_id = mean, std, run_id
        self.encode = encode  # BuiltModel.encode: texts read as in training (train.truncation)

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            texts = [texts]
        out: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            part = texts[start: start + batch_size]
            out.extend({"text": t, "value": float(v) * self.std + self.mean}
                       for t, v in zip(part, self.standardised(part).tolist()))
        return out

    def standardised(self, texts: list[str]) -> np.ndarray:
        """The head's output per text (the standardised value): a text read as chunks gets their mean."""
        encodings = predictor_encodings(self.tokenizer, self.encode, texts, self.max_length)
        device = next(self.model.parameters()).device
        step = CHUNK_BATCH if len(encodings) > len(texts) else max(1, len(encodings))  # chunks can be many
        raw = []
        for start in range(0, len(encodings), step):
            batch = pad_batch(self.tokenizer, encodings[start: start + step])
            with torch.no_grad():
                raw.append(self.model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].double().cpu())
        values = torch.cat(raw).numpy() if raw else np.zeros(0)
        return pool_chunks(values, text_indices(encodings), len(texts))
