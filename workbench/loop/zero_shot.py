"""A zero-shot baseline as a run: the pretrained model's one evaluation at step 0, in the run lifecycle.

Nothing is trained, so there is nothing to resume: resuming re-evaluates from the start. The evaluation
itself (embedding similarity, label-token scoring) is in tasks/zeroshot.py.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from ..callbacks import Callback
from ..config import Config
from ..data import prepare
from ..models.state import set_seed
from ..store import RunStore
from ..tasks.classification import ClassificationTask, classification_result, split_info
from ..tasks.base import Evaluation
from ..tasks.ensemble import fit_baseline
from ..tasks.zeroshot import check_zero_shot, device, evaluate_zero_shot
from .lifecycle import RunContext, run_lifecycle
from ..run_paths import RunPaths

STOP_POLL_SECONDS = 0.5


def run_zero_shot(config: Config, store: RunStore, run_id: str | None = None,
                  callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Evaluate the untrained model as a run (completed, stopped or failed) and return its record."""
    return run_lifecycle(config, store, run_id, callbacks, _evaluate, device())


def _evaluate(ctx: RunContext) -> None:
    config, store, run_id = ctx.config, ctx.store, ctx.run_id
    store.truncate_points(run_id, -1)  # a re-run starts its history over
    eval_seconds, rows = [0.0], [0]
    ctx.timings = lambda: {"train_seconds": 0.0, "eval_seconds": round(eval_seconds[0], 3),
                           "samples_per_second": 0.0,  # training samples: none
                           "eval_samples_per_second": round(rows[0] / eval_seconds[0], 3) if eval_seconds[0] else 0.0,
                           "steps": 0}
    set_seed(config.train.seed)
    split = prepare(config.data, config.train.seed)  # the same split as every training method
    source = check_zero_shot(config, store.home, split)
    ctx.hooks.on_train_begin(ctx.state, config.to_dict())

    start = time.perf_counter()
    scores, details, total = evaluate_zero_shot(config, source, split, _stop_check(ctx))
    store.set_info(run_id, {**split_info(split), "trainable_params": 0, "total_params": total,
                            "trainable_percent": 0.0, "head_modules": [], "target_modules": [],
                            "num_processes": 1, "torch_threads": torch.get_num_threads(), "zero_shot": details})
    logp = torch.log_softmax(torch.from_numpy(scores), dim=-1)
    y = torch.tensor(split.eval_labels)
    loss = float(-logp[torch.arange(len(y)), y].mean())
    probs = logp.exp().numpy()
    result = classification_result(0, 0.0, split.labels, np.asarray(split.eval_labels), probs, loss, split.eval_texts,
                                   config.data.mask_personal)
    rows[0] = len(y)
    ctx.state.best_metric, ctx.state.best_step = result["accuracy"], 0
    ctx.hooks.on_evaluate(ctx.state, ctx.control, result)
    ClassificationTask().write_evaluation(ctx.run_dir, Evaluation(result, result["accuracy"], probs), split)
    eval_seconds[0] = time.perf_counter() - start
    metrics = {**result.summary(), "is_best": True, "best_step": 0,
               "predictions_file": str(RunPaths(ctx.run_dir).eval / "step-0.json")}
    baseline = fit_baseline(config, split.train_texts, split.train_labels, split.eval_texts, split.eval_labels,
                            split.labels, ctx.run_dir)  # the classical model beside the zero-shot one
    if baseline is not None:
        metrics["baseline"] = {k: v for k, v in baseline.items() if k not in ("metric", "ensemble")}
    ctx.finalise = lambda status: metrics


def _stop_check(ctx: RunContext) -> Callable[[], bool]:
    """True once a stop was asked, by a signal (control) or through the store (another process)."""
    last = [0.0]

    def should_stop() -> bool:
        now = time.monotonic()
        if now - last[0] >= STOP_POLL_SECONDS:
            last[0] = now
            if ctx.store.stop_requested(ctx.run_id):
                ctx.control.request_stop("stop requested")
        return ctx.control.should_stop

    return should_stop
