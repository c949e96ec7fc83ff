"""Zero-shot baselines: the pretrained model, untrained, scored on the same held-out split as the training
methods (models/prompting.py has the scoring).

- zero-shot-embedding: an encoder embeds every eval text and every label description
  (`method.label_template`, e.g. "This text is about {label}."); the prediction is the label with the
  highest cosine similarity. Encoders only: a causal LM's mean-pooled states are not sentence embeddings.
- zero-shot-prompt: a causal LM scores each label's tokens after a classification prompt, optionally with
  `method.few_shot_k` labelled examples and contextual calibration. The text in a prompt is cut to
  train.max_length tokens; the prompt itself is longer.

A zero-shot run is a run like any other (the loop's lifecycle: record, signals, threads, events): one eval
point at step 0, the predictions file eval/step-0.json, run info with trainable_params 0, timings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..catalog import ModelSource, resolve_model
from ..config import ZERO_SHOT_METHODS, Config
from ..data import Split
from ..errors import WorkbenchError
from ..models.loading import (architecture, check_context, context_limit, is_causal_lm, load_config,
                              load_pretrained, load_tokenizer, quiet_libraries)
from ..models.prompting import (CONTENT_FREE, EMBEDDING_SCALE, PromptBuilder, calibrate, check_label_tokens,
                                embedding_scores, few_shot_indices, score_labels)

PROMPT_SHOWN_CHARS = 4000


def check_zero_shot(config: Config, home: Path, split: Split | None = None) -> ModelSource:
    """The checks a zero-shot run needs before loading weights: the model's kind, few_shot_k, context."""
    method = config.method
    if method.name not in ZERO_SHOT_METHODS:
        raise WorkbenchError(f"method {method.name!r} trains a model: use workbench.train")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WorkbenchError(f"method {method.name} trains nothing and runs in one process: start it without "
                             "torchrun")
    source = resolve_model(config.model, home, config.trust_remote_code)
    model_config = load_config(source, config.trust_remote_code)
    causal, arch = is_causal_lm(model_config), architecture(model_config)
    if "causal-lm" not in method.spec.model_kinds and causal:
        raise WorkbenchError(f"method zero-shot-embedding needs an encoder such as minilm-l6: model "
                             f"{config.model!r} is a causal language model ({arch}), whose mean-pooled states "
                             "are not sentence embeddings. Use method zero-shot-prompt for it")
    if "encoder" not in method.spec.model_kinds and not causal:
        raise WorkbenchError(f"method zero-shot-prompt needs a causal language model such as "
                             f"smollm2-135m-instruct: model {config.model!r} is {arch}, which cannot score "
                             "next tokens. Use method zero-shot-embedding for it")
    check_context(config, model_config)
    if split is not None and method.few_shot_k > len(split.train_texts):
        raise WorkbenchError(f"method.few_shot_k = {method.few_shot_k} is more than the {len(split.train_texts)} "
                             "training rows: lower it or raise data.max_train_samples")
    return source


def _load(config: Config, source: ModelSource, causal: bool) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_libraries()
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    loader = AutoModelForCausalLM if causal else AutoModel
    model = load_pretrained(loader, source, config.trust_remote_code, dtype=torch.float32)
    return model.to(device()).eval(), tokenizer


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _evaluate_embedding(config: Config, source: ModelSource, split: Split,
                        should_stop: Callable[[], bool]) -> tuple[np.ndarray, dict[str, Any], int]:
    model, tokenizer = _load(config, source, causal=False)
    label_texts = [config.method.label_template.format(label=y) for y in split.labels]
    cosines = embedding_scores(model, tokenizer, split.eval_texts, label_texts, config.train.max_length,
                               config.train.effective_eval_batch_size, should_stop)
    details = {"kind": "embedding", "label_texts": label_texts,
               "pooling": "mean over the attention mask, L2-normalised",
               "similarity": "cosine", "probabilities": f"softmax({EMBEDDING_SCALE:g} x cosine)"}
    return EMBEDDING_SCALE * cosines, details, sum(p.numel() for p in model.parameters())


def _evaluate_prompt(config: Config, source: ModelSource, split: Split,
                     should_stop: Callable[[], bool]) -> tuple[np.ndarray, dict[str, Any], int]:
    method = config.method
    model, tokenizer = _load(config, source, causal=True)
    shots = few_shot_indices(split.train_labels, method.few_shot_k, config.train.seed)
    builder = PromptBuilder(tokenizer, split.labels, config.train.max_length,
                            [(split.train_texts[i], split.labels[split.train_labels[i]]) for i in shots])
    continuations = builder.label_ids()
    check_label_tokens(split.labels, continuations, method.prompt_scoring)
    prompts = [builder.prompt_ids(t) for t in split.eval_texts]
    limit = context_limit(model.config)
    longest = max(len(p) for p in prompts) + max(len(c) for c in continuations)
    if limit is not None and longest > limit:
        raise WorkbenchError(f"the longest prompt is {longest} tokens, beyond the model's limit of {limit}: lower "
                             f"method.few_shot_k (now {method.few_shot_k}) or train.max_length "
                             f"(now {config.train.max_length})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_labels(model, prompts, continuations, method.prompt_scoring,
                          config.train.effective_eval_batch_size, pad, should_stop)
    bias = None
    if method.prompt_calibration:
        free = score_labels(model, [builder.prompt_ids(t) for t in CONTENT_FREE], continuations,
                            method.prompt_scoring, len(CONTENT_FREE), pad, should_stop)
        scores, bias = calibrate(scores, free)
    details = {"kind": "prompt", "prompt_format": "chat template" if builder.chat else "plain",
               "scoring": method.prompt_scoring, "few_shot_k": method.few_shot_k, "few_shot_rows": shots,
               "calibration": None if bias is None else {
                   "content_free": CONTENT_FREE,
                   "label_prior": {y: round(float(b), 4) for y, b in zip(split.labels, bias)}},
               "label_tokens": {y: len(c) for y, c in zip(split.labels, continuations)},
               "probabilities": "softmax of the label scores (renormalised over the labels)",
               "prompt_tokens_max": max(len(p) for p in prompts),
               "example_prompt": builder.prompt(split.eval_texts[0])[:PROMPT_SHOWN_CHARS]}
    return scores, details, sum(p.numel() for p in model.parameters())



def evaluate_zero_shot(config: Config, source: ModelSource, split: Split,
                       should_stop: Callable[[], bool]) -> tuple[np.ndarray, dict[str, Any], int]:
    """(class scores per eval text, how they were made, the model's parameter count)."""
    evaluate = _evaluate_embedding if "encoder" in config.method.spec.model_kinds else _evaluate_prompt
    return evaluate(config, source, split, should_stop)
