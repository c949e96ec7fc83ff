"""What a model and method would train, without loading weights: parameter counts and a memory estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..catalog import MODELS, ModelSource, resolve_model
from ..config import VIRTUAL_TOKEN_METHODS, MethodConfig
from ..methods import DEFAULT_METHOD, method_spec
from ..store import default_home
from .adapters import head_module_names, ia3_targets, in_any, linear_layer_names, prefix_tuning_refusal, resolve_targets
from .llm_classifier import causal_skeleton, output_head_names, refusal
from .loading import context_limit, is_causal_lm, load_config


def inspect_model(name: str, home: Any = None, method: str = DEFAULT_METHOD, batch_size: int = 16,
                  max_length: int = 256, num_labels: int = 2, r: int = 8,
                  target_modules: str | list[str] = "auto", train_head: bool = True,
                  trust_remote_code: bool = False, num_virtual_tokens: int = 20, init_r: int = 12,
                  use_dora: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, adapter targets and a training-memory estimate, without loading weights.

    The trainable count is exact for every method (tests pin it against build_model); where a method
    cannot run on the architecture (prefix-tuning on BERT) it is None and `note` says why.
    """
    from transformers import AutoModelForSequenceClassification

    method_spec(method)  # an unknown name: the error names the choices
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
    causal = is_causal_lm(model_config)  # a causal LM classifies by label tokens: no head (llm_classifier.py)
    with torch.device("meta"):
        if causal:
            skeleton = causal_skeleton(model_config, trust_remote_code)
        else:
            skeleton = AutoModelForSequenceClassification.from_config(model_config)
    total = sum(p.numel() for p in skeleton.parameters())
    heads = [] if causal else head_module_names(skeleton)
    excluded = output_head_names(skeleton) if causal else heads  # never adapter targets
    linear = [n for n in linear_layer_names(skeleton) if not in_any(n, excluded)]
    head_params = sum(p.numel() for n, p in skeleton.named_parameters() if in_any(n.rsplit(".", 1)[0], heads))
    classifier = [h for h in heads if "." not in h and h != "pooler"]
    adapter_head = head_params if train_head else sum(
        p.numel() for n, p in skeleton.named_parameters() if in_any(n.rsplit(".", 1)[0], classifier))
    knobs = MethodConfig(name=method, r=max(r, 1),
                         target_modules=target_modules if method not in VIRTUAL_TOKEN_METHODS else "auto",
                         init_r=max(init_r, r, 1), num_virtual_tokens=max(num_virtual_tokens, 1),
                         use_dora=use_dora and method_spec(method).lora_variants)
    if knobs.is_zero_shot:
        train_p, note = 0, f"{method}: nothing is trained; the estimate is for inference"
    elif causal and (why := refusal(method, type(skeleton).__name__)):
        train_p, note = None, why
    else:
        train_p, note = _trainable_estimate(skeleton, knobs, excluded, head_params, adapter_head, total)
    hidden = getattr(model_config, "hidden_size", 0) or 0
    layers = getattr(model_config, "num_hidden_layers", 0) or 0
    heads_n = getattr(model_config, "num_attention_heads", 1) or 1
    weight_bytes = total * 4 if not knobs.spec.quantized else (total - head_params) * 0.5 + head_params * 4
    optimiser_bytes = (train_p or 0) * 4 * 3  # gradient + two AdamW moments, fp32
    seq = max_length + (knobs.num_virtual_tokens if method in VIRTUAL_TOKEN_METHODS else 0)
    # Korthikanti et al. (2022): ~(34 s b h + 5 a s^2 b) bytes of 16-bit activations per layer; x2 for fp32
    per_layer = (34 * seq * batch_size * hidden + 5 * heads_n * seq**2 * batch_size) * 2
    # frozen layers (and inference) keep nothing between layers
    activation_bytes = per_layer * layers if knobs.spec.family not in ("head", "zero-shot") else per_layer
    activation_bytes *= ACTIVATION_CALIBRATION.get(knobs.spec.family, ACTIVATION_CALIBRATION["adapters"])
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
ACTIVATION_CALIBRATION = {"all": 1.2, "head": 1.35, "adapters": 2.2}  # by the method's family
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
    spec = method.spec
    kind = spec.peft_type
    if spec.trains_backbone:
        return total, None
    if spec.family == "head":
        return head_params, None
    if kind == "LORA":
        targets = resolve_targets(skeleton, method, heads)
        per = sum(method.r * (modules[n].in_features + modules[n].out_features) for n in targets)
        magnitude = sum(modules[n].out_features for n in targets) if method.use_dora else 0
        return per + magnitude + adapter_head, None
    if kind == "ADALORA":  # A (r x in), B (out x r), E (r singular values) per target
        targets = resolve_targets(skeleton, method, heads)
        return sum(method.init_r * (modules[n].in_features + modules[n].out_features + 1)
                   for n in targets) + adapter_head, None
    if kind == "IA3":  # one vector per target: its output width, or its input width for feed-forward layers
        targets, ff = ia3_targets(skeleton, method, heads)
        return sum(modules[n].in_features if n in ff else modules[n].out_features
                   for n in targets) + adapter_head, None
    if kind == "PROMPT_TUNING":
        return method.num_virtual_tokens * _token_dim(cfg) + adapter_head, None
    why = prefix_tuning_refusal(skeleton)
    if why:
        return None, why
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    return method.num_virtual_tokens * layers * 2 * _token_dim(cfg) + adapter_head, None
