"""Building a language model for continued pretraining: the checkpoint's own language-modelling head, a masked
LM for an encoder (BERT, RoBERTa, ...) or a causal LM for a decoder (Llama, GPT-2, ...), with the tuning method
applied; the weight-free checks before a run; and saving the adapted model as a plain Hugging Face directory.

"The head" here is what the checkpoint lacks of the language-modelling head: all-MiniLM-L6-v2 ships a bare
BertModel, so BertForMaskedLM starts its prediction transform (a dense layer and a LayerNorm) and its per-token
output bias fresh; the output projection itself is tied to the word embeddings, which the checkpoint has. Those
fresh layers train beside the adapters when method.train_head is on (the default); the output projection never
gets adapters.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..catalog import ModelSource
from ..config import Config
from ..errors import WorkbenchError
from .adapters import adapter_targets, apply_method, bnb_config, check_quantization, merge_adapters
from .loading import (architecture, check_context, count_parameters, is_causal_lm, load_config, load_kwargs,
                      load_tokenizer, output_module, quiet_libraries)

Objective = Literal["masked", "causal"]
MLM_PROBABILITY = 0.15  # BERT's share of masked tokens
PEFT_TASK_TYPES = {"masked": "TOKEN_CLS", "causal": "CAUSAL_LM"}  # peft has no masked-LM type: a token per position


@dataclass
class LanguageModel:
    """A language model ready to train, its tokenizer, and what the method did to it."""

    model: torch.nn.Module
    tokenizer: Any
    objective: Objective
    head_modules: list[str]  # fresh head layers that train as a whole (peft modules_to_save)
    head_params: list[str]  # fresh head parameters on a module that also holds the output layer (the MLM bias)
    target_modules: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    collator: Any = None  # masked: transformers' DataCollatorForLanguageModeling, which masks training batches


def objective_of(model_config: Any, name: str) -> Objective:
    """Masked LM for an encoder, causal LM for a decoder; an encoder-decoder is refused."""
    if getattr(model_config, "is_encoder_decoder", False):
        raise WorkbenchError(f"model {name!r} is an encoder-decoder ({architecture(model_config)}): continued "
                             "pretraining takes an encoder (masked LM) or a decoder (causal LM); train it on "
                             "pairs with task: seq2seq")
    return "causal" if is_causal_lm(model_config) else "masked"


def auto_class(objective: Objective) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if objective == "causal" else AutoModelForMaskedLM


def output_layers(model: torch.nn.Module) -> list[str]:
    """The language-modelling head's top-level modules (all but the backbone: BERT's `cls`, Llama's `lm_head`):
    kept out of 4-bit quantisation and never given adapters."""
    prefix = getattr(model, "base_model_prefix", "")
    return [name for name, _ in model.named_children() if name != prefix] or [output_module(model)]


def _skeleton(config: Config, model_config: Any, objective: Objective) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            return auto_class(objective).from_config(model_config, trust_remote_code=config.trust_remote_code)
    except ValueError as exc:
        raise WorkbenchError(f"model {config.model!r} has no {objective} language-modelling head in transformers "
                             f"({str(exc).splitlines()[0]}): choose an encoder with a masked-LM head or a "
                             "causal LM") from None


def check_language_model(config: Config, source: ModelSource) -> Objective:
    """Every model check that needs no weights: the kind, the context length, a mask token for a masked LM,
    the adapter targets (on a meta skeleton) and bitsandbytes for qlora. Returns the objective."""
    model_config = load_config(source, config.trust_remote_code)
    objective = objective_of(model_config, config.model)
    check_context(config, model_config)
    if objective == "masked" and load_tokenizer(source, config.trust_remote_code).mask_token is None:
        raise WorkbenchError(f"model {config.model!r} is an encoder whose tokenizer has no mask token, so it "
                             "cannot be trained as a masked LM: choose another encoder or a causal LM")
    if config.method.uses_adapters:
        skeleton = _skeleton(config, model_config, objective)
        adapter_targets(skeleton, config.method, output_layers(skeleton))
    check_quantization(config.method)
    return objective


def fresh_head(model: torch.nn.Module, missing: set[str]) -> tuple[list[str], list[str]]:
    """(modules, parameters) of the head that the checkpoint lacked. A fresh parameter on a module that also
    holds the output layer (BERT's per-token bias beside its tied decoder) is listed alone, so that the output
    layer (the word embeddings, when tied) is never copied into the trained head."""
    output = output_module(model)
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    modules: set[str] = set()
    loose: list[str] = []
    for key in sorted(missing):
        if key not in params:
            continue  # a tied copy of a loaded weight
        owner = key.rsplit(".", 1)[0]
        if owner == output or output.startswith(owner + "."):
            loose.append(key)
        else:
            modules.add(owner)
    return sorted(modules), loose


def build_language_model(config: Config, source: ModelSource, total_steps: int | None = None) -> LanguageModel:
    """Load the checkpoint with its language-modelling head and apply the tuning method.

    `total_steps`: the run's optimiser steps, over which adalora prunes its ranks (None: no schedule).
    """
    quiet_libraries()
    objective = check_language_model(config, source)
    method = config.method
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    kwargs: dict[str, Any] = {**load_kwargs(source, config.trust_remote_code), "dtype": torch.float32}
    if method.spec.quantized:
        skeleton = _skeleton(config, load_config(source, config.trust_remote_code), objective)
        kwargs["quantization_config"] = bnb_config(method, output_layers(skeleton))
    try:
        model, info = auto_class(objective).from_pretrained(source.path, output_loading_info=True, **kwargs)
    except OSError as exc:
        raise WorkbenchError(f"model {source.name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads, loose = fresh_head(model, set(info.get("missing_keys", ())))
    model, targets = apply_method(model, method, heads, total_steps, PEFT_TASK_TYPES[objective],
                                  excluded=heads + output_layers(model))
    if method.uses_peft and method.train_head:
        base = model.get_base_model()
        for name in loose:
            base.get_parameter(name).requires_grad_(True)
    built = LanguageModel(model, tokenizer, objective, heads, loose, targets)
    built.trainable_params, built.total_params = count_parameters(model)
    if objective == "masked":
        from transformers import DataCollatorForLanguageModeling

        built.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY)
    return built


def save_base_model(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """The model with its adapters merged (a plain transformers model) and its tokenizer, saved as safetensors
    in `out`, written to a temporary folder first and renamed."""
    plain = merge_adapters(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
