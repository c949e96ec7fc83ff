"""The training loop: one function, top to bottom, on accelerate for devices and processes.

`accelerate.Accelerator` owns the device, mixed precision and the process group
(so the same loop runs under `torchrun` with DDP on CPU/gloo or GPUs/NCCL); this
file owns the order of things. Checkpoints are our own small, safe format
(safetensors for weights) so that a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .callbacks import Callback, CallbackList, EvalResult, TrainControl, TrainState
from .catalog import resolve_model
from .config import GENERATION_TASKS, Config
from .data import Split, prepare
from .errors import StopRequested, WorkbenchError
from .kernels import use_fast_dropout
from .methods import BuiltModel, after_optimizer_step, build_model, enable_gradient_checkpointing
from .metrics import classification_result
from .store import RunStore

BEST_METRIC = "accuracy"
INTERNAL_ERROR = "internal error: "


def preflight(config: Config, home: Path) -> Split:
    """Every check that needs no weights: data, columns, labels, model config, limits, LoRA targets.

    Runs before a run is registered, so a typo never leaves a failed run behind.
    """
    from .methods import check_model_fits

    if config.task in GENERATION_TASKS:  # chat, seq2seq: their own data (conversations, source/target pairs)
        from .chat import preflight_generation

        return preflight_generation(config, home)  # type: ignore[return-value]
    split = prepare(config.data, config.train.seed)
    if config.method.is_zero_shot:
        from .zeroshot import check_zero_shot

        check_zero_shot(config, home, split)
        return split
    _check_batch_fits(config, split, 1)
    check_model_fits(config, resolve_model(config.model, home, config.trust_remote_code), len(split.labels))
    return split


@dataclass
class Progress:
    """What a checkpoint must remember besides weights and optimiser state."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    global_step: int = 0
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0  # optimiser steps only
    eval_seconds: float = 0.0


# --- small helpers ---------------------------------------------------------------

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; depends only on (seed, epoch), so resume can replay it."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def shard_batches(order: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Split one epoch into this process's micro-batches; every process gets the same count."""
    per_step = batch_size * world
    steps = math.ceil(len(order) / per_step)
    if world > 1:  # pad by wrapping around, as DistributedSampler does
        order = (order * (1 + steps * per_step // max(len(order), 1)))[: steps * per_step]
    mine = order[rank::world]
    return [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]


def collate(tokenizer: Any, encodings: list[dict[str, list[int]]], indices: list[int],
            labels: list[int] | None) -> dict[str, torch.Tensor]:
    """Pad a micro-batch on the tokenizer's padding side (left for a causal-LM classifier)."""
    batch = tokenizer.pad([encodings[i] for i in indices], return_tensors="pt")
    if labels is not None:
        batch["labels"] = torch.tensor([labels[i] for i in indices])
    return dict(batch)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise WorkbenchError(f"checkpoint does not fit this model ({missing[0]!r} unknown): "
                             "was it made with another model or method?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def accumulate_gradients(model: torch.nn.Module, accelerator: Any,
                         micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Backward over one optimiser step's micro-batches; returns the step's mean loss.

    Each micro-batch loss (a mean over its examples) is weighted by its share of
    the step's examples, so gradients and loss equal those of one big batch,
    whatever the accumulation and however uneven the last micro-batch (TRAPS.md:
    HF Trainer multiplies both by the accumulation steps for classifiers).
    """
    total = sum(len(b["labels"]) for b in micro_batches)
    step_loss = torch.zeros((), device=accelerator.device)
    for m, batch in enumerate(micro_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # no gradient all-reduce until the last micro-batch of the step
        sync = accelerator.no_sync(model) if m < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync:
            with accelerator.autocast():
                scaled = model(**batch).loss * (len(batch["labels"]) / total)
            accelerator.backward(scaled)
        step_loss += scaled.detach().float()
    return step_loss


# --- checkpoints ------------------------------------------------------------------

def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, progress: Progress) -> None:
    """Write atomically: a half-written checkpoint never replaces a good one."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> Progress:
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)  # our own file: python/numpy RNG tuples
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return Progress(**json.loads((path / "progress.json").read_text()))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if not c.name.endswith(".tmp") and (c / "progress.json").is_file()]
    return ckpts[-1] if ckpts else None


# --- evaluation ---------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, accelerator: Any, tokenizer: Any, encodings: list[dict[str, list[int]]],
             labels: list[int], batch_size: int) -> tuple[np.ndarray, float]:
    """Class probabilities for every eval example (all processes together) and the mean loss."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(encodings), world))
    per_rank = math.ceil(len(encodings) / world)
    mine += mine[-1:] * (per_rank - len(mine))  # equal counts for the gather; duplicates dropped below
    chunks_idx, chunks_logits = [], []
    for start in range(0, per_rank, batch_size):
        idx = mine[start: start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate(tokenizer, encodings, idx, None).items()}
        with accelerator.autocast():
            logits = model(**batch).logits.float()
        chunks_idx.append(torch.tensor(idx, device=accelerator.device))
        chunks_logits.append(logits)
    idx_all = accelerator.gather(torch.cat(chunks_idx)).cpu().numpy()
    logits_all = accelerator.gather(torch.cat(chunks_logits)).cpu()
    _, first = np.unique(idx_all, return_index=True)
    order = idx_all[first].argsort()
    logits_all = logits_all[first][order]
    y = torch.tensor(labels)
    loss = torch.nn.functional.cross_entropy(logits_all, y).item()
    model.train()
    return torch.softmax(logits_all, dim=-1).numpy(), loss


# --- the loop -------------------------------------------------------------------------

def train(config: Config, store: RunStore | None = None, run_id: str | None = None,
          callbacks: list[Callback] | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one run to the end (completed, stopped or failed) and return its record.

    With `run_id` the run must exist in the store (queued by `launch`, or to resume).
    """
    if config.task in GENERATION_TASKS:  # chat, seq2seq: their own batches, loss weighting and evaluation
        from .chat import train_generation

        return train_generation(config, store=store, run_id=run_id, callbacks=callbacks, resume=resume)
    if config.method.is_zero_shot:  # nothing to train: the pretrained model is evaluated as it is
        from .zeroshot import run_zero_shot

        return run_zero_shot(config, store=store, run_id=run_id, callbacks=callbacks, resume=resume)
    from accelerate import Accelerator

    from .tracking import default_callbacks

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if config.train.precision == "bf16" else "no")
    main = accelerator.is_main_process
    previous_threads = torch.get_num_threads()  # restored at the end: a notebook kernel keeps its own
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    store = store or RunStore()

    # The run id is chosen once, on the main process, and shared with the others.
    if main:
        if run_id is None:
            run_id = store.create_run(config.to_dict(), config.name)
        else:
            run_id = store.resolve(run_id)
        store.mark_running(run_id, os.getpid())
    from accelerate.utils import broadcast_object_list

    run_id = broadcast_object_list([run_id])[0] if accelerator.num_processes > 1 else run_id
    run_dir = store.run_dir(run_id)

    state = TrainState(run_id=run_id, is_main_process=main)
    control = TrainControl()
    hooks = CallbackList((default_callbacks(config, store, run_id) if main else []) + list(callbacks or []))
    status, metrics, error = "failed", None, None
    wall_start = time.perf_counter()
    timings: dict[str, Any] = {}
    previous_sigterm = _install_sigterm(control)
    try:
        # --- data and model -----------------------------------------------------------
        set_seed(config.train.seed)
        split = prepare(config.data, config.train.seed)
        source = resolve_model(config.model, store.home, config.trust_remote_code)
        _check_batch_fits(config, split, accelerator.num_processes)
        accum = config.train.gradient_accumulation
        micro_per_epoch = len(shard_batches(list(range(len(split.train_texts))), config.train.batch_size,
                                            accelerator.process_index, accelerator.num_processes))
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        max_steps = steps_per_epoch * config.train.epochs
        set_seed(config.train.seed)  # new layers start the same whatever the data loading did
        built = build_model(config, source, split.labels, total_steps=max_steps)  # adalora plans its ranks
        model, tokenizer = built.model, built.tokenizer
        if config.train.fast_dropout and accelerator.device.type == "cpu":
            undo_fast_dropout = use_fast_dropout(model)  # torch's bernoulli_ was a third of a CPU step
        if config.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)

        tokenize = lambda texts: built.encode(texts, config.train.max_length)  # prompts for an LLM classifier
        train_enc, eval_enc = tokenize(split.train_texts), tokenize(split.eval_texts)
        if main:
            store.set_info(run_id, _run_info(config, built, split, accelerator.num_processes))

        # --- optimiser and schedule ------------------------------------------------------
        warmup = math.ceil(config.train.warmup_ratio * max_steps)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
        from transformers import get_scheduler

        scheduler = get_scheduler(config.train.scheduler if config.train.scheduler != "constant"
                                  else "constant_with_warmup", optimizer, num_warmup_steps=warmup,
                                  num_training_steps=max_steps)
        model, optimizer = accelerator.prepare(model, optimizer)  # DDP wrap when distributed
        state.max_steps, state.steps_per_epoch, state.warmup_steps = max_steps, steps_per_epoch, warmup

        progress = Progress()
        ckpt = latest_checkpoint(run_dir) if resume else None
        if resume and ckpt is None and main:
            store.truncate_points(run_id, 0)  # nothing to resume from: start over cleanly
        if ckpt is not None:
            progress = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
            if main:
                store.truncate_points(run_id, progress.global_step)
        _sync_state(state, progress)
        eval_every = config.train.eval_every or steps_per_epoch
        hooks.on_train_begin(state, config.to_dict())

        # --- training ------------------------------------------------------------------------
        model.train()
        finished = False
        for epoch in range(progress.epoch, config.train.epochs):
            batches = shard_batches(epoch_order(len(train_enc), config.train.seed, epoch), config.train.batch_size,
                                    accelerator.process_index, accelerator.num_processes)
            groups = [batches[i: i + accum] for i in range(0, len(batches), accum)]
            first_group = progress.batch_in_epoch // accum if epoch == progress.epoch else 0
            for g, group in enumerate(groups[first_group:], start=first_group):
                step_start = time.perf_counter()
                group_size = sum(len(b) for b in group)
                micro_batches = [collate(tokenizer, train_enc, idx, split.train_labels) for idx in group]
                step_loss = accumulate_gradients(model, accelerator, micro_batches)
                if config.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
                learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
                optimizer.step()
                after_optimizer_step(built, progress.global_step + 1)  # adalora prunes ranks; needs the grads
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                step_loss = accelerator.reduce(step_loss, reduction="mean")  # the same number on every rank
                loss_value = step_loss.item()  # sync point
                if not math.isfinite(loss_value):
                    raise WorkbenchError(
                        f"training loss became {loss_value} at step {progress.global_step + 1}: lower "
                        f"train.learning_rate (now {config.train.learning_rate}) or keep train.max_grad_norm > 0")
                elapsed = time.perf_counter() - step_start
                progress.global_step += 1
                progress.batch_in_epoch = (g + 1) * accum
                progress.samples_seen += group_size * accelerator.num_processes
                _sync_state(state, progress, epoch)
                hooks.on_step_end(state, control, loss_value, learning_rate,
                                  group_size * accelerator.num_processes / max(elapsed, 1e-9))
                progress.train_seconds += time.perf_counter() - step_start  # hooks count: they are our cost

                last_step = progress.global_step == max_steps
                if progress.global_step % eval_every == 0 or last_step or (g == len(groups) - 1 and
                                                                           not config.train.eval_every):
                    _evaluate_and_checkpoint(config, accelerator, model, tokenizer, eval_enc, split, optimizer,
                                             scheduler, progress, state, control, hooks, run_dir, epoch,
                                             steps_per_epoch, g, len(groups))
                if _stop_everywhere(control, accelerator):
                    raise StopRequested(control.stop_reason)
            progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        finished = True
        status = "completed"
    except StopRequested as stop:
        status = "stopped" if "early stopping" not in str(stop) else "completed"
        if status == "stopped" and main:
            _save_stop_checkpoint(locals(), run_dir, hooks, state)
    except WorkbenchError as exc:
        error = str(exc)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; resume starts from the last checkpoint
        status = "stopped"
    except Exception as exc:  # a crash: the run is marked failed with the reason, and re-raised below
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{INTERNAL_ERROR}{type(exc).__name__}: {detail} (traceback in {run_dir / 'log.txt'})"
        _log_traceback(run_dir)
    finally:
        _restore_sigterm(previous_sigterm)
        torch.set_num_threads(previous_threads)
        if "undo_fast_dropout" in locals():
            undo_fast_dropout()
        try:
            if status in ("completed", "stopped") and "model" in locals() and "progress" in locals():
                metrics = _finalise(locals(), accelerator, run_dir, status)
        except Exception as exc:  # finalising must not hide the run's outcome
            status, error = "failed", f"could not save the final model: {type(exc).__name__}: {exc}"
            _log_traceback(run_dir)
        if error is not None:
            status = "failed"
            hooks.on_exception(state, error)
        timings = _timings(locals(), wall_start, accelerator)
        if main:
            store.finish(run_id, status, metrics=metrics, timings=timings, error=error)
        hooks.on_train_end(state, status, metrics or {})
    return store.get(run_id) if main else {"id": run_id, "status": status}


# --- pieces of the loop -------------------------------------------------------------

def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> list[Any]:
    """An encoder's token ids per text; the loop itself goes through BuiltModel.encode."""
    from .methods import tokenize_texts

    return tokenize_texts(tokenizer, texts, max_length)


def _check_batch_fits(config: Config, split: Split, world: int) -> None:
    if config.train.batch_size * world > len(split.train_texts):
        raise WorkbenchError(
            f"train.batch_size = {config.train.batch_size} x {world} process(es) is larger than the "
            f"{len(split.train_texts)} training rows: lower train.batch_size or add data")


def _run_info(config: Config, built: BuiltModel, split: Split, world: int) -> dict[str, Any]:
    r = split.report
    return {
        "labels": split.labels,
        "train_rows": len(split.train_texts),
        "eval_rows": len(split.eval_texts),
        "train_label_counts": split.label_counts("train"),
        "text_column": r.text_column,
        "label_column": r.label_column,
        "data_notes": r.notes + ([f"dropped {r.blank_dropped} blank rows"] if r.blank_dropped else [])
        + ([f"dropped {r.duplicates_dropped} duplicate rows"] if r.duplicates_dropped else []),
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "trainable_percent": round(100 * built.trainable_params / max(built.total_params, 1), 4),
        "head_modules": built.head_modules,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}),
        "num_processes": world,
        "torch_threads": torch.get_num_threads(),
    }


def _sync_state(state: TrainState, progress: Progress, epoch: int | None = None) -> None:
    state.epoch = progress.epoch if epoch is None else epoch
    state.global_step = progress.global_step
    state.samples_seen = progress.samples_seen
    state.best_metric = progress.best_metric
    state.best_step = progress.best_step
    state.evals_without_improvement = progress.evals_without_improvement


def _evaluate_and_checkpoint(config: Config, accelerator: Any, model: Any, tokenizer: Any, eval_enc: list,
                             split: Split, optimizer: Any, scheduler: Any, progress: Progress, state: TrainState,
                             control: TrainControl, hooks: Callback, run_dir: Path, epoch: int,
                             steps_per_epoch: int, group: int, groups: int) -> None:
    eval_start = time.perf_counter()
    probs, loss = evaluate(model, accelerator, tokenizer, eval_enc, split.eval_labels,
                           config.train.effective_eval_batch_size)
    result = classification_result(progress.global_step, epoch + (group + 1) / groups, split.labels,
                                    np.asarray(split.eval_labels), probs, loss, split.eval_texts)
    if not math.isfinite(loss):
        raise WorkbenchError(f"evaluation loss is {loss} at step {progress.global_step}: "
                             "lower train.learning_rate")
    metric = getattr(result, BEST_METRIC)
    improved = progress.best_metric is None or metric > progress.best_metric
    if improved:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = metric, progress.global_step, 0
    else:
        progress.evals_without_improvement += 1
    _sync_state(state, progress, epoch)
    patience = config.train.early_stopping_patience
    if patience and progress.evals_without_improvement >= patience:
        control.request_stop(f"early stopping: no improvement in {patience} evaluations")
    hooks.on_evaluate(state, control, result)
    if accelerator.is_main_process:
        _write_predictions(run_dir, result, split, probs)
        ckpt_root = run_dir / "checkpoints"
        path = ckpt_root / f"step-{progress.global_step}"
        save_checkpoint(path, accelerator.unwrap_model(model), optimizer, scheduler, progress)
        if improved:
            best = ckpt_root / "best"
            tmp = ckpt_root / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(best, ignore_errors=True)
            tmp.replace(best)
        for old in ckpt_root.glob("step-*"):  # keep the newest resumable checkpoint only
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        hooks.on_checkpoint(state, str(path), improved)
    accelerator.wait_for_everyone()
    progress.eval_seconds += time.perf_counter() - eval_start


def _write_predictions(run_dir: Path, result: EvalResult, split: Split, probs: np.ndarray) -> None:
    """Every eval example's prediction, for drill-down (confusion matrix cells)."""
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    rows = [
        {"index": i, "text": split.eval_texts[i][:600], "true": split.labels[y],
         "predicted": split.labels[int(p.argmax())], "confidence": float(p.max())}
        for i, (y, p) in enumerate(zip(split.eval_labels, probs))
    ]
    tmp = out / f"step-{result.step}.json.tmp"
    tmp.write_text(json.dumps({"step": result.step, "labels": split.labels, "rows": rows}))
    tmp.replace(out / f"step-{result.step}.json")


def _stop_everywhere(control: TrainControl, accelerator: Any) -> bool:
    """A stop asked of any process stops all of them at the same step."""
    if accelerator.num_processes == 1:
        return control.should_stop
    flag = torch.tensor([1.0 if control.should_stop else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _save_stop_checkpoint(scope: dict[str, Any], run_dir: Path, hooks: Callback, state: TrainState) -> None:
    needed = ("model", "optimizer", "scheduler", "progress", "accelerator")
    if not all(k in scope for k in needed):
        return
    path = run_dir / "checkpoints" / f"step-{scope['progress'].global_step}"
    if path.exists():
        return  # the evaluation at this very step already saved it
    save_checkpoint(path, scope["accelerator"].unwrap_model(scope["model"]), scope["optimizer"],
                    scope["scheduler"], scope["progress"])
    for old in (run_dir / "checkpoints").glob("step-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    hooks.on_checkpoint(state, str(path), False)


def _finalise(scope: dict[str, Any], accelerator: Any, run_dir: Path, status: str) -> dict[str, Any] | None:
    """Restore the best checkpoint's weights, save them as the run's model, return its metrics."""
    from safetensors.torch import load_file, save_file

    model = scope["model"]
    best = run_dir / "checkpoints" / "best"
    if not (best / "trainable.safetensors").is_file():
        return None
    unwrapped = accelerator.unwrap_model(model)
    load_trainable_state(unwrapped, load_file(str(best / "trainable.safetensors")))
    if accelerator.is_main_process:
        out = run_dir / "model"
        tmp = run_dir / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(unwrapped), str(tmp / "trainable.safetensors"))
        split = scope["split"]
        (tmp / "labels.json").write_text(json.dumps(split.labels))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    best_step = json.loads((best / "progress.json").read_text())["global_step"]
    preds = run_dir / "eval" / f"step-{best_step}.json"
    return _best_metrics(scope, best_step, preds)


def _best_metrics(scope: dict[str, Any], best_step: int, preds: Path) -> dict[str, Any] | None:
    store, run_id = scope.get("store"), scope.get("run_id")
    if store is None or not scope["accelerator"].is_main_process:
        return None
    evals = [p for p in store.points(run_id, kind="eval") if p["step"] == best_step]
    if not evals:
        return None
    summary = {k: v for k, v in evals[-1].items() if k not in ("seq", "kind", "time", "mistakes")}
    summary["best_step"] = best_step
    summary["predictions_file"] = str(preds) if preds.is_file() else None
    return summary


def _timings(scope: dict[str, Any], wall_start: float, accelerator: Any) -> dict[str, Any]:
    progress = scope.get("progress")
    train_seconds = progress.train_seconds if progress else 0.0
    samples = progress.samples_seen if progress else 0
    return {
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(progress.eval_seconds, 3) if progress else 0.0,
        "samples_per_second": round(samples / train_seconds, 3) if train_seconds > 0 else 0.0,
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "steps": progress.global_step if progress else 0,
    }


def _install_sigterm(control: TrainControl) -> dict[int, Any]:
    """SIGTERM and a first Ctrl-C ask for a cooperative stop: the step ends, a checkpoint is
    saved, the run is 'stopped'. A second Ctrl-C interrupts at once."""
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


def _restore_sigterm(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        try:
            signal.signal(sig, handler)
        except (ValueError, TypeError):
            pass


def _log_traceback(run_dir: Path) -> None:
    import traceback

    try:
        with open(run_dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
    except OSError:
        print(traceback.format_exc(), file=sys.stderr)
