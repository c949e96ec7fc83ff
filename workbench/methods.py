"""Tuning methods: build a model whose trainable parameters match the chosen method.

- full:      every parameter trains.
- head-only: the encoder is frozen; the task head trains (classifier and pooler).
- lora:      low-rank adapters on the backbone's linear layers, plus the head.
- qlora:     lora on a 4-bit (bitsandbytes) base; the head stays unquantised.
             lora and qlora take two variants: rsLoRA (alpha / sqrt(r)) and DoRA.
- adalora:   SVD-shaped adapters whose ranks are pruned from init_r to an average of r
             while training; the loop calls `after_optimizer_step` after each step.
- ia3:       learned vectors that rescale keys, values and the feed-forward activations.
- prompt-tuning: trained virtual token embeddings put before every input.
- prefix-tuning: trained keys and values before every layer's attention; refused where
             peft cannot pass them to the architecture (BERT and others on this stack).

Every peft method keeps the head trainable through peft's modules_to_save.

A causal-LM checkpoint (LlamaForCausalLM, ...) is not given a new classification head: it becomes an
`llm_classifier.LLMClassifier`, which scores the label tokens after the zero-shot prompt (see that module;
head-only and prefix-tuning are refused there).

"The head" is the classifier plus the pooler and any layer the checkpoint did
not provide. TRAPS.md shows why that matters: a frozen pooler that was never
trained for the task caps LoRA accuracy far below full fine-tuning.
"""

from __future__ import annotations

import socket
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .catalog import MODELS, ModelSource, hub_error
from .config import VIRTUAL_TOKEN_METHODS, Config, MethodConfig
from .errors import WorkbenchError

HEAD_TOP_LEVEL = ("classifier", "score", "pre_classifier", "pooler")


@dataclass
class BuiltModel:
    """A model ready to train, its tokenizer, and what the method did to it."""

    model: nn.Module
    tokenizer: Any
    head_modules: list[str]
    target_modules: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    max_length_limit: int | None = None
    method: str = ""
    prompt: Any = None  # a causal-LM classifier's zeroshot.PromptBuilder: texts go in as prompts

    def encode(self, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
        """Token ids (and masks) of each text as this model reads it, unpadded; collate pads them on the
        tokenizer's padding side (left for a causal-LM classifier). An encoder reads the text cut to
        `max_length` tokens; a causal-LM classifier reads its prompt with the text cut to `max_length`."""
        if self.prompt is None:
            return tokenize_texts(self.tokenizer, texts, max_length)
        from .llm_classifier import prompt_encodings, with_max_length

        longest_label = max(len(c) for c in self.prompt.label_ids())
        return prompt_encodings(with_max_length(self.prompt, max_length), texts, self.max_length_limit,
                                longest_label)


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """The tokenizer's ids of each text, truncated to `max_length`, as one dict per text."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]


# --- loading -------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_kwargs(source: ModelSource, trust_remote_code: bool) -> dict[str, Any]:
    """Keyword arguments for from_pretrained; offline hub ids use the local cache only."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.origin == "hub":
        import os

        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            kwargs["local_files_only"] = True  # a cached copy still works; no 20 s of retries
    return kwargs


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **load_kwargs(source, trust_remote_code))
    except OSError as exc:
        if source.origin == "hub":
            raise hub_error(source.name, exc) from None
        raise WorkbenchError(f"model {source.name!r} has no usable tokenizer ({exc}): "
                             "save the tokenizer next to the weights") from None
    if tokenizer.pad_token is None:  # causal LMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **load_kwargs(source, trust_remote_code))
    except OSError as exc:
        if source.origin == "hub":
            raise hub_error(source.name, exc) from None
        raise WorkbenchError(f"model {source.name!r} could not be read ({exc})") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise WorkbenchError(f"model {source.name!r} ships its own code: set trust_remote_code: true "
                                 "only if you trust its authors") from None
        raise WorkbenchError(f"model {source.name!r} could not be read ({str(exc).splitlines()[0]})") from None


def context_limit(model_config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_context(config: Config, model_config: Any) -> int | None:
    limit = context_limit(model_config)
    if limit is not None and config.train.max_length > limit:
        raise WorkbenchError(f"train.max_length = {config.train.max_length} is beyond the model's limit of "
                             f"{limit} tokens: set train.max_length <= {limit}")
    virtual = config.method.num_virtual_tokens if config.method.name in VIRTUAL_TOKEN_METHODS else 0
    if limit is not None and virtual and config.train.max_length + virtual > limit:
        raise WorkbenchError(f"train.max_length = {config.train.max_length} plus method.num_virtual_tokens = "
                             f"{virtual} is beyond the model's limit of {limit} tokens: "
                             f"keep their sum <= {limit}")
    return limit


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers (LoRA candidates), bitsandbytes layers included."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def head_module_names(model: nn.Module, missing_keys: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The task head: modules outside the backbone, the pooler, and layers the checkpoint lacked."""
    prefix = getattr(model, "base_model_prefix", "")
    heads: set[str] = set()
    for name, _ in model.named_children():
        if name != prefix and name in HEAD_TOP_LEVEL:
            heads.add(name)
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is not None:
        for name, _ in backbone.named_children():
            if name == "pooler":
                heads.add(f"{prefix}.{name}")
    for key in missing_keys:
        module = key.rsplit(".", 1)[0]
        if not any(module == h or module.startswith(h + ".") for h in heads):
            heads.add(module)
    return sorted(heads)


def _in_any(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_targets(model: nn.Module, method: MethodConfig, heads: list[str]) -> list[str]:
    """Full names of the layers that get adapters; 'auto' = every backbone linear layer."""
    linear = [n for n in linear_layer_names(model) if not _in_any(n, heads)]
    if isinstance(method.target_modules, str):  # 'auto' and its alias 'all-linear'
        return linear
    chosen: list[str] = []
    short = sorted({n.rsplit(".", 1)[-1] for n in linear})
    for wanted in method.target_modules:
        hits = [n for n in linear if n == wanted or n.endswith("." + wanted)]
        if not hits:
            raise WorkbenchError(f"method.target_modules: {wanted!r} is not a linear layer of this model; "
                                 f"valid names: {', '.join(short)}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


# Short names of key and value projections across architectures (BERT, RoBERTa, DistilBERT,
# Llama/Qwen/Mistral, T5-style and diffusers-style names).
KEY_VALUE_NAMES = ("key", "value", "k_proj", "v_proj", "k_lin", "v_lin", "k", "v", "wk", "wv", "to_k", "to_v")
_FFN_SIZE_ATTRS = ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff", "encoder_ffn_dim")


def _feedforward_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in _FFN_SIZE_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def feedforward_down_projections(model: nn.Module, names: list[str]) -> list[str]:
    """Of `names`, the feed-forward down projections (intermediate -> hidden): IA3 scales their input.

    Found by shape, not by name: a linear layer that narrows its input, and whose input width is
    the config's feed-forward size where the config names one. Key/value layers that narrow
    (grouped-query attention) are never counted.
    """
    modules = dict(model.named_modules())
    ffn = _feedforward_size(model)
    down = []
    for n in names:
        layer = modules[n]
        if n.rsplit(".", 1)[-1] in KEY_VALUE_NAMES or layer.in_features <= layer.out_features:
            continue
        if ffn is None or layer.in_features == ffn:
            down.append(n)
    return down


def ia3_targets(model: nn.Module, method: MethodConfig, heads: list[str]) -> tuple[list[str], list[str]]:
    """(target layers, feed-forward layers) for IA3; the second is a subset of the first.

    'auto' follows the IA3 paper: rescale keys, values and the feed-forward activations, found
    among the backbone's linear layers for any architecture; 'all-linear' or a list picks the
    layers as for lora, and the feed-forward ones among them are found by shape.
    """
    if method.target_modules != "auto":
        targets = resolve_targets(model, method, heads)
        return targets, feedforward_down_projections(model, targets)
    linear = [n for n in linear_layer_names(model) if not _in_any(n, heads)]
    kv = [n for n in linear if n.rsplit(".", 1)[-1] in KEY_VALUE_NAMES]
    if not kv:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise WorkbenchError("method ia3: no key/value projection found among this model's linear layers "
                             f"({', '.join(short) or 'none'}): set method.target_modules to the layers to rescale")
    ff = feedforward_down_projections(model, linear)
    return [n for n in linear if n in kv or n in ff], ff


def prefix_tuning_refusal(model: nn.Module) -> str | None:
    """Why peft's prefix tuning cannot run on this model, or None when it can.

    peft 0.21 hands the prefix to the model (or its backbone) as `past_key_values`; transformers 5
    renamed that argument (to `cache`) or dropped it, and peft then fails on the first forward.
    The check reads the same signatures peft reads, so it lifts itself once either library catches up.
    """
    import inspect

    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    for module in (model, backbone):
        if module is not None and "past_key_values" in inspect.signature(module.forward).parameters:
            return None
    arch = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    return (f"method prefix-tuning does not work on {arch} (model_type {model_type!r}) with this peft and "
            "transformers: peft passes the prefix as `past_key_values`, which this architecture's forward no "
            "longer accepts. Use prompt-tuning (trained virtual tokens, the closest method), lora or ia3 instead")


def _is_causal_lm(model_config: Any) -> bool:
    from .zeroshot import is_causal_lm

    return is_causal_lm(model_config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a 4-bit weight stores two values per byte and counts twice its numel."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and p.__class__.__name__ == "Params4bit" else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# --- building -------------------------------------------------------------------

def quiet_libraries() -> None:
    """Load reports and progress bars are noise in a run log; warnings that matter still show."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*newly initialized.*")


def build_model(config: Config, source: ModelSource, labels: list[str], total_steps: int | None = None) -> BuiltModel:
    """Load the pretrained model for `config.task` and apply the tuning method.

    `total_steps` is the number of optimiser steps the run will take: adalora schedules its rank
    pruning over them. Left out (prediction, export), adalora builds without a pruning schedule.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_libraries()
    method = config.method
    model_config = load_config(source, config.trust_remote_code)
    limit = _check_context(config, model_config)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    if _is_causal_lm(model_config):  # label-token scoring, not a new head (llm_classifier.py)
        from .llm_classifier import build_llm_classifier

        return build_llm_classifier(config, source, labels, model_config, tokenizer, limit, total_steps)
    kwargs = load_kwargs(source, config.trust_remote_code)
    kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                  label2id={name: i for i, name in enumerate(labels)}, dtype=torch.float32)
    if method.name == "qlora":
        kwargs["quantization_config"] = _bnb_config(method, _head_names_on_meta(model_config, len(labels)))
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

    heads = head_module_names(model, set(info.get("missing_keys", ())))
    built = BuiltModel(model=model, tokenizer=tokenizer, head_modules=heads, max_length_limit=limit,
                       method=method.name)
    if method.name == "full":
        model.requires_grad_(True)
    elif method.name == "head-only":
        model.requires_grad_(False)
        _unfreeze(model, heads)
    else:
        if method.name == "prefix-tuning" and (why := prefix_tuning_refusal(model)):
            raise WorkbenchError(why)
        if method.name == "qlora":
            disable_bnb_inference_repack(model)
        feedforward: list[str] = []
        if method.name == "ia3":
            built.target_modules, feedforward = ia3_targets(model, method, heads)
        elif method.uses_adapters:
            built.target_modules = resolve_targets(model, method, heads)
        built.model = _apply_peft(model, method, built.target_modules, heads, feedforward, total_steps)
    built.trainable_params, built.total_params = count_parameters(built.model)
    return built


def _unfreeze(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)


def peft_config(method: MethodConfig, targets: list[str], heads: list[str], feedforward: list[str] = (),
                total_steps: int | None = None, task_type: str = "SEQ_CLS") -> Any:
    """The peft config of a peft method; the head trains through modules_to_save (TRAPS.md: pooler).

    `task_type` "CAUSAL_LM" is for a causal-LM classifier, which has no head (`heads` is empty)."""
    from peft import (AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                      TaskType)

    classifier = [h for h in heads if "." not in h and h != "pooler"]
    to_save = list(heads) if method.train_head else classifier
    common: dict[str, Any] = dict(task_type=TaskType(task_type), modules_to_save=to_save or None)
    if method.name in ("lora", "qlora"):
        return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                          target_modules=list(targets),  # copies: peft extends these lists in place
                          use_rslora=method.use_rslora, use_dora=method.use_dora, **common)
    if method.name == "adalora":
        # Without a step count (prediction, export) the schedule is moot: one step, nothing pruned.
        steps = total_steps if total_steps and total_steps > 0 else 1
        tinit, tfinal = int(method.rank_warmup_ratio * steps), int(method.rank_final_ratio * steps)
        return AdaLoraConfig(init_r=method.init_r, target_r=method.r, lora_alpha=method.alpha,
                             lora_dropout=method.dropout, target_modules=list(targets), total_step=steps,
                             tinit=tinit, tfinal=tfinal, **common)
    if method.name == "ia3":
        return IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward), **common)
    if method.name == "prompt-tuning":
        return PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, **common)
    if method.name == "prefix-tuning":
        return PrefixTuningConfig(num_virtual_tokens=method.num_virtual_tokens, **common)
    raise WorkbenchError(f"method {method.name!r} is not a peft method")


def _apply_peft(model: nn.Module, method: MethodConfig, targets: list[str], heads: list[str],
                feedforward: list[str], total_steps: int | None, task_type: str = "SEQ_CLS") -> nn.Module:
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(method, targets, heads, feedforward, total_steps, task_type))
    if method.name == "adalora":
        # our marker, read by after_optimizer_step: prune ranks only on a real schedule
        peft_model.workbench_rank_schedule = bool(total_steps)
    return peft_model


def after_optimizer_step(built: BuiltModel, step: int) -> None:
    """Call after each optimiser step, before zero_grad (step counts from 1); adalora prunes ranks here.

    A no-op for every other method, and for adalora built without `total_steps`.
    """
    if built.method != "adalora":
        return
    model = peft_model_of(built.model)
    if not getattr(model, "workbench_rank_schedule", False):
        return
    if step > model.peft_config[model.active_adapter].total_step:
        return  # past the schedule it was built for (a resumed or longer run): keep the ranks as they are
    model.base_model.update_and_allocate(step)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing on the pretrained model inside (peft, LLM classifier wrappers).

    Non-reentrant checkpoints: they need no input that requires grad (frozen embeddings under peft are
    fine) and restore the RNG state, so a recomputed dropout mask is the one first drawn.
    """
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not getattr(inner, "supports_gradient_checkpointing", False):
        kind = type(inner or model).__name__
        raise WorkbenchError(f"{kind} does not support gradient checkpointing: set train.gradient_checkpointing "
                             "to false")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(inner.config, "use_cache", False):
        inner.config.use_cache = False  # a cache is useless in training and clashes with recomputation


def peft_model_of(model: nn.Module) -> nn.Module:
    """The model peft built: a causal-LM classifier holds it as `.lm`; otherwise the model itself."""
    from .llm_classifier import LLMClassifier

    return model.lm if isinstance(model, LLMClassifier) else model


def _head_names_on_meta(model_config: Any, num_labels: int) -> list[str]:
    """Head module names, found on an empty (meta) model, to keep out of 4-bit quantisation."""
    import copy

    from transformers import AutoModelForSequenceClassification

    cfg = copy.deepcopy(model_config)
    cfg.num_labels = num_labels
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(cfg)
    return head_module_names(skeleton)


def _bnb_config(method: MethodConfig, skip: list[str]) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, method.compute_dtype),
        llm_int8_skip_modules=skip,  # a 4-bit 2-output head fails at eval (TRAPS.md)
    )


def disable_bnb_inference_repack(model: nn.Module) -> int:
    """TRAPS.md: after one no-grad eval pass, bitsandbytes repacks 4-bit weights into an
    inference-only layout on AVX512-BF16 CPUs, and LoRA gradients silently become zero.
    Turning the repack off keeps the weights trainable. Returns how many layers it touched."""
    import bitsandbytes as bnb

    touched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def check_model_fits(config: Config, source: ModelSource, num_labels: int) -> None:
    """The model-dependent checks, on an empty (meta) model: context length, adapter targets, and
    whether the architecture can take the method at all (prefix-tuning)."""
    from transformers import AutoModelForSequenceClassification

    method = config.method
    model_config = load_config(source, config.trust_remote_code)
    _check_context(config, model_config)
    if _is_causal_lm(model_config):
        from .llm_classifier import check_llm_fits

        check_llm_fits(config, model_config)
    elif method.uses_peft:
        model_config.num_labels = num_labels
        try:
            with torch.device("meta"):
                skeleton = AutoModelForSequenceClassification.from_config(
                    model_config, trust_remote_code=config.trust_remote_code)
        except ValueError as exc:
            raise WorkbenchError(f"model {source.name!r} cannot classify text ({str(exc).splitlines()[0]})") from None
        if method.name == "prefix-tuning" and (why := prefix_tuning_refusal(skeleton)):
            raise WorkbenchError(why)
        if method.name == "ia3":
            ia3_targets(skeleton, method, head_module_names(skeleton))
        elif method.uses_adapters:
            resolve_targets(skeleton, method, head_module_names(skeleton))
    if config.method.name == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkbenchError("method qlora needs bitsandbytes: pip install bitsandbytes") from None


# --- inspection -------------------------------------------------------------------

def inspect_model(name: str, home: Any = None, method: str = "lora", batch_size: int = 16,
                  max_length: int = 256, num_labels: int = 2, r: int = 8,
                  target_modules: str | list[str] = "auto", train_head: bool = True,
                  trust_remote_code: bool = False, num_virtual_tokens: int = 20, init_r: int = 12,
                  use_dora: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, adapter targets and a training-memory estimate, without loading weights.

    The trainable count is exact for every method (tests pin it against build_model); where a method
    cannot run on the architecture (prefix-tuning on BERT) it is None and `note` says why.
    """
    from transformers import AutoModelForSequenceClassification

    from .catalog import resolve_model
    from .config import METHODS, ZERO_SHOT_METHODS
    from .store import default_home

    if method not in METHODS:
        raise WorkbenchError(f"method {method!r} is unknown: choose from {', '.join(METHODS)}")
    home = Path(home) if home is not None else default_home()
    asset = MODELS.get(name)
    if asset is not None and asset.relpath.endswith(".gguf") and not (home / "models" / name).is_dir():
        # read the GGUF header only: de-quantising the weights takes half a minute
        from transformers import AutoConfig

        gguf = asset.path()
        source = ModelSource(name, str(gguf.parent), "catalog")
        model_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        source = resolve_model(name, home, trust_remote_code)
        model_config = load_config(source, trust_remote_code)
    model_config.num_labels = num_labels
    causal = _is_causal_lm(model_config)  # a causal LM classifies by label tokens: no head (llm_classifier.py)
    with torch.device("meta"):
        if causal:
            from .llm_classifier import causal_skeleton, output_head_names, refusal

            skeleton = causal_skeleton(model_config, trust_remote_code)
        else:
            skeleton = AutoModelForSequenceClassification.from_config(model_config)
    total = sum(p.numel() for p in skeleton.parameters())
    heads = [] if causal else head_module_names(skeleton)
    excluded = output_head_names(skeleton) if causal else heads  # never adapter targets
    linear = [n for n in linear_layer_names(skeleton) if not _in_any(n, excluded)]
    head_params = sum(p.numel() for n, p in skeleton.named_parameters() if _in_any(n.rsplit(".", 1)[0], heads))
    classifier = [h for h in heads if "." not in h and h != "pooler"]
    adapter_head = head_params if train_head else sum(
        p.numel() for n, p in skeleton.named_parameters() if _in_any(n.rsplit(".", 1)[0], classifier))
    knobs = MethodConfig(name=method, r=max(r, 1),
                         target_modules=target_modules if method not in VIRTUAL_TOKEN_METHODS else "auto",
                         init_r=max(init_r, r, 1), num_virtual_tokens=max(num_virtual_tokens, 1),
                         use_dora=use_dora and method in ("lora", "qlora"))
    if knobs.is_zero_shot:
        train_p, note = 0, f"{method}: nothing is trained; the estimate is for inference"
    elif causal and (why := refusal(method, type(skeleton).__name__)):
        train_p, note = None, why
    else:
        train_p, note = _trainable_estimate(skeleton, knobs, excluded, head_params, adapter_head, total)
    hidden = getattr(model_config, "hidden_size", 0) or 0
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    heads_n = getattr(model_config, "num_attention_heads", 1) or 1
    weight_bytes = total * 4 if method != "qlora" else (total - head_params) * 0.5 + head_params * 4
    optimiser_bytes = (train_p or 0) * 4 * 3  # gradient + two AdamW moments, fp32
    seq = max_length + (knobs.num_virtual_tokens if method in VIRTUAL_TOKEN_METHODS else 0)
    # Korthikanti et al. (2022): ~(34 s b h + 5 a s^2 b) bytes of 16-bit activations per layer; x2 for fp32
    per_layer = (34 * seq * batch_size * hidden + 5 * heads_n * seq**2 * batch_size) * 2
    # frozen layers (and inference) keep nothing between layers
    activation_bytes = per_layer * layers if method not in ("head-only", *ZERO_SHOT_METHODS) else per_layer
    activation_bytes *= ACTIVATION_CALIBRATION.get(method, ACTIVATION_CALIBRATION["adapters"])
    return {
        "name": name,
        "origin": source.origin,
        "architecture": (getattr(model_config, "architectures", None) or [type(skeleton).__name__])[0],
        "model_type": model_config.model_type,
        "parameters": total,
        "context_length": context_limit(model_config),
        "linear_layers": sorted({n.rsplit(".", 1)[-1] for n in linear}),
        "head_modules": heads,
        "offline": source.origin != "hub",
        "in_catalog": name in MODELS,
        "method": method,
        "trainable_parameters": train_p,
        "note": note,
        "memory_estimate_mb": round((weight_bytes + optimiser_bytes + activation_bytes) / 2**20 + RUNTIME_MB),
        "memory_breakdown_mb": {
            "runtime": RUNTIME_MB,
            "weights": round(weight_bytes / 2**20),
            "gradients_and_optimiser": round(optimiser_bytes / 2**20),
            "activations": round(activation_bytes / 2**20),
        },
    }


# Measured on minilm-l6, CPU fp32, one training step at batch 16 x 256 tokens (peak RSS growth
# over the formula): autograd keeps more than the formula says, adapter paths (dropout copies,
# low-rank intermediates) most of all. RUNTIME_MB is the Python + torch + transformers process
# itself, so the estimate compares with a run's measured `peak_memory_mb`.
ACTIVATION_CALIBRATION = {"full": 1.2, "head-only": 1.35, "adapters": 2.2}
RUNTIME_MB = 450


def _token_dim(model_config: Any) -> int:
    """The width peft gives virtual tokens (its own lookup order)."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _trainable_estimate(skeleton: nn.Module, method: MethodConfig, heads: list[str], head_params: int,
                        adapter_head: int, total: int) -> tuple[int | None, str | None]:
    """Trainable parameters of `method` on an empty model, by each method's formula (peft's shapes)."""
    modules = dict(skeleton.named_modules())
    cfg = skeleton.config
    name = method.name
    if name == "full":
        return total, None
    if name == "head-only":
        return head_params, None
    if name in ("lora", "qlora"):
        targets = resolve_targets(skeleton, method, heads)
        per = sum(method.r * (modules[n].in_features + modules[n].out_features) for n in targets)
        magnitude = sum(modules[n].out_features for n in targets) if method.use_dora else 0
        return per + magnitude + adapter_head, None
    if name == "adalora":  # A (r x in), B (out x r), E (r singular values) per target
        targets = resolve_targets(skeleton, method, heads)
        return sum(method.init_r * (modules[n].in_features + modules[n].out_features + 1)
                   for n in targets) + adapter_head, None
    if name == "ia3":  # one vector per target: its output width, or its input width for feed-forward layers
        targets, ff = ia3_targets(skeleton, method, heads)
        return sum(modules[n].in_features if n in ff else modules[n].out_features
                   for n in targets) + adapter_head, None
    if name == "prompt-tuning":
        return method.num_virtual_tokens * _token_dim(cfg) + adapter_head, None
    why = prefix_tuning_refusal(skeleton)
    if why:
        return None, why
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    return method.num_virtual_tokens * layers * 2 * _token_dim(cfg) + adapter_head, None
