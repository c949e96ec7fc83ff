"""Building a text classifier: a sequence-classification head on an encoder, or a causal LM that scores
label tokens (llm_classifier.py), with the tuning method applied; and the weight-free checks before a run.

A causal-LM checkpoint (LlamaForCausalLM, ...) is not given a new classification head: it becomes an
`LLMClassifier`, which scores the label tokens after the zero-shot prompt (head-only and prefix-tuning are
refused there). `num_labels=1` with `regression=True` builds the same encoder with a one-output head and
transformers' mean-squared-error loss (task text-regression).
"""

from __future__ import annotations

from typing import Any

import torch

from ..catalog import ModelSource, hub_error
from ..config import Config
from ..errors import WorkbenchError
from .adapters import (adapter_targets, apply_method, bnb_config, check_quantization, head_module_names,
                       prefix_tuning_refusal)
from .built import BuiltModel
from .llm_classifier import build_llm_classifier, check_llm_fits
from .loading import (architecture, check_context, count_parameters, is_causal_lm, load_config, load_kwargs,
                      load_tokenizer, quiet_libraries)


def build_model(config: Config, source: ModelSource, labels: list[str], total_steps: int | None = None,
                regression: bool = False) -> BuiltModel:
    """Load the pretrained model for `config.task` and apply the tuning method.

    `total_steps` is the number of optimiser steps the run will take: adalora schedules its rank
    pruning over them. Left out (prediction, export), adalora builds without a pruning schedule.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_libraries()
    method = config.method
    model_config = load_config(source, config.trust_remote_code)
    limit = check_context(config, model_config)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    if is_causal_lm(model_config):  # label-token scoring, not a new head (llm_classifier.py)
        if regression:
            raise WorkbenchError(regression_refusal(config.model, model_config))
        return build_llm_classifier(config, source, labels, model_config, tokenizer, limit, total_steps)
    kwargs = load_kwargs(source, config.trust_remote_code)
    kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={name: i for i, name in enumerate(labels)}, dtype=torch.float32)
    if regression:  # one output, transformers' mean-squared-error loss
        kwargs["problem_type"] = "regression"
    if method.spec.quantized:
        kwargs["quantization_config"] = bnb_config(method, _head_names_on_meta(model_config, len(labels)))
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source.path, output_loading_info=True, **kwargs)
    except OSError as exc:
        if source.origin == "hub":
            raise hub_error(source.name, exc) from None
        raise WorkbenchError(f"model {source.name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
    except ValueError as exc:
        raise WorkbenchError(f"model {source.name!r} cannot classify text ({str(exc).splitlines()[0]}): "
                             "choose an encoder or a causal LM with a sequence-classification head") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    missing = set(info.get("missing_keys", ()))
    heads = head_module_names(model, missing)
    built = BuiltModel(model=model, tokenizer=tokenizer, head_modules=heads, max_length_limit=limit,
                       method=method.name, fresh_modules=sorted({key.rsplit(".", 1)[0] for key in missing}))
    built.model, built.target_modules = apply_method(model, method, heads, total_steps)
    built.trainable_params, built.total_params = count_parameters(built.model)
    return built


def _head_names_on_meta(model_config: Any, num_labels: int) -> list[str]:
    """Head module names, found on an empty (meta) model, to keep out of 4-bit quantisation."""
    import copy

    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(model_config)
    cfg.num_labels = num_labels
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(cfg)
    return head_module_names(skeleton)


def check_model_fits(config: Config, source: ModelSource, num_labels: int, regression: bool = False) -> None:
    """The model-dependent checks, on an empty (meta) model: context length, adapter targets, and
    whether the architecture can take the method at all (prefix-tuning)."""
    from transformers import AutoModelForSequenceClassification

    method = config.method
    model_config = load_config(source, config.trust_remote_code)
    check_context(config, model_config)
    if is_causal_lm(model_config):
        if regression:
            raise WorkbenchError(regression_refusal(config.model, model_config))
        check_llm_fits(config, model_config)
    elif method.uses_peft:
        model_config.num_labels = num_labels
        try:
            with torch.device("meta"):
                skeleton = AutoModelForSequenceClassification.from_config(
                    model_config, trust_remote_code=config.trust_remote_code)
        except ValueError as exc:
            raise WorkbenchError(f"model {source.name!r} cannot classify text ({str(exc).splitlines()[0]})") from None
        if method.spec.peft_type == "PREFIX_TUNING" and (why := prefix_tuning_refusal(skeleton)):
            raise WorkbenchError(why)
        adapter_targets(skeleton, method, head_module_names(skeleton))
    check_quantization(method)



def regression_refusal(name: str, model_config: Any) -> str:
    return (f"task text-regression needs an encoder with a regression head (such as minilm-l6): model {name!r} is "
            f"a causal language model ({architecture(model_config)})")
