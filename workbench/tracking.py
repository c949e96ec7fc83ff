"""Callbacks that record a run: the run store (always), the console, wandb, TensorBoard.

What they write about the data is masked (privacy): the store masks every record it keeps (evaluations
quote mistaken texts), the console masks its lines (a launched run's console is its log.txt); wandb and
TensorBoard get figures only. data.mask_personal: off turns the masking off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from .callbacks import Callback, Evaluated, TrainControl, TrainState
from .config import Config
from .errors import WorkbenchError
from .privacy import stored_text
from .store import RunStore

STOP_POLL_SECONDS = 0.5
FLUSH_SECONDS = 0.5
MISTAKES_IN_STORE = 20


class StoreCallback(Callback):
    """Writes steps and evaluations to the store as training goes, and polls for stop requests. The store
    masks personal data in what it keeps (the worst mistakes' texts, an exception's message).

    Step records are batched and flushed at most every FLUSH_SECONDS (and before every
    evaluation, checkpoint and the end), so a fast model is not slowed by a commit per step
    while a viewer still sees the curve within half a second.
    """

    def __init__(self, store: RunStore, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self._last_poll = 0.0
        self._pending: list[tuple[str, int, dict[str, Any]]] = []
        self._last_flush = 0.0

    def flush(self) -> None:
        if self._pending:
            self.store.add_points(self.run_id, self._pending)
            self._pending = []
        self._last_flush = time.monotonic()

    def on_train_begin(self, state: TrainState, config: dict[str, Any]) -> None:
        self.store.add_point(self.run_id, "event", state.global_step, {
            "event": "train_begin", "max_steps": state.max_steps, "steps_per_epoch": state.steps_per_epoch,
            "warmup_steps": state.warmup_steps, "resumed_from_step": state.global_step})

    def on_step_end(self, state: TrainState, control: TrainControl, loss: float, learning_rate: float,
                    samples_per_second: float) -> None:
        self._pending.append(("train", state.global_step, {
            "loss": loss, "learning_rate": learning_rate, "samples_per_second": samples_per_second,
            "epoch": state.epoch, "max_steps": state.max_steps}))
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_SECONDS:
            self.flush()
        if now - self._last_poll >= STOP_POLL_SECONDS:
            self._last_poll = now
            if self.store.stop_requested(self.run_id):
                control.request_stop("stop requested")

    def on_evaluate(self, state: TrainState, control: TrainControl, result: Evaluated) -> None:
        self.flush()
        data = result.summary()
        data["mistakes"] = result.mistakes[:MISTAKES_IN_STORE]
        data["is_best"] = state.best_step == state.global_step
        self.store.add_point(self.run_id, "eval", state.global_step, data)
        if control.should_stop and control.stop_reason.startswith("early stopping"):
            self.store.add_point(self.run_id, "event", state.global_step,
                                 {"event": "early_stop", "reason": control.stop_reason})

    def on_checkpoint(self, state: TrainState, path: str, is_best: bool) -> None:
        self.flush()
        self.store.add_point(self.run_id, "event", state.global_step,
                             {"event": "checkpoint", "path": path, "is_best": is_best})

    def on_exception(self, state: TrainState, message: str) -> None:
        self.flush()
        self.store.add_point(self.run_id, "event", state.global_step, {"event": "exception", "message": message})

    def on_train_end(self, state: TrainState, status: str, metrics: dict[str, Any]) -> None:
        self.flush()
        self.store.add_point(self.run_id, "event", state.global_step, {"event": "train_end", "status": status})


class ConsoleCallback(Callback):
    """Short progress lines on stdout (at most one every `every` seconds) and each evaluation, masked
    (privacy.stored_text) unless `mask_personal` is "off"."""

    def __init__(self, every: float = 5.0, stream: Any = None, mask_personal: str = "stored") -> None:
        self.every, self.stream, self.mask_personal = every, stream or sys.stdout, mask_personal
        self._last = 0.0

    def _print(self, text: str) -> None:
        print(stored_text(text, self.mask_personal), file=self.stream, flush=True)

    def on_train_begin(self, state: TrainState, config: dict[str, Any]) -> None:
        self._print(f"run {state.run_id}: {state.max_steps} steps ({state.steps_per_epoch} per epoch)"
                    + (f", resuming at step {state.global_step}" if state.global_step else ""))

    def on_step_end(self, state: TrainState, control: TrainControl, loss: float, learning_rate: float,
                    samples_per_second: float) -> None:
        now = time.monotonic()
        if now - self._last >= self.every or state.global_step == state.max_steps:
            self._last = now
            self._print(f"step {state.global_step}/{state.max_steps} epoch {state.epoch + 1} loss {loss:.4f} "
                        f"lr {learning_rate:.2e} {samples_per_second:.1f} samples/s")

    def on_evaluate(self, state: TrainState, control: TrainControl, result: Evaluated) -> None:
        first, *rest = result.report()
        self._print(f"eval step {result.step}: {first}" + (" (best)" if state.best_step == result.step else ""))
        for line in rest:
            self._print(line)

    def on_exception(self, state: TrainState, message: str) -> None:
        self._print(f"run {state.run_id} failed: {message}")

    def on_train_end(self, state: TrainState, status: str, metrics: dict[str, Any]) -> None:
        self._print(f"run {state.run_id} {status}")


class WandbCallback(Callback):
    """Weights & Biases; offline mode writes to the run directory and never touches the network."""

    def __init__(self, mode: str, project: str, run_dir: str, name: str) -> None:
        self.mode, self.project, self.run_dir, self.name = mode, project, run_dir, name
        self.run: Any = None

    def on_train_begin(self, state: TrainState, config: dict[str, Any]) -> None:
        import wandb

        if self.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
            raise WorkbenchError("track.wandb = 'online' needs a wandb API key: run `wandb login` or set "
                                 "WANDB_API_KEY, or use track.wandb: offline")
        self.run = wandb.init(mode=self.mode, project=self.project, name=self.name, id=self.name,
                              dir=self.run_dir, config=config, resume="allow",
                              settings=wandb.Settings(silent=True, console="off"))

    def on_step_end(self, state: TrainState, control: TrainControl, loss: float, learning_rate: float,
                    samples_per_second: float) -> None:
        self.run.log({"train/loss": loss, "train/learning_rate": learning_rate,
                      "train/samples_per_second": samples_per_second}, step=state.global_step)

    def on_evaluate(self, state: TrainState, control: TrainControl, result: Evaluated) -> None:
        self.run.log({f"eval/{k}": v for k, v in result.scalars().items()}, step=state.global_step)

    def on_train_end(self, state: TrainState, status: str, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary["status"] = status
            self.run.finish(exit_code=0 if status != "failed" else 1)
            self.run = None


def _wandb_logged_in() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    try:
        return "api.wandb.ai" in open(netrc, encoding="utf-8").read()
    except OSError:
        return False


class TensorBoardCallback(Callback):
    """TensorBoard event files in <run>/tensorboard."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_train_begin(self, state: TrainState, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.log_dir, purge_step=state.global_step or None)

    def on_step_end(self, state: TrainState, control: TrainControl, loss: float, learning_rate: float,
                    samples_per_second: float) -> None:
        self.writer.add_scalar("train/loss", loss, state.global_step)
        self.writer.add_scalar("train/learning_rate", learning_rate, state.global_step)

    def on_evaluate(self, state: TrainState, control: TrainControl, result: Evaluated) -> None:
        for name, value in result.scalars().items():
            self.writer.add_scalar(f"eval/{name}", value, state.global_step)

    def on_train_end(self, state: TrainState, status: str, metrics: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks(config: Config, store: RunStore, run_id: str, console: bool = True) -> list[Callback]:
    """The store first (so a failing tracker cannot lose the history), then the trackers."""
    run_dir = store.run_dir(run_id)
    callbacks: list[Callback] = [StoreCallback(store, run_id)]
    if console:
        callbacks.append(ConsoleCallback(mask_personal=config.data.mask_personal))
    if config.track.tensorboard:
        callbacks.append(TensorBoardCallback(str(run_dir / "tensorboard")))
    if config.track.wandb != "disabled":
        callbacks.append(WandbCallback(config.track.wandb, config.track.project, str(run_dir), run_id))
    return callbacks
