"""The training loop: one for every task, on accelerate for devices and processes.

`accelerate.Accelerator` owns the device, mixed precision and the process group (so the same loop runs
under `torchrun` with DDP on CPU/gloo or GPUs/NCCL); the task (workbench/tasks/) supplies the data, the
model, the batches, the loss and the evaluation; this file owns the order of things: seeding, batches and
their shards, the optimiser step (the only one in the core), evaluation cadence, the best checkpoint,
early stopping, resume and stop. lifecycle.py owns the run record, signals and failures around it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..callbacks import Callback
from ..catalog import resolve_model
from ..config import ENCODER_TASKS, Config
from ..errors import StopRequested, WorkbenchError
from ..kernels import use_fast_dropout
from ..models.adapters import after_optimizer_step, enable_gradient_checkpointing
from ..models.state import set_seed
from ..store import RunStore
from ..tasks import Task, task_of
from .adversarial import attack_for
from .augment import grow_training
from .continual import check_labels, forgetting, load_previous_weights, mix_replay, previous_run
from .bucketing import bucketed_batches
from .checkpoints import Progress, keep_only, latest_checkpoint, load_checkpoint, mark_best, save_checkpoint, save_model
from .defaults import choose_before_build, choose_max_length, zero_shot_config
from .lifecycle import RunContext, run_lifecycle
from .precision import freeze_base_in_bf16, resolve_precision
from .zero_shot import run_zero_shot
from ..run_paths import PROGRESS_FILE, RunPaths, TRAINABLE_FILE


def preflight(config: Config, home: Any) -> Any:
    """Every check that needs no weights: data, columns, labels, model config, limits, adapter targets.

    Runs before a run is registered, so a typo never leaves a failed run behind. Returns the task's data.
    """
    if config.method.is_zero_shot:
        from ..data import prepare

        config = zero_shot_config(config)
        from ..tasks.zeroshot import check_zero_shot

        split = prepare(config.data, config.train.seed)
        check_zero_shot(config, home, split)
        return split
    task = task_of(config)
    data = task.load_data(config, home)
    check_batch_fits(config, task, data, 1)
    task.check_model(config, resolve_model(config.model, home, config.trust_remote_code), data)
    if config.train.init_from:
        previous = previous_run(config, RunStore(home))
        if previous is not None:
            check_labels(previous, data)
    return data


def check_batch_fits(config: Config, task: Task, data: Any, world: int) -> None:
    rows = task.train_size(data)
    if config.train.batch_size * world > rows:
        raise WorkbenchError(f"train.batch_size = {config.train.batch_size} x {world} process(es) is larger than "
                             f"the {rows} {task.examples}: lower train.batch_size or add data")


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


def epoch_steps(config: Config, lengths: list[int], epoch: int, rank: int, world: int) -> list[list[list[int]]]:
    """This process's optimiser steps of one epoch, each a list of micro-batches (lists of row indices).

    The plain order shuffles rows by (seed, epoch); with train.length_bucketing the step batches come from
    bucketing.bucketed_batches (rows of similar length together, every row once per epoch) and are then cut
    into micro-batches, so accumulation sees the same rows per step as one big batch would.
    """
    size, accum = config.train.batch_size, config.train.gradient_accumulation
    if not config.train.length_bucketing:
        batches = shard_batches(epoch_order(len(lengths), config.train.seed, epoch), size, rank, world)
        return [batches[i: i + accum] for i in range(0, len(batches), accum)]
    steps = bucketed_batches(lengths, size * accum, config.train.seed, epoch, rank, world)
    return [[step[i: i + size] for i in range(0, len(step), size)] for step in steps]


def train(config: Config, store: RunStore | None = None, run_id: str | None = None,
          callbacks: list[Callback] | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one run to the end (completed, stopped or failed) and return its record.

    With `run_id` the run must exist in the store (queued by `launch`, or to resume). A zero-shot method
    trains nothing: its one evaluation runs in the same lifecycle.
    """
    store = store or RunStore()
    if config.method.is_zero_shot:
        return run_zero_shot(zero_shot_config(config), store, run_id, callbacks)
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    on_gpu = config.train.device == "auto" and torch.cuda.is_available()
    check_gpus_fit(on_gpu)
    precision = resolve_precision(config.train.precision, "cuda" if on_gpu else "cpu")
    # bf16 for a method with a frozen base: that base is stored and multiplied in bf16 while what trains stays
    # fp32 (precision.py); for full fine-tuning and qlora: autocast
    autocast = precision == "bf16" and not frozen_base(config)
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if autocast else "no")
    share = ((lambda rid: broadcast_object_list([rid])[0]) if accelerator.num_processes > 1 else (lambda rid: rid))
    task = task_of(config)
    return run_lifecycle(config, store, run_id, callbacks,
                         lambda ctx: _train(ctx, task, accelerator, resume, precision),
                         accelerator.device, accelerator.is_main_process, share)


def frozen_base(config: Config) -> bool:
    """Whether the method leaves the pretrained weights frozen in floating point (every peft method but
    qlora, whose base is 4-bit, and head-only)."""
    spec = config.method.spec
    return not spec.trains_backbone and not spec.quantized


def check_gpus_fit(on_gpu: bool) -> None:
    """Each process takes its own GPU (LOCAL_RANK): more processes on a node than GPUs is refused before
    anything starts (two ranks on one GPU fail deep inside NCCL with "invalid usage")."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if on_gpu and local > torch.cuda.device_count():
        raise WorkbenchError(f"{local} processes on this machine but {torch.cuda.device_count()} GPU(s): start at "
                             f"most {torch.cuda.device_count()} (torchrun --nproc_per_node), or set train.device: "
                             "cpu to run the processes on the CPU")


@dataclass
class Session:
    """Everything one training run holds while it runs."""

    ctx: RunContext
    task: Task
    accelerator: Any
    data: Any
    built: Any
    model: Any
    train: list[dict]
    held: list[dict]
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    progress: Progress
    steps_per_epoch: int
    max_steps: int
    attack: Any = None  # train.adversarial's EmbeddingAttack, or None
    previous: Any = None  # train.init_from's run (continual.Previous), or None


def _train(ctx: RunContext, task: Task, accelerator: Any, resume: bool, precision: str) -> None:
    s = _setup(ctx, task, accelerator, precision)
    config, progress, world = ctx.config, s.progress, accelerator.num_processes
    ckpt = latest_checkpoint(ctx.run_dir) if resume else None
    if resume and ckpt is None and ctx.main:
        ctx.store.truncate_points(ctx.run_id, -1)  # nothing to resume from: start over cleanly
    if ckpt is not None:
        s.progress = progress = load_checkpoint(ckpt, accelerator.unwrap_model(s.model), s.optimizer, s.scheduler)
        if ctx.main:
            ctx.store.truncate_points(ctx.run_id, progress.global_step)
    _sync_state(ctx, progress)
    eval_every = config.train.eval_every or s.steps_per_epoch
    ctx.hooks.on_train_begin(ctx.state, config.to_dict())

    if s.previous is not None and ckpt is None:  # the previous run's eval split, before this run trains
        s.previous.before = _score_previous(s)
        if ctx.main:
            info = ctx.store.get(ctx.run_id).get("info") or {}
            ctx.store.set_info(ctx.run_id, {**info, "forgetting_before": s.previous.before})

    # --- the untrained model's figures (tasks that ask for them) -------------------------------------
    if ckpt is None and task.eval_at_start(config):
        _evaluate_and_checkpoint(s, 0, 0.0)
        _honour_stop(s)

    # --- training ------------------------------------------------------------------------------------
    accum = config.train.gradient_accumulation
    lengths = [len(e["input_ids"]) for e in s.train]
    s.model.train()
    for epoch in range(progress.epoch, config.train.epochs):
        groups = epoch_steps(config, lengths, epoch, accelerator.process_index, world)
        first_group = progress.batch_in_epoch // accum if epoch == progress.epoch else 0
        for g, group in enumerate(groups[first_group:], start=first_group):
            step_start = time.perf_counter()
            loss, learning_rate = _optimizer_step(s, [task.collate(s.built, s.train, idx) for idx in group])
            elapsed = time.perf_counter() - step_start
            rows = sum(len(b) for b in group) * world
            progress.global_step += 1
            progress.batch_in_epoch = (g + 1) * accum
            progress.samples_seen += rows
            _sync_state(ctx, progress, epoch)
            ctx.hooks.on_step_end(ctx.state, ctx.control, loss, learning_rate, rows / max(elapsed, 1e-9))
            progress.train_seconds += time.perf_counter() - step_start  # hooks count: they are our cost

            end_of_epoch = g == len(groups) - 1 and not config.train.eval_every
            if progress.global_step % eval_every == 0 or progress.global_step == s.max_steps or end_of_epoch:
                _evaluate_and_checkpoint(s, epoch, (g + 1) / len(groups))
            _honour_stop(s)
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0


def _setup(ctx: RunContext, task: Task, accelerator: Any, precision: str) -> Session:
    """Data, model, examples, optimiser and schedule; registers the stop, finalise and timing hooks."""
    config, world = ctx.config, accelerator.num_processes
    set_seed(config.train.seed)
    data = task.load_data(config, ctx.store.home)
    previous = previous_run(config, ctx.store, ctx.run_id)
    continued = None
    if previous is not None:
        check_labels(previous, data)
        config.train.init_from = previous.record["id"]  # "latest" would name this run itself on a resume
        continued = mix_replay(data, previous, config.train.replay, config.train.seed)
    source = resolve_model(config.model, ctx.store.home, config.trust_remote_code)
    grown = grow_training(config, data, source, ctx.store)  # self-training and augmentation rows, before the
    check_batch_fits(config, task, data, world)            # epochs and steps are chosen from the data size
    config, decisions, truncation = _choose_settings(config, task, data, source, world,
                                                     accelerator.device.type == "cuda")
    ctx.config = config
    steps_per_epoch = len(epoch_steps(config, [1] * task.train_size(data), 0, accelerator.process_index, world))
    max_steps = steps_per_epoch * config.train.epochs
    set_seed(config.train.seed)  # new layers start the same whatever the data loading did
    built = task.build(config, source, data, max_steps)  # adalora plans its rank pruning over max_steps
    if precision == "bf16" and frozen_base(config):
        freeze_base_in_bf16(built.model)
    if config.train.fast_dropout and accelerator.device.type == "cpu":
        ctx.cleanups.append(use_fast_dropout(built.model))  # torch's bernoulli_ was a third of a CPU step
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(built.model)
    if previous is not None:
        load_previous_weights(built, previous)
        previous.held = task.encode(config, built, previous.data)[1]
    train_enc, held_enc = task.encode(config, built, data)
    if len(train_enc) != task.train_size(data):  # train.truncation chunks: a long text is several examples
        steps_per_epoch = len(epoch_steps(config, [1] * len(train_enc), 0, accelerator.process_index, world))
        max_steps = steps_per_epoch * config.train.epochs
    if ctx.main:
        info = {**task.run_info(config, built, data, train_enc, held_enc), "decisions": decisions,
                **({"truncation": truncation} if config.task in ENCODER_TASKS else {}),
                **({"adversarial": {"method": config.train.adversarial, "epsilon": config.train.adversarial_epsilon,
                                    **({"steps": config.train.adversarial_steps}
                                       if config.train.adversarial == "pgd" else {})}}
                   if config.train.adversarial != "off" else {}),
                **({"continued": continued} if continued else {}), **grown, "num_processes": world,
                "torch_threads": torch.get_num_threads(), "precision": precision, "device": accelerator.device.type}
        _record_setup(ctx, task, data, info)

    # --- optimiser and schedule -----------------------------------------------------------------------
    from transformers import get_scheduler

    warmup = math.ceil(config.train.warmup_ratio * max_steps)
    params = [p for p in built.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(built), lr=config.train.learning_rate,
                                  weight_decay=config.train.weight_decay,
                                  fused=accelerator.device.type == "cuda")  # one kernel for every parameter
    scheduler = get_scheduler(config.train.scheduler if config.train.scheduler != "constant"
                              else "constant_with_warmup", optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(built.model, optimizer)  # DDP wrap when distributed
    ctx.state.max_steps, ctx.state.steps_per_epoch, ctx.state.warmup_steps = max_steps, steps_per_epoch, warmup
    s = Session(ctx, task, accelerator, data, built, model, train_enc, held_enc, optimizer, scheduler, params,
                Progress(), steps_per_epoch, max_steps, adversarial_attack(config, built, world), previous)
    ctx.save_on_stop = lambda: _save_stop_checkpoint(s)
    ctx.finalise = lambda status: _finalise(s)
    ctx.timings = lambda: _timings(s.progress)
    return s


def adversarial_attack(config: Config, built: Any, world: int) -> Any:
    """train.adversarial's attack on the model's input embeddings (None when off); one process only: under
    DDP the perturbed pass's gradients would join after the all-reduce of the clean ones."""
    if config.train.adversarial == "off":
        return None
    if world > 1:
        raise WorkbenchError(f"train.adversarial: {config.train.adversarial} runs in one process: start it "
                             "without torchrun, or set train.adversarial: off")
    return attack_for(config, built.model)


def parameter_groups(built: Any) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: every trainable parameter at the run's rate, except those named in
    `built.learning_rates` ({parameter name: rate}; the word embeddings of a vocabulary that grew), a group
    each after the first (the rate the run reports is the first group's)."""
    rates = getattr(built, "learning_rates", None) or {}
    named = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [p for n, p in named if n not in rates]}]
    groups += [{"params": [p], "lr": rates[n]} for n, p in named if n in rates]
    return groups


def _choose_settings(config: Config, task: Task, data: Any, source: Any, world: int,
                     on_gpu: bool) -> tuple[Config, list[dict[str, Any]], dict[str, Any]]:
    """Settings left out, chosen from the data (defaults.py): the token length first, then the epochs that
    length affords on a CPU, the learning rate, class weights and the checkpoint metric; with the reasons."""
    config, decisions, truncation = choose_max_length(config, source, getattr(data, "train_texts", []), on_gpu)
    classes = getattr(data, "train_labels", None)  # a classification split's labels (None for other tasks)
    texts = rows = task.train_size(data)
    if truncation and truncation.get("mean_chunks"):  # chunks: an epoch's steps count every chunk
        rows = max(rows, round(rows * truncation["mean_chunks"]))
    mean = truncation.get("mean_tokens")  # per text (under chunks: all its chunks' tokens)
    tokens = int(mean * texts / world) if mean and not on_gpu else None  # what one process reads an epoch
    config, more = choose_before_build(config, rows, world, classes, len(data.labels) if classes is not None else 0,
                                       tokens)
    return config, decisions + more, truncation


def _record_setup(ctx: RunContext, task: Task, data: Any, info: dict[str, Any]) -> None:
    """The chosen config and the run's facts in the record, then the classical baseline beside them."""
    ctx.store.set_config(ctx.run_id, ctx.config.to_dict())  # the values chosen: resume and predict read them
    ctx.store.set_info(ctx.run_id, info)
    baseline = task.fit_baseline(ctx.config, data, ctx.run_dir)  # seconds; shown beside the model from now on
    if baseline is not None:
        ctx.store.set_info(ctx.run_id, {**info, "baseline": baseline})


def accumulate_gradients(task: Task, built: Any, model: torch.nn.Module, accelerator: Any,
                         micro_batches: list[dict[str, torch.Tensor]], attack: Any = None) -> torch.Tensor:
    """Backward over one optimiser step's micro-batches; returns the step's loss (this process's share).

    Each micro-batch's mean loss is weighted by its share of the step's loss units (rows, or the tokens the
    loss is on), counted over every process: DDP then averages the gradients over processes, so loss and
    gradients equal those of one big batch whatever the accumulation, the processes and however uneven
    the micro-batches (HF Trainer multiplies both by the accumulation steps for classifiers). With an
    `attack` (train.adversarial) each micro-batch also backpropagates its perturbed pass(es), same weight.
    """
    world = accelerator.num_processes
    counts = [task.loss_weight(b) for b in micro_batches]
    if min(counts) == 0:
        raise RuntimeError("a micro-batch with nothing to learn from (encode drops such examples)")
    total = torch.tensor(float(sum(counts)), device=accelerator.device)
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")  # sync point: every process's loss units
    total_units = float(total.item())
    step_loss = torch.zeros((), device=accelerator.device)
    for m, (batch, n) in enumerate(zip(micro_batches, counts)):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        # no gradient all-reduce until the last micro-batch of the step
        sync = accelerator.no_sync(model) if m < len(micro_batches) - 1 else contextlib.nullcontext()
        share = n * world / total_units

        def loss_of(batch: dict[str, torch.Tensor] = batch, share: float = share) -> torch.Tensor:
            with accelerator.autocast():
                return task.loss(built, model, batch) * share

        with sync:
            if attack is None:
                scaled = loss_of()
                accelerator.backward(scaled)
            else:
                scaled = attack.step(loss_of, accelerator.backward)
        step_loss += scaled.detach().float() / world
    return step_loss


def _optimizer_step(s: Session, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Gradients of one step's micro-batches, clipping, the optimiser step; returns (loss, learning rate)."""
    accelerator, config = s.accelerator, s.ctx.config
    step_loss = accumulate_gradients(s.task, s.built, s.model, accelerator, micro_batches, s.attack)
    if config.train.max_grad_norm > 0:
        accelerator.clip_grad_norm_(s.params, config.train.max_grad_norm)
    learning_rate = s.scheduler.get_last_lr()[0]  # the rate this step used
    s.optimizer.step()
    after_optimizer_step(s.built.model, config.method.name, s.progress.global_step + 1)  # adalora prunes
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")  # the same number on every process
    loss = step_loss.item()  # sync point
    if not math.isfinite(loss):
        raise WorkbenchError(f"training loss became {loss} at step {s.progress.global_step + 1}: lower "
                             f"train.learning_rate (now {config.train.learning_rate}) or keep "
                             "train.max_grad_norm > 0")
    return loss, learning_rate


def is_improvement(progress: Progress, metric: float, learned: bool, greater_is_better: bool) -> bool:
    """Whether an evaluation becomes the best so far: the first one does; a classifier that tells classes apart
    beats one that answers a single class for every row, whatever their figures (on a skewed or tiny eval split
    the constant answer's accuracy is hard to beat, and such a checkpoint is useless); else the figure decides,
    strictly."""
    if progress.best_metric is None:
        return True
    if learned != progress.best_learned:
        return learned
    return metric > progress.best_metric if greater_is_better else metric < progress.best_metric


def _evaluate_and_checkpoint(s: Session, epoch: int, fraction: float) -> None:
    ctx, progress, accelerator = s.ctx, s.progress, s.accelerator
    eval_start = time.perf_counter()
    evaluation = s.task.evaluate(s.model, accelerator, ctx.config, s.built, s.data, s.held, progress.global_step,
                                 epoch + fraction)
    metric = evaluation.metric
    improved = is_improvement(progress, metric, evaluation.learned, s.task.greater_is_better)
    if improved:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = metric, progress.global_step, 0
        progress.best_learned = evaluation.learned
    elif evaluation.learned:  # a classifier answering one class for every row is still warming up
        progress.evals_without_improvement += 1
    _sync_state(ctx, progress, epoch)
    patience = ctx.config.train.early_stopping_patience
    if patience and progress.evals_without_improvement >= patience:
        metric = ctx.config.train.best_metric if ctx.config.train.best_metric != "auto" else s.task.best_metric
        ctx.control.request_stop(f"early stopping: no better {metric} in {patience} evaluations")
    ctx.hooks.on_evaluate(ctx.state, ctx.control, evaluation.result)
    if accelerator.is_main_process:
        s.task.write_evaluation(ctx.run_dir, evaluation, s.data)
        path = RunPaths(ctx.run_dir).checkpoint(progress.global_step)
        save_checkpoint(path, accelerator.unwrap_model(s.model), s.optimizer, s.scheduler, progress)
        if improved:
            mark_best(path)
        keep_only(path)  # the newest resumable checkpoint
        ctx.hooks.on_checkpoint(ctx.state, str(path), improved)
    accelerator.wait_for_everyone()
    progress.eval_seconds += time.perf_counter() - eval_start


def _honour_stop(s: Session) -> None:
    """A stop asked of any process (Stop button, signal, early stopping) stops all of them at this step."""
    should_stop = s.ctx.control.should_stop
    if s.accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if should_stop else 0.0], device=s.accelerator.device)
        should_stop = bool(s.accelerator.reduce(flag, reduction="sum").item() > 0)
    if should_stop:
        raise StopRequested(s.ctx.control.stop_reason or "stop requested")


def _save_stop_checkpoint(s: Session) -> None:
    path = RunPaths(s.ctx.run_dir).checkpoint(s.progress.global_step)
    if path.exists():
        return  # the evaluation at this very step already saved it
    save_checkpoint(path, s.accelerator.unwrap_model(s.model), s.optimizer, s.scheduler, s.progress)
    keep_only(path)
    s.ctx.hooks.on_checkpoint(s.ctx.state, str(path), False)


def _finalise(s: Session) -> dict[str, Any] | None:
    """Restore the best checkpoint's weights, save them as the run's model, return its metrics."""
    import json

    from safetensors.torch import load_file

    from ..models.state import load_trainable_state

    best = RunPaths(s.ctx.run_dir).best_checkpoint
    if not (best / TRAINABLE_FILE).is_file():
        return None
    unwrapped = s.accelerator.unwrap_model(s.model)
    load_trainable_state(unwrapped, load_file(str(best / TRAINABLE_FILE)))
    if not s.accelerator.is_main_process:
        return None
    save_model(s.ctx.run_dir, unwrapped, s.task.model_files(s.data))
    best_step = json.loads((best / PROGRESS_FILE).read_text())["global_step"]
    evals = s.ctx.store.points(s.ctx.run_id, kind="eval")
    at_best = [p for p in evals if p["step"] == best_step]
    if not at_best:
        return None
    metrics = {**s.task.final_metrics(at_best[-1], evals[0], s.ctx.run_dir), "best_step": best_step}
    if s.previous is not None:
        before = s.previous.before or (s.ctx.store.get(s.ctx.run_id).get("info") or {}).get("forgetting_before")
        if before:
            metrics["forgetting"] = forgetting(before, _score_previous(s), s.previous.record["id"])
    return metrics


def _score_previous(s: Session) -> dict[str, float]:
    """The headline figures of the model as it is now on the previous run's eval split (continual learning)."""
    evaluation = s.task.evaluate(s.model, s.accelerator, s.ctx.config, s.built, s.previous.data, s.previous.held,
                                 s.progress.global_step, 0.0)
    s.model.train()
    return {k: float(v) for k, v in evaluation.result.metrics.items()
            if k in ("accuracy", "f1_macro", "rmse", "mae", "spearman") and isinstance(v, (int, float))}


def _sync_state(ctx: RunContext, progress: Progress, epoch: int | None = None) -> None:
    state = ctx.state
    state.epoch = progress.epoch if epoch is None else epoch
    state.global_step = progress.global_step
    state.samples_seen = progress.samples_seen
    state.best_metric = progress.best_metric
    state.best_step = progress.best_step
    state.evals_without_improvement = progress.evals_without_improvement


def _timings(progress: Progress) -> dict[str, Any]:
    return {
        "train_seconds": round(progress.train_seconds, 3),
        "eval_seconds": round(progress.eval_seconds, 3),
        "samples_per_second": round(progress.samples_seen / progress.train_seconds, 3)
        if progress.train_seconds > 0 else 0.0,
        "steps": progress.global_step,
    }
