"""Loading a generation model (a causal LM for chat, an encoder-decoder for seq2seq) with full, lora or qlora."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..catalog import ModelSource
from ..config import Config
from .adapters import bnb_config, check_quantization, disable_bnb_inference_repack, resolve_targets
from .loading import check_context, count_parameters, load_pretrained, output_module


@dataclass
class GenerationModel:
    """A causal LM ready to train or answer, its tokenizer, and what the method did."""

    model: torch.nn.Module
    tokenizer: Any
    target_modules: list[str]
    trainable_params: int
    total_params: int
    output_module: str
    encoder: Any = None  # the task's encoder (tokens and labels), set by the task when it builds the model


def check_generation_method(config: Config, model_config: Any, auto_class: Any) -> None:
    """Weight-free checks both generation tasks share: the context length, the adapter targets (on a meta
    skeleton of `auto_class`), bitsandbytes for qlora."""
    check_context(config, model_config)
    if config.method.uses_adapters:
        with torch.device("meta"):
            skeleton = auto_class.from_config(model_config, trust_remote_code=config.trust_remote_code)
        resolve_targets(skeleton, config.method, [output_module(skeleton)])
    check_quantization(config.method)


def load_generation_model(config: Config, source: ModelSource, tokenizer: Any, auto_class: Any, task_type: str,
                          prepare: Callable[[torch.nn.Module], None] | None = None) -> GenerationModel:
    """Load a generation model (`auto_class`: causal LM or seq2seq) and apply full, lora or qlora.

    The one loader of both generation tasks: fp32 weights (qlora: a 4-bit backbone, the output layer in full
    precision), the pad token set from the tokenizer, `prepare(model)` for what a task adds (the decoder
    start, a forced first token), then adapters on every linear layer but the output (peft `task_type`).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    method = config.method
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method.spec.quantized:
        kwargs["quantization_config"] = bnb_config(method, ["lm_head"])  # the output layer stays full precision
    model = load_pretrained(auto_class, source, config.trust_remote_code, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if prepare is not None:
        prepare(model)
    output = output_module(model)
    targets: list[str] = []
    if method.spec.trains_backbone:
        model.requires_grad_(True)
    else:
        if method.spec.quantized:
            disable_bnb_inference_repack(model)  # else LoRA gradients vanish after an eval pass
        targets = resolve_targets(model, method, [output])
        model = get_peft_model(model, LoraConfig(
            task_type=getattr(TaskType, task_type), r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
            target_modules=list(targets), use_rslora=method.use_rslora, use_dora=method.use_dora))
    trainable, total = count_parameters(model)
    return GenerationModel(model, tokenizer, targets, trainable, total, output)


def generation_kwargs(tokenizer: Any, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0) -> dict[str, Any]:
    """Decoding that stops at the end of the answer: greedy at temperature 0 (the default), else sampling
    from the next-token distribution at that temperature, kept to the smallest set of tokens whose
    probabilities reach `top_p` (OpenAI's meaning of both)."""
    sampling = temperature > 0
    return {"max_new_tokens": max_new_tokens, "do_sample": sampling, "temperature": temperature if sampling else None,
            "top_p": top_p if sampling and top_p < 1 else None, "top_k": 0 if sampling else None,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
