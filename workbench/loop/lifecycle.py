"""A run's lifecycle, shared by training and the zero-shot baselines: its record in the store, threads,
signals, callbacks, the outcome (completed, stopped, failed) and its reason, timings, and the teardown
that always runs.

The work itself is a function of a `RunContext`. It may register what to do when it is stopped (save a
checkpoint), how to finalise (save the model, return the metrics) and its timings; the lifecycle calls
them at the right moment, whatever happened.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..callbacks import Callback, CallbackList, TrainControl, TrainState
from ..config import Config
from ..errors import StopRequested, WorkbenchError
from ..store import RunStore, private_file, private_files
from ..tracking import default_callbacks
from ..run_paths import LOG_FILE

INTERNAL_ERROR = "internal error: "


@dataclass
class RunContext:
    """What the work of a run sees, and what it registers for the lifecycle."""

    config: Config
    store: RunStore
    run_id: str
    run_dir: Path
    state: TrainState
    control: TrainControl
    hooks: Callback
    main: bool
    save_on_stop: Callable[[], None] | None = None  # a stopped run's checkpoint (main process)
    finalise: Callable[[str], dict[str, Any] | None] | None = None  # save the model, return the metrics
    timings: Callable[[], dict[str, Any]] = dict  # the work's own timings
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # undone at the end, newest first


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator on a GPU, else the peak resident size of its own address
    space (Linux's VmHWM). Not ru_maxrss there: Linux carries it over fork and exec, so a run launched from a
    2 GB notebook kernel would report at least 2 GB whatever it used itself (measured: a child of a 1 GiB
    process reported 1,037 MiB through ru_maxrss, 13 MiB through VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; bytes on macOS


def run_lifecycle(config: Config, store: RunStore, run_id: str | None, callbacks: list[Callback] | None,
                  work: Callable[[RunContext], None], device: torch.device, main: bool = True,
                  share: Callable[[str], str] = lambda run_id: run_id) -> dict[str, Any]:
    """Register (or resume) the run, do `work`, and record its outcome; returns the run's record.

    `share` hands the main process's run id to the others (torchrun); `main` is whether this process writes
    the store. Every file the run writes meanwhile (checkpoints, evaluations quoting the data, logs,
    TensorBoard and wandb files) is owner-only: they are written by torch and the trackers, so a umask is the
    one place that reaches them all.
    """
    with private_files():
        return _run_lifecycle(config, store, run_id, callbacks, work, device, main, share)


def _run_lifecycle(config: Config, store: RunStore, run_id: str | None, callbacks: list[Callback] | None,
                   work: Callable[[RunContext], None], device: torch.device, main: bool,
                   share: Callable[[str], str]) -> dict[str, Any]:
    previous_threads = torch.get_num_threads()  # restored at the end: a notebook kernel keeps its own
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if main:
        run_id = store.create_run(config.to_dict(), config.name) if run_id is None else store.resolve(run_id)
        store.mark_running(run_id, os.getpid())
    run_id = share(run_id)
    run_dir = store.run_dir(run_id)
    state = TrainState(run_id=run_id, is_main_process=main)
    hooks = CallbackList((default_callbacks(config, store, run_id) if main else []) + list(callbacks or []))
    ctx = RunContext(config, store, run_id, run_dir, state, TrainControl(), hooks, main)
    status, metrics, error = "failed", None, None
    wall_start = time.perf_counter()
    previous_signals = install_signal_handlers(ctx.control)
    try:
        work(ctx)
        status = "completed"
    except StopRequested as stop:
        status = "stopped" if "early stopping" not in str(stop) else "completed"
        if status == "stopped" and main and ctx.save_on_stop is not None:
            ctx.save_on_stop()
    except WorkbenchError as exc:
        error = str(exc)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; resume starts from the last checkpoint
        status = "stopped"
    except Exception as exc:  # a crash: the run is marked failed with the reason and the traceback's file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{INTERNAL_ERROR}{type(exc).__name__}: {detail} (traceback in {run_dir / LOG_FILE})"
        log_traceback(run_dir)
    finally:
        restore_signal_handlers(previous_signals)
        torch.set_num_threads(previous_threads)
        for undo in reversed(ctx.cleanups):
            undo()
        try:
            if status in ("completed", "stopped") and ctx.finalise is not None:
                metrics = ctx.finalise(status)
        except Exception as exc:  # finalising must not hide the run's outcome
            status, error = "failed", f"could not save the final model: {type(exc).__name__}: {exc}"
            log_traceback(run_dir)
        if error is not None:
            status = "failed"
            hooks.on_exception(state, error)
        timings = {"wall_seconds": round(time.perf_counter() - wall_start, 3), **ctx.timings(),
                   "peak_memory_mb": round(peak_memory_mb(device), 1)}
        if main:
            store.finish(run_id, status, metrics=metrics, timings=timings, error=error)
        hooks.on_train_end(state, status, metrics or {})
    return store.get(run_id) if main else {"id": run_id, "status": status}


def install_signal_handlers(control: TrainControl) -> dict[int, Any]:
    """SIGTERM and a first Ctrl-C ask for a cooperative stop: the step ends, a checkpoint is saved, the run
    is 'stopped'. A second Ctrl-C interrupts at once."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and control.should_stop:
            raise KeyboardInterrupt
        control.request_stop("stopped by signal")

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a widget's worker thread)
            pass
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        try:
            signal.signal(sig, handler)
        except (ValueError, TypeError):
            pass


def log_traceback(run_dir: Path) -> None:
    """The current exception's traceback into the run's log, personal data masked (a message may quote data)."""
    from ..privacy import mask_text

    text = mask_text(traceback.format_exc())
    try:
        with os.fdopen(private_file(run_dir / LOG_FILE), "a", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        print(text, file=sys.stderr)
