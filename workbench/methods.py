"""The method registry: one spec per tuning method, and the only place a method's name is spelled.

Config validation, the loop, the model builders, the method panel, the ladder, inspect, export and deploy
read a method's spec (`method_spec(name)`) and switch on its properties (does it quantise the base, which
peft tuner builds it, does it merge), never on its name: adding a method is one entry here, its tuner in
`models/adapters.py` when it is a new peft type, and its sub-panel in `widgets/method_panel.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import WorkbenchError

Family = Literal["all", "head", "adapter", "virtual-tokens", "zero-shot"]
ModelKind = Literal["encoder", "causal-lm", "seq2seq-lm"]


@dataclass(frozen=True)
class MethodSpec:
    """What one tuning method is, in plain values."""

    name: str
    title: str  # the method panel's and the ladder's label
    summary: str  # one line: what trains
    family: Family  # all: every weight trains; head: the task head; adapter: layers get adapters; ...
    fields: tuple[str, ...]  # the method.* config fields it reads (its panel's knobs)
    learning_rate: float | None  # the peak AdamW rate when train.learning_rate is left out (None: trains nothing)
    peft_type: str | None = None  # peft's PeftType member that builds it (None: not a peft method)
    quantized: bool = False  # the frozen base is loaded in 4 bits (bitsandbytes)
    lora_variants: bool = False  # takes use_rslora / use_dora
    auto_is_all_linear: bool = False  # target_modules 'auto' = every backbone linear layer
    prunes_ranks: bool = False  # the loop calls models.adapters.after_optimizer_step after each step
    merges: bool = False  # export can fold the adapters into the weights (same outputs, a plain model)
    model_kinds: tuple[ModelKind, ...] = ("encoder", "causal-lm")  # pretrained models it applies to
    relative_rate: bool = False  # a larger rate than full fine-tuning's (frozen base: nothing to drift from)
    saves: str = "the trained parameters"  # what `<run>/model/trainable.safetensors` holds
    rank: int = 0  # its place on the ladder: zero-shot first, then more and more trained
    in_default_ladder: bool = True  # a rung of `workbench ladder` when no methods are named
    zero_shot_model: str | None = None  # a zero-shot rung's catalog model when the ladder's model is of the other kind

    @property
    def is_zero_shot(self) -> bool:
        """Trains nothing: the pretrained model is evaluated as it is."""
        return self.family == "zero-shot"

    @property
    def trains(self) -> bool:
        return not self.is_zero_shot

    @property
    def uses_peft(self) -> bool:
        """Built with peft: a PeftModel with the head in modules_to_save."""
        return self.peft_type is not None

    @property
    def uses_adapters(self) -> bool:
        """Adapters on chosen linear layers (the target_modules apply)."""
        return self.family == "adapter"

    @property
    def virtual_tokens(self) -> bool:
        return self.family == "virtual-tokens"

    @property
    def trains_backbone(self) -> bool:
        """Every weight trains (full fine-tuning): the optimiser holds the backbone too."""
        return self.family == "all"


_LORA_FIELDS = ("r", "alpha", "dropout", "target_modules", "train_head", "use_rslora", "use_dora")

METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("full", "Full fine-tuning", "every parameter trains", "all", (), 5e-5,
               saves="every weight (a standalone model)", rank=9),
    MethodSpec("head-only", "Head only", "the backbone is frozen; the task head (classifier, pooler) trains",
               "head", (), 2e-3, model_kinds=("encoder",), saves="the task head", rank=2),
    MethodSpec("lora", "LoRA", "low-rank adapters on the backbone's linear layers, plus the head", "adapter",
               _LORA_FIELDS, 1e-3, peft_type="LORA", lora_variants=True, auto_is_all_linear=True, merges=True,
               saves="the adapters and the head", rank=6),
    MethodSpec("qlora", "QLoRA", "LoRA on a 4-bit (nf4) frozen base; the head stays unquantised", "adapter",
               (*_LORA_FIELDS, "quant_type", "double_quant", "compute_dtype"), 1e-3, peft_type="LORA",
               quantized=True, lora_variants=True, auto_is_all_linear=True, merges=True,
               saves="the adapters and the head (the base is re-quantised on load)", rank=8),
    MethodSpec("adalora", "AdaLoRA", "SVD-shaped adapters whose ranks are pruned from init_r to an average of r",
               "adapter", ("r", "alpha", "dropout", "target_modules", "train_head", "init_r",
                           "rank_warmup_ratio", "rank_final_ratio"), 1e-3, peft_type="ADALORA",
               auto_is_all_linear=True, prunes_ranks=True, merges=True, saves="the adapters and the head", rank=7),
    MethodSpec("ia3", "IA3", "learned vectors that rescale keys, values and the feed-forward activations",
               "adapter", ("target_modules", "train_head"), 3e-3, peft_type="IA3", merges=True,
               saves="the scaling vectors and the head", rank=5),
    MethodSpec("prompt-tuning", "Prompt tuning", "trained virtual token embeddings put before every input",
               "virtual-tokens", ("num_virtual_tokens", "train_head"), 3e-2, peft_type="PROMPT_TUNING",
               saves="the virtual token embeddings and the head", rank=3),
    MethodSpec("prefix-tuning", "Prefix tuning", "trained keys and values before every layer's attention",
               "virtual-tokens", ("num_virtual_tokens", "train_head"), 1e-2, peft_type="PREFIX_TUNING",
               model_kinds=("encoder",), saves="the prefixes and the head", rank=4,
               in_default_ladder=False),
    MethodSpec("zero-shot-embedding", "Zero-shot (embeddings)",
               "no training: each text goes to the label whose description it is closest to", "zero-shot",
               ("label_template",), None, model_kinds=("encoder",), saves="nothing", rank=0,
               zero_shot_model="minilm-l6"),
    MethodSpec("zero-shot-prompt", "Zero-shot (prompt)",
               "no training: a causal LM scores each label's tokens after a prompt", "zero-shot",
               ("prompt_scoring", "few_shot_k", "prompt_calibration"), None, model_kinds=("causal-lm",),
               saves="nothing", rank=1, zero_shot_model="smollm2-135m-instruct"),
]}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
DEFAULT_METHOD = "lora"
ZERO_SHOT_METHODS = tuple(m.name for m in METHODS.values() if m.is_zero_shot)
TRAINING_METHODS = tuple(m.name for m in METHODS.values() if m.trains)
LADDER_ORDER = tuple(sorted(METHODS, key=lambda n: METHODS[n].rank))  # zero-shot first, then more and more trained


def default_ladder(model_kind: ModelKind) -> tuple[str, ...]:
    """The rungs of a ladder on a model of this kind when none are named, in ladder order."""
    return tuple(n for n in LADDER_ORDER if METHODS[n].in_default_ladder and model_kind in METHODS[n].model_kinds)


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name (a WorkbenchError naming the choices when there is none)."""
    if name not in METHODS:
        raise WorkbenchError(f"method {name!r} is unknown: choose from {', '.join(METHODS)}")
    return METHODS[name]


def float_twin(name: str) -> str:
    """The method that trains the same adapters on a floating-point base (qlora -> lora): what a merged export
    builds, since a 4-bit base cannot hold merged weights. A method without a 4-bit base is its own twin."""
    spec = method_spec(name)
    if not spec.quantized:
        return name
    return next(m.name for m in METHODS.values() if m.peft_type == spec.peft_type and not m.quantized)


def methods_where(**wanted: object) -> tuple[str, ...]:
    """The names of the methods whose spec has every given attribute value, in registry order
    (`methods_where(merges=True)`, `methods_where(family="adapter")`)."""
    return tuple(m.name for m in METHODS.values() if all(getattr(m, k) == v for k, v in wanted.items()))
