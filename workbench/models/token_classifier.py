"""Building a token classifier: a tag per sub-word token on an encoder (AutoModelForTokenClassification),
with the tuning method applied through its spec (full, head-only, the adapter methods, qlora on a 4-bit
base with the head kept out of quantisation); and the weight-free checks before a run.

A causal LM is refused: it reads left to right, so a token's tag could not depend on the words after it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..catalog import ModelSource
from ..config import Config
from ..errors import WorkbenchError
from .adapters import adapter_targets, apply_method, bnb_config, head_module_names
from .built import BuiltModel
from .loading import (architecture, check_context, count_parameters, is_causal_lm, load_config, load_pretrained,
                      load_tokenizer, quiet_libraries)
from .vocabulary import extend_vocabulary

EMBEDDING_LEARNING_RATE = 1e-3  # the word embeddings' rate when rows were added (vocabulary.py: 0.50 vs 0.31)

PEFT_TASK_TYPE = "TOKEN_CLS"


def _label_kwargs(tags: list[str]) -> dict[str, Any]:
    return {"num_labels": len(tags), "id2label": dict(enumerate(tags)),
            "label2id": {name: i for i, name in enumerate(tags)}}


def causal_refusal(name: str, model_config: Any) -> str:
    return (f"task token-classification needs an encoder that reads the whole sentence (such as minilm-l6): model "
            f"{name!r} is a causal language model ({architecture(model_config)}), which tags a word before it "
            "reads the words after it")


def skeleton(model_config: Any, tags: list[str], trust_remote_code: bool = False) -> torch.nn.Module:
    """The token classifier with no weights (on the meta device): its layer names, for checks and for the
    4-bit skip list."""
    from transformers import AutoModelForTokenClassification

    cfg = copy.deepcopy(model_config)
    for key, value in _label_kwargs(tags).items():
        setattr(cfg, key, value)
    try:
        with torch.device("meta"):
            return AutoModelForTokenClassification.from_config(cfg, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise WorkbenchError(f"model architecture {architecture(model_config)} has no token-classification head "
                             f"({str(exc).splitlines()[0]}): choose an encoder such as minilm-l6") from None


def check_token_model(config: Config, source: ModelSource, tags: list[str]) -> None:
    """Weight-free checks: an encoder, the context length, the method's targets, bitsandbytes for qlora."""
    method = config.method
    model_config = load_config(source, config.trust_remote_code)
    if is_causal_lm(model_config):
        raise WorkbenchError(causal_refusal(config.model, model_config))
    check_context(config, model_config)
    empty = skeleton(model_config, tags, config.trust_remote_code)
    adapter_targets(empty, method, head_module_names(empty))  # a target_modules typo fails here
    if method.spec.quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkbenchError(f"method {method.name} needs bitsandbytes: pip install bitsandbytes") from None


def build_token_classifier(config: Config, source: ModelSource, tags: list[str],
                           total_steps: int | None = None, added_tokens: list[str] | None = None) -> BuiltModel:
    """The pretrained encoder with a token-classification head of `tags`, the method applied.

    `added_tokens`: tokens to add to the vocabulary before the method is applied (what a run added from its
    training text, read back from tags.json), in the same order so that they get the same ids. When any are
    added, the word embeddings train under every method (a peft method or head-only would otherwise leave
    the new rows at their starting mean) and `built.learning_rates` asks the optimiser for a larger rate for
    them (see `embedding_rates`)."""
    from transformers import AutoModelForTokenClassification

    quiet_libraries()
    method, spec = config.method, config.method.spec
    model_config = load_config(source, config.trust_remote_code)
    if is_causal_lm(model_config):
        raise WorkbenchError(causal_refusal(config.model, model_config))
    limit = check_context(config, model_config)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise WorkbenchError(f"model {source.name!r} has no fast tokenizer: token classification needs one to align "
                             "tags with sub-word tokens (word_ids)")
    kwargs: dict[str, Any] = {**_label_kwargs(tags), "dtype": torch.float32}
    if spec.quantized:
        kwargs["quantization_config"] = bnb_config(method, head_module_names(
            skeleton(model_config, tags, config.trust_remote_code)))
    model, info = load_pretrained(AutoModelForTokenClassification, source, config.trust_remote_code,
                                  output_loading_info=True, **kwargs)
    heads = head_module_names(model, set(info.get("missing_keys", ())))
    added = extend_vocabulary(tokenizer, model, list(added_tokens or []))
    built = BuiltModel(model=model, tokenizer=tokenizer, head_modules=heads, max_length_limit=limit,
                       method=method.name)
    built.model, built.target_modules = apply_method(model, method, heads, total_steps, task_type=PEFT_TASK_TYPE)
    built.added_tokens = added  # type: ignore[attr-defined]
    built.learning_rates = embedding_rates(built.model, config) if added else {}  # type: ignore[attr-defined]
    built.trainable_params, built.total_params = count_parameters(built.model)
    return built


def embedding_rates(model: torch.nn.Module, config: Config) -> dict[str, float]:
    """Make the input word embeddings trainable and give their parameter name the embedding rate.

    Returns {parameter name: learning rate} for the optimiser (workbench/loop/trainer.py builds a parameter
    group of these). The rate is EMBEDDING_LEARNING_RATE, or the run's own rate when that is larger."""
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(True)
    name = next(n for n, p in model.named_parameters() if p is weight)
    rate = max(EMBEDDING_LEARNING_RATE, config.train.learning_rate or 0.0)
    return {name: rate}
