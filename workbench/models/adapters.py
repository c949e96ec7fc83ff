"""What a tuning method does to a loaded model: which layers get adapters, which train, peft and bitsandbytes.

- full:      every parameter trains.
- head-only: the backbone is frozen; the task head trains (classifier and pooler).
- lora:      low-rank adapters on the backbone's linear layers, plus the head.
- qlora:     lora on a 4-bit (bitsandbytes nf4) base; the head stays unquantised.
             lora and qlora take two variants: rsLoRA (alpha / sqrt(r)) and DoRA.
- adalora:   SVD-shaped adapters whose ranks are pruned from init_r to an average of r while training;
             the loop calls `after_optimizer_step` after each step.
- ia3:       learned vectors that rescale keys, values and the feed-forward activations.
- prompt-tuning: trained virtual token embeddings put before every input.
- prefix-tuning: trained keys and values before every layer's attention; refused where peft cannot pass
             them to the architecture (BERT and others on transformers 5).

"The head" is the classifier plus the pooler and any layer the checkpoint did not provide, and every peft
method keeps it trainable through peft's modules_to_save. It matters: all-MiniLM-L6-v2 ships BERT's pooler
untrained (a zero bias, weights of std 0.009: sentence-transformers pools the mean of the tokens instead);
left frozen, LoRA on bbc-news reached 0.63 accuracy after one epoch where LoRA with the head trained reached
0.955.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import MethodConfig
from ..errors import WorkbenchError
from ..methods import METHODS, method_spec

HEAD_TOP_LEVEL = ("classifier", "score", "pre_classifier", "pooler")
MERGEABLE_PEFT_TYPES = {m.peft_type for m in METHODS.values() if m.merges}


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


def in_any(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_targets(model: nn.Module, method: MethodConfig, heads: list[str]) -> list[str]:
    """Full names of the layers that get adapters; 'auto' = every backbone linear layer."""
    linear = [n for n in linear_layer_names(model) if not in_any(n, heads)]
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
    linear = [n for n in linear_layer_names(model) if not in_any(n, heads)]
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


def adapter_targets(model: nn.Module, method: MethodConfig, excluded: list[str]) -> tuple[list[str], list[str]]:
    """(target layers, feed-forward layers among them) of an adapter method; ([], []) for any other method.
    IA3 rescales keys, values and feed-forward activations (`ia3_targets`); the LoRA family adapts the chosen
    linear layers (`resolve_targets`). `excluded`: the head, never adapted."""
    spec = method.spec
    if not spec.uses_adapters:
        return [], []
    if spec.peft_type == "IA3":
        return ia3_targets(model, method, excluded)
    return resolve_targets(model, method, excluded), []


def apply_method(model: nn.Module, method: MethodConfig, heads: list[str], total_steps: int | None,
                 task_type: str = "SEQ_CLS", excluded: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """The model with the tuning method applied, and the adapted layers: every weight trains (full), the
    head alone (head-only), or peft wraps it (the rest; the head in modules_to_save). A 4-bit base gets its
    bitsandbytes repack turned off first (else LoRA gradients silently become zero after an eval pass).
    `excluded`: layers never adapted (default: the head)."""
    spec = method.spec
    if spec.trains_backbone:
        model.requires_grad_(True)
        return model, []
    if spec.family == "head":
        model.requires_grad_(False)
        unfreeze(model, heads)
        return model, []
    if spec.peft_type == "PREFIX_TUNING" and (why := prefix_tuning_refusal(model)):
        raise WorkbenchError(why)
    if spec.quantized:
        disable_bnb_inference_repack(model)
    targets, feedforward = adapter_targets(model, method, heads if excluded is None else excluded)
    return apply_peft(model, method, targets, heads, feedforward, total_steps, task_type), targets


def unfreeze(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)


def peft_config(method: MethodConfig, targets: list[str], heads: list[str], feedforward: list[str] = (),
                total_steps: int | None = None, task_type: str = "SEQ_CLS") -> Any:
    """The peft config of a peft method; the head trains through modules_to_save (a frozen random pooler caps LoRA; see the module docstring).

    `task_type` "CAUSAL_LM" is for a causal-LM classifier, which has no head (`heads` is empty)."""
    from peft import TaskType

    classifier = [h for h in heads if "." not in h and h != "pooler"]
    to_save = list(heads) if method.train_head else classifier
    common: dict[str, Any] = dict(task_type=TaskType(task_type), modules_to_save=to_save or None)
    spec = method.spec
    if spec.peft_type is None:
        raise WorkbenchError(f"method {method.name!r} is not a peft method")
    return PEFT_CONFIGS[spec.peft_type](method, targets, feedforward, total_steps, common)


def _lora(method: MethodConfig, targets: list[str], feedforward: list[str], total_steps: int | None,
          common: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                      target_modules=list(targets),  # copies: peft extends these lists in place
                      use_rslora=method.use_rslora, use_dora=method.use_dora, **common)


def _adalora(method: MethodConfig, targets: list[str], feedforward: list[str], total_steps: int | None,
             common: dict[str, Any]) -> Any:
    from peft import AdaLoraConfig

    # Without a step count (prediction, export) the schedule is moot: one step, nothing pruned.
    steps = total_steps if total_steps and total_steps > 0 else 1
    tinit, tfinal = int(method.rank_warmup_ratio * steps), int(method.rank_final_ratio * steps)
    return AdaLoraConfig(init_r=method.init_r, target_r=method.r, lora_alpha=method.alpha,
                         lora_dropout=method.dropout, target_modules=list(targets), total_step=steps,
                         tinit=tinit, tfinal=tfinal, **common)


def _ia3(method: MethodConfig, targets: list[str], feedforward: list[str], total_steps: int | None,
         common: dict[str, Any]) -> Any:
    from peft import IA3Config

    return IA3Config(target_modules=list(targets), feedforward_modules=list(feedforward), **common)


def _prompt_tuning(method: MethodConfig, targets: list[str], feedforward: list[str], total_steps: int | None,
                   common: dict[str, Any]) -> Any:
    from peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=method.num_virtual_tokens, **common)


def _prefix_tuning(method: MethodConfig, targets: list[str], feedforward: list[str], total_steps: int | None,
                   common: dict[str, Any]) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=method.num_virtual_tokens, **common)


# How each peft type (a MethodSpec's `peft_type`, peft's PeftType member names) builds its config.
PEFT_CONFIGS = {"LORA": _lora, "ADALORA": _adalora, "IA3": _ia3, "PROMPT_TUNING": _prompt_tuning,
                "PREFIX_TUNING": _prefix_tuning}


def apply_peft(model: nn.Module, method: MethodConfig, targets: list[str], heads: list[str],
                feedforward: list[str], total_steps: int | None, task_type: str = "SEQ_CLS") -> nn.Module:
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(method, targets, heads, feedforward, total_steps, task_type))
    if method.spec.prunes_ranks:
        # our marker, read by after_optimizer_step: prune ranks only on a real schedule
        peft_model.workbench_rank_schedule = bool(total_steps)
    return peft_model


def after_optimizer_step(model: nn.Module, method: str, step: int) -> None:
    """Call after each optimiser step, before zero_grad (step counts from 1); adalora prunes ranks here.

    A no-op for every other method, and for adalora built without `total_steps`.
    """
    if not method_spec(method).prunes_ranks:
        return
    model = peft_model_of(model)
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
    """The model peft built: a wrapper that holds it (a causal-LM classifier) names it `workbench_peft_model`;
    otherwise the model itself."""
    return getattr(model, "workbench_peft_model", None) or model


def merge_adapters(model: Any) -> Any:
    """A peft model's lora/adalora/ia3 adapters merged into its weights (same outputs, faster); else unchanged.

    The trained head copies (peft's modules_to_save) are put in place of the originals first, by hand:
    peft 0.21's IA3 unload tries to re-attach a `.weight` to every wrapped module and fails on a pooler,
    which has none.
    """
    try:
        from peft import PeftModel
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    kind = getattr(model.peft_config.get(model.active_adapter), "peft_type", None)
    if getattr(kind, "name", kind) not in MERGEABLE_PEFT_TYPES:
        return model  # prompt tuning: the virtual tokens are an input, nothing to merge
    base = model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.modules_to_save[module.active_adapters[0]])
    return model.merge_and_unload().eval()


def check_quantization(method: MethodConfig) -> None:
    """A method that loads a 4-bit base needs bitsandbytes installed."""
    if method.spec.quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkbenchError(f"method {method.name} needs bitsandbytes: pip install bitsandbytes") from None


def bnb_config(method: MethodConfig, skip: list[str]) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, method.compute_dtype),
        llm_int8_skip_modules=skip,  # a 4-bit 2-output head fails at eval ("N must be divisible by block_n")
    )


def disable_bnb_inference_repack(model: nn.Module) -> int:
    """After one no-grad eval pass, bitsandbytes repacks 4-bit weights into an
    inference-only layout on AVX512-BF16 CPUs, and LoRA gradients silently become zero.
    Turning the repack off keeps the weights trainable. Returns how many layers it touched."""
    import bitsandbytes as bnb

    touched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched
