"""Events the training loop emits, and the state and control objects hooks see.

Hooks receive plain Python values (floats, ints, lists, dicts): no tensors cross
this boundary. A hook reads `TrainState`; the only thing it may change is
`TrainControl.should_stop`, which the loop honours at the next step boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class TrainState:
    """Where the loop is. Read by hooks, written by the loop only."""

    run_id: str = ""
    epoch: int = 0  # 0-based epoch in progress
    global_step: int = 0  # optimiser steps done
    max_steps: int = 0
    steps_per_epoch: int = 0
    warmup_steps: int = 0
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    is_main_process: bool = True


@dataclass
class TrainControl:
    """What hooks may ask of the loop."""

    should_stop: bool = False
    stop_reason: str = ""

    def request_stop(self, reason: str = "stop requested") -> None:
        self.should_stop = True
        self.stop_reason = reason


class Evaluated(Protocol):
    """What the hooks read of one evaluation (the concrete result is tasks.base.EvalResult)."""

    step: int
    mistakes: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """The figures and the task's own values, as stored per evaluation point."""

    def scalars(self) -> dict[str, float]:
        """The figures trackers plot, by name."""

    def report(self) -> list[str]:
        """The console's lines."""


class Callback:
    """Base class of no-op hooks. Subclass and override the ones you need."""

    def on_train_begin(self, state: TrainState, config: dict[str, Any]) -> None:
        """Called once, after the model and data are ready and before the first step."""

    def on_step_end(self, state: TrainState, control: TrainControl, loss: float, learning_rate: float,
                    samples_per_second: float) -> None:
        """Called after each optimiser step with the step's mean training loss."""

    def on_evaluate(self, state: TrainState, control: TrainControl, result: Evaluated) -> None:
        """Called after each evaluation with its metrics and confusion matrix."""

    def on_checkpoint(self, state: TrainState, path: str, is_best: bool) -> None:
        """Called after a checkpoint was written to `path`."""

    def on_exception(self, state: TrainState, message: str) -> None:
        """Called when the run fails; `message` is the one-line reason."""

    def on_train_end(self, state: TrainState, status: str, metrics: dict[str, Any]) -> None:
        """Called last, always: after completion, a stop or a failure."""


class CallbackList(Callback):
    """Fans each event out to several callbacks, in order."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def on_train_begin(self, state: TrainState, config: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(state, config)

    def on_step_end(self, state: TrainState, control: TrainControl, loss: float, learning_rate: float,
                    samples_per_second: float) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state, control, loss, learning_rate, samples_per_second)

    def on_evaluate(self, state: TrainState, control: TrainControl, result: Evaluated) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(state, control, result)

    def on_checkpoint(self, state: TrainState, path: str, is_best: bool) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(state, path, is_best)

    def on_exception(self, state: TrainState, message: str) -> None:
        for cb in self.callbacks:
            cb.on_exception(state, message)

    def on_train_end(self, state: TrainState, status: str, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state, status, metrics)
