"""The Task protocol: what the training loop asks of a task, and nothing it does itself.

A task knows its data (how to read, split and check it), its model (how to build it for a method), its
examples (how to encode and batch them, and what the loss is a mean over), its evaluation (the figures,
which one picks the best checkpoint, and the predictions file), and how to answer with a trained run.
The loop (workbench/loop/) owns everything else: the run record, seeding, processes, signals, stop,
resume, checkpoints, timings, callbacks and failures. Tasks are registered in `workbench/tasks/__init__.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..catalog import ModelSource
from ..config import Config


@dataclass
class EvalResult:
    """One evaluation of any task, as plain values: the figures by name (the first is the headline, every one
    is plotted), the task's own values for its viewer, and the worst mistakes to drill into.

    `summary()` is what the store keeps per evaluation point and the widgets read; `scalars()` what curves,
    TensorBoard and wandb plot; `report()` the console's lines (the figures, then the task's own lines)."""

    step: int
    epoch: float
    eval_loss: float
    metrics: dict[str, float]
    payload: dict[str, Any] = field(default_factory=dict)
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> float:
        """A figure by name (`result["accuracy"]`)."""
        return self.metrics[name]

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": float(self.epoch), "eval_loss": self.eval_loss, **self.metrics,
                **self.payload}

    def scalars(self) -> dict[str, float]:
        return {**self.metrics, "loss": self.eval_loss}

    def report(self) -> list[str]:
        figures = " ".join(f"{k} {_shown(v)}" for k, v in self.metrics.items())
        return [f"{figures} eval_loss {self.eval_loss:.4f}".strip(), *self.lines]


def _shown(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


@dataclass
class Evaluation:
    """One evaluation as the loop sees it: the result for hooks and the store, the number that decides
    the best checkpoint, and whatever the task writes to the predictions file (main process only)."""

    result: EvalResult
    metric: float
    details: Any = None
    # False while the model answers every eval row with one class (a classifier still on its first plateau):
    # such an evaluation does not count toward early stopping's patience, since the figure cannot move yet
    learned: bool = True


class Predictor(Protocol):
    """A trained run that answers: one dict per text, in order."""

    task: str
    run_id: str

    def predict(self, texts: str | list[str], batch_size: int = ...) -> list[dict[str, Any]]:
        """The answer for each text (label and scores, value, answer or translation)."""


class Task(Protocol):
    """What one task (text-classification, text-regression, chat, seq2seq) supplies to the loop."""

    name: str
    best_metric: str  # the evaluation figure that picks the best checkpoint and drives early stopping
    greater_is_better: bool
    examples: str  # what a training row is called in messages ("training rows", "training conversations")

    def load_data(self, config: Config, home: Path) -> Any:
        """Read, check, de-duplicate and split the data the config names (no weights)."""

    def train_size(self, data: Any) -> int:
        """How many training examples `data` holds."""

    def check_model(self, config: Config, source: ModelSource, data: Any) -> None:
        """Every model check that needs no weights: kind, context length, method, adapter targets."""

    def build(self, config: Config, source: ModelSource, data: Any, total_steps: int | None) -> Any:
        """The model with the method applied: an object with model, tokenizer, trainable_params,
        total_params and target_modules (`total_steps`: adalora's pruning schedule)."""

    def encode(self, config: Config, built: Any, data: Any) -> tuple[list[dict], list[dict]]:
        """Training and held-out examples as token ids, unpadded."""

    def collate(self, built: Any, examples: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
        """A padded batch of `indices`, with the labels the model's loss reads."""

    def loss(self, built: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean loss (`model` is `built.model`, wrapped for processes where distributed)."""

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """What the batch's loss is a mean over (rows, or the tokens the loss is on): the loop weights each
        micro-batch by its share of the step's total, so accumulation gives the gradient of one big batch."""

    def run_info(self, config: Config, built: Any, data: Any, train: list[dict], held: list[dict]) -> dict:
        """What the run record says about the data and the model (plain values)."""

    def eval_at_start(self, config: Config) -> bool:
        """Whether the untrained model is evaluated at step 0 too."""

    def evaluate(self, model: torch.nn.Module, accelerator: Any, config: Config, built: Any, data: Any,
                 held: list[dict], step: int, epoch: float) -> Evaluation:
        """Evaluate on every held-out example (all processes take part)."""

    def fit_baseline(self, config: Config, data: Any, run_dir: Path) -> dict[str, Any] | None:
        """Fit and score the classical baseline on the run's split, saved in the run folder; its figures for
        the record, named as the run's own (None where a task has none, or train.baseline is off)."""

    def write_evaluation(self, run_dir: Path, evaluation: Evaluation, data: Any) -> None:
        """<run>/eval/step-N.json: the predictions (or samples) a viewer drills into."""

    def model_files(self, data: Any) -> dict[str, Any]:
        """JSON files saved next to the trained weights (labels.json, task.json), by file name."""

    def final_metrics(self, best: dict[str, Any], first: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
        """The run's metrics from the store's eval point at the best step (and the first one)."""

    def load_predictor(self, record: dict[str, Any], home: Path) -> Predictor:
        """Rebuild a finished run's model (base weights and the run's trained parameters)."""
