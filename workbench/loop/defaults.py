"""Settings left out of a config, chosen from the data: what a careful practitioner sets for a first run.

A field left out (None, or "auto") is filled in here, once, from the training split: the number of epochs
from its size, the learning rate from the method, class weights and the checkpoint metric from how skewed
its classes are, and the token length from its texts. Each choice is returned with the reason, written in
the run record (info.decisions) and printed; the run's stored config then holds the chosen values, so
resume, predict, evaluate and serve read texts exactly as training did. A value the user set always wins, with
one exception tied to the epochs: when they are chosen here, early stopping's patience is lengthened by the
evaluations that come during the warmup (whose length follows from the epochs), so a small set's run is not
stopped before its learning rate has peaked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import METHOD_LEARNING_RATES, Config

# Epochs left out reach the task's target steps, 2 to 40 passes. At a cap of 10, 80 training rows (batch 16)
# trained 50 steps. Measured on rotten-tomatoes (benchmarks/bench_small_data.py, 3 seeds, macro-F1 on 400
# held-out rows): at 100 labels the cap of 40 with the warmup-aware patience below scored 0.560 against 0.519
# (ahead in 3 of 3 seeds; TF-IDF alone 0.543); at 250 labels 0.636 against 0.639 (no gain). The cap of 40
# with plain patience 2 was worse (0.481 at 100 labels): runs stopped while still warming up.
MIN_EPOCHS, MAX_EPOCHS = 2, 40
GENERATION_EPOCHS, GENERATION_MAX_LENGTH = 2, 256  # chat and seq2seq: the defaults before choices existed
SKEW_RATIO = 1.5  # largest class / smallest class from which classes count as skewed
LENGTH_QUANTILE = 0.9
MIN_LENGTH, CPU_MAX_LENGTH, GPU_MAX_LENGTH = 64, 256, 512  # a CPU pays ~4x per step for 512 tokens over 128
LENGTH_SAMPLE = 2000  # texts tokenized to measure lengths
# On a CPU, epochs are also capped so training reads at most this many tokens: a MiniLM LoRA step reads about
# 1,000 tokens a second on 2 cores (bbc-news, 256 tokens: 3.7 samples/s), so this is ~8 minutes of steps and
# leaves room for evaluations inside a 15-minute first run. A GPU has no cap.
CPU_TOKEN_BUDGET = 450_000


def skew(labels: list[int], num_classes: int) -> float:
    """The largest class's training rows over the smallest's (inf when a class has none)."""
    counts = [labels.count(c) for c in range(num_classes)]
    return max(counts) / min(counts) if min(counts) else math.inf


def evaluations_in_warmup(warmup_ratio: float, max_steps: int, eval_steps: int) -> int:
    """Evaluations that come before the learning rate reaches its peak (at step ceil(ratio x max_steps), as
    the loop's schedule warms up); an evaluation every `eval_steps` optimiser steps."""
    warmup = math.ceil(warmup_ratio * max_steps)
    return max(0, math.ceil(warmup / eval_steps) - 1) if warmup else 0


def reads_texts(config: Config) -> bool:
    """A task whose inputs are texts read by an encoder (classification, regression, entities): its epochs and
    token length are chosen from the data; a generation task keeps its fixed defaults."""
    return not config.task_spec.generates


def _with(config: Config, **train: Any) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def choose_before_build(config: Config, rows: int, world: int, labels: list[int] | None, num_classes: int,
                        tokens_per_epoch: int | None = None) -> tuple[Config, list[dict[str, Any]]]:
    """Epochs, learning rate, class weights and the checkpoint metric; `labels`: the training labels of a
    classification run (None for other tasks); `tokens_per_epoch`: what one epoch reads, on a CPU (None on
    a GPU: no time cap)."""
    decisions: list[dict[str, Any]] = []

    def decide(name: str, value: Any, why: str) -> None:
        nonlocal config
        config = _with(config, **{name: value})
        decisions.append({"field": f"train.{name}", "value": value, "why": why})

    t, encoder = config.train, reads_texts(config)
    if t.epochs is None:
        if encoder:
            target = config.task_spec.target_steps
            per_epoch = math.ceil(rows / (t.batch_size * t.gradient_accumulation * world))
            epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(target / per_epoch)))
            why = (f"{rows} training rows make {per_epoch} optimiser steps an epoch; {epochs} epochs give "
                   f"{epochs * per_epoch} steps (the target: about {target} steps, in {MIN_EPOCHS}-{MAX_EPOCHS} epochs), "
                   "early stopping ends sooner when the eval figure stops improving")
            if tokens_per_epoch and epochs * tokens_per_epoch > CPU_TOKEN_BUDGET:
                epochs = max(MIN_EPOCHS, CPU_TOKEN_BUDGET // tokens_per_epoch)
                why = (f"{rows} training rows make {per_epoch} optimiser steps an epoch of ~{tokens_per_epoch:,} "
                       f"tokens; on a CPU, {epochs} epochs keep training to about {CPU_TOKEN_BUDGET:,} tokens "
                       f"(minutes on 2 cores), early stopping ends sooner; set train.epochs for more")
            decide("epochs", epochs, why)
            warming = evaluations_in_warmup(t.warmup_ratio, epochs * per_epoch, t.eval_every or per_epoch)
            if t.early_stopping_patience and warming:
                patience = t.early_stopping_patience + warming
                decide("early_stopping_patience", patience,
                       f"the warmup ({t.warmup_ratio:g} of {epochs * per_epoch} steps) spans {warming} "
                       f"evaluation{'s' if warming > 1 else ''} before the peak rate: early stopping waits "
                       f"{t.early_stopping_patience} evaluations from its end, not from the first (a run on 80 "
                       "rows stopped while still warming up)")
        else:
            decide("epochs", GENERATION_EPOCHS, f"the default for task: {config.task}")
    if t.learning_rate is None:
        rate = METHOD_LEARNING_RATES.get(config.method.name, 5e-4)
        decide("learning_rate", rate, f"the default peak rate for method {config.method.name}")
    if labels is not None:
        ratio = skew(labels, num_classes)
        skewed = ratio >= SKEW_RATIO
        shape = (f"the largest training class has {ratio:.1f}x the rows of the smallest"
                 if math.isfinite(ratio) else "a class has no training rows")
        if t.class_weights == "auto":
            decide("class_weights", "balanced" if skewed else "none",
                   f"{shape}: " + ("each class's loss weighed so minorities count as much as the majority"
                                   if skewed else "classes near balance, no weights needed"))
        if t.best_metric == "auto":
            decide("best_metric", "f1_macro" if skewed else "accuracy",
                   f"{shape}: " + ("macro-F1 picks the best checkpoint (accuracy rewards the majority class)"
                                   if skewed else "accuracy picks the best checkpoint"))
    elif t.class_weights == "auto":
        config = _with(config, class_weights="none")
    return config, decisions


def zero_shot_config(config: Config) -> Config:
    """A zero-shot baseline trains nothing: only its token length is filled in (256) when left out."""
    return config if config.train.max_length is not None else _with(config, max_length=GENERATION_MAX_LENGTH)


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Token counts (special tokens included) of up to LENGTH_SAMPLE texts spread over `texts`."""
    step = max(1, len(texts) // LENGTH_SAMPLE)
    sample = [t[:100_000] for t in texts[::step]]  # a token is rarely over 20 characters: enough to know "long"
    return [len(ids) for ids in tokenizer(sample, truncation=False, verbose=False)["input_ids"]]


def truncation_report(config: Config, lengths: list[int], specials: int) -> dict[str, Any]:
    """How the measured training texts (`lengths`: token counts, `specials` of them the tokenizer's own) are
    read at train.max_length: how many are longer (texts_cut), and `mean_tokens`, what reading one costs.
    Under truncation "chunks" nothing is cut: texts_cut are the texts read as several chunks, with
    `mean_chunks` per text, `chunks` in all and `texts_over_cap`, those needing more than MAX_CHUNKS chunks
    (read as MAX_CHUNKS spread over the text); `mean_tokens` then counts every chunk's tokens."""
    from ..models.built import MAX_CHUNKS, chunks_needed, text_budget_of

    max_length = config.train.max_length
    cut = sum(n > max_length for n in lengths)
    report = {"texts_measured": len(lengths), "texts_cut": cut,
              "share_cut": round(cut / len(lengths), 4) if lengths else 0.0, "max_length": max_length,
              "mode": config.train.truncation, "longest_tokens": max(lengths, default=0),
              "mean_tokens": round(sum(min(n, max_length) for n in lengths) / len(lengths), 1) if lengths else None}
    if config.train.truncation != "chunks" or not lengths:
        return report
    budget = text_budget_of(max_length, specials)
    needed = [chunks_needed(n - specials, budget) for n in lengths]
    chunks = [min(k, MAX_CHUNKS) for k in needed]
    read = [n if k == 1 else k * max_length for n, k in zip(lengths, chunks)]  # a chunked text's chunks are full
    return {**report, "chunks": sum(chunks), "mean_chunks": round(sum(chunks) / len(chunks), 2),
            "max_chunks": MAX_CHUNKS, "texts_over_cap": sum(k > MAX_CHUNKS for k in needed),
            "mean_tokens": round(sum(read) / len(read), 1)}


def choose_max_length(config: Config, source: Any, texts: list[str],
                      on_gpu: bool) -> tuple[Config, list[dict[str, Any]], dict[str, Any]]:
    """train.max_length from the training texts (encoder tasks), and how many texts it cuts; the model's
    tokenizer and context limit come from `source` (no weights are loaded)."""
    from ..config import VIRTUAL_TOKEN_METHODS
    from ..models.loading import context_limit, load_config, load_tokenizer

    decisions: list[dict[str, Any]] = []
    if not reads_texts(config):
        texts, limit = [], None
    else:
        limit = context_limit(load_config(source, config.trust_remote_code))
        if limit is not None and config.method.name in VIRTUAL_TOKEN_METHODS:
            limit -= config.method.num_virtual_tokens
    tokenizer = load_tokenizer(source, config.trust_remote_code) if texts else None
    lengths = token_lengths(tokenizer, texts) if texts else []
    specials = tokenizer.num_special_tokens_to_add(pair=False) if tokenizer is not None else 0
    cap = min(GPU_MAX_LENGTH if on_gpu else CPU_MAX_LENGTH, limit or GPU_MAX_LENGTH)
    if config.train.max_length is None:
        if not reads_texts(config):
            length, why = GENERATION_MAX_LENGTH, f"the default for task: {config.task}"
        else:
            ordered = sorted(lengths) or [MIN_LENGTH]
            quantile = ordered[min(len(ordered) - 1, int(LENGTH_QUANTILE * len(ordered)))]
            length = max(MIN_LENGTH, min(cap, 32 * math.ceil(quantile / 32)))
            why = (f"{LENGTH_QUANTILE:.0%} of the training texts have at most {quantile} tokens; rounded up to a "
                   f"multiple of 32, within {MIN_LENGTH}-{cap} ({'GPU' if on_gpu else 'CPU'}"
                   f"{', the model limit' if limit and limit < GPU_MAX_LENGTH else ''})")
        config = _with(config, max_length=length)
        decisions.append({"field": "train.max_length", "value": length, "why": why})
    return config, decisions, truncation_report(config, lengths, specials)
