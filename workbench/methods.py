"""Tuning methods: build a model whose trainable parameters match the chosen method.

- full:      every parameter trains.
- head-only: the encoder is frozen; the task head trains (classifier and pooler).
- lora:      low-rank adapters on the backbone's linear layers, plus the head.
- qlora:     lora on a 4-bit (bitsandbytes) base; the head stays unquantised.

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
from .config import Config, MethodConfig
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


def build_model(config: Config, source: ModelSource, labels: list[str]) -> BuiltModel:
    """Load the pretrained model for `config.task` and apply the tuning method."""
    from transformers import AutoModelForSequenceClassification

    quiet_libraries()
    method = config.method
    model_config = load_config(source, config.trust_remote_code)
    limit = _check_context(config, model_config)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
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
    built = BuiltModel(model=model, tokenizer=tokenizer, head_modules=heads, max_length_limit=limit)
    if method.name == "full":
        model.requires_grad_(True)
    elif method.name == "head-only":
        model.requires_grad_(False)
        _unfreeze(model, heads)
    else:
        if method.name == "qlora":
            disable_bnb_inference_repack(model)
        built.target_modules = resolve_targets(model, method, heads)
        built.model = _apply_lora(model, method, built.target_modules, heads)
    built.trainable_params, built.total_params = count_parameters(built.model)
    return built


def _unfreeze(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)


def _apply_lora(model: nn.Module, method: MethodConfig, targets: list[str], heads: list[str]) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    classifier = [h for h in heads if "." not in h and h != "pooler"]
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=list(targets),  # copies: peft extends these lists in place
        modules_to_save=list(heads) if method.train_head else classifier,
    )
    return get_peft_model(model, lora)


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
    """The model-dependent checks, on an empty (meta) model: context length and LoRA targets."""
    from transformers import AutoModelForSequenceClassification

    model_config = load_config(source, config.trust_remote_code)
    limit = _check_context(config, model_config)
    if config.method.uses_adapters:
        model_config.num_labels = num_labels
        try:
            with torch.device("meta"):
                skeleton = AutoModelForSequenceClassification.from_config(
                    model_config, trust_remote_code=config.trust_remote_code)
        except ValueError as exc:
            raise WorkbenchError(f"model {source.name!r} cannot classify text ({str(exc).splitlines()[0]})") from None
        resolve_targets(skeleton, config.method, head_module_names(skeleton))
    if config.method.name == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkbenchError("method qlora needs bitsandbytes: pip install bitsandbytes") from None


# --- inspection -------------------------------------------------------------------

def inspect_model(name: str, home: Any = None, method: str = "lora", batch_size: int = 16,
                  max_length: int = 256, num_labels: int = 2, r: int = 8,
                  target_modules: str | list[str] = "auto", train_head: bool = True,
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, LoRA targets and a training-memory estimate, without loading weights."""
    from transformers import AutoModelForSequenceClassification

    from .catalog import resolve_model
    from .store import default_home

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
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(model_config)
    total = sum(p.numel() for p in skeleton.parameters())
    heads = head_module_names(skeleton)
    linear = [n for n in linear_layer_names(skeleton) if not _in_any(n, heads)]
    head_params = sum(p.numel() for n, p in skeleton.named_parameters() if _in_any(n.rsplit(".", 1)[0], heads))
    classifier = [h for h in heads if "." not in h and h != "pooler"]
    adapter_head = head_params if train_head else sum(
        p.numel() for n, p in skeleton.named_parameters() if _in_any(n.rsplit(".", 1)[0], classifier))
    modules = dict(skeleton.named_modules())
    targets = resolve_targets(skeleton, MethodConfig(r=max(r, 1), target_modules=target_modules), heads)
    lora_params = sum(r * (modules[n].in_features + modules[n].out_features) for n in targets)
    trainable = {"full": total, "head-only": head_params, "lora": lora_params + adapter_head,
                 "qlora": lora_params + adapter_head}
    if method not in trainable:
        raise WorkbenchError(f"method {method!r} is unknown: choose from {', '.join(trainable)}")
    hidden = getattr(model_config, "hidden_size", 0) or 0
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    heads_n = getattr(model_config, "num_attention_heads", 1) or 1
    weight_bytes = total * 4 if method != "qlora" else (total - head_params) * 0.5 + head_params * 4
    train_p = trainable[method]
    optimiser_bytes = train_p * 4 * 3  # gradient + two AdamW moments, fp32
    # Korthikanti et al. (2022): ~(34 s b h + 5 a s^2 b) bytes of 16-bit activations per layer; x2 for fp32
    per_layer = (34 * max_length * batch_size * hidden + 5 * heads_n * max_length**2 * batch_size) * 2
    activation_bytes = per_layer * layers if method != "head-only" else per_layer  # frozen layers keep nothing
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
        "memory_estimate_mb": round((weight_bytes + optimiser_bytes + activation_bytes) / 2**20),
        "memory_breakdown_mb": {
            "weights": round(weight_bytes / 2**20),
            "gradients_and_optimiser": round(optimiser_bytes / 2**20),
            "activations": round(activation_bytes / 2**20),
        },
    }
