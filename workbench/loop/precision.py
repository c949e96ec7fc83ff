"""Precision: which one a run uses, and a frozen base kept in bf16 while training stays fp32.

`resolve_precision` turns `train.precision` ("auto", "fp32", "bf16") into "fp32" or
"bf16" for a device. `freeze_base_in_bf16` is what "bf16" means for an adapter method:
the frozen weights of Linear and Embedding layers are stored in bf16, so their matmuls
run in bf16 (no per-step weight cast, unlike autocast, and half the memory traffic),
while everything that trains (adapters, the head, their gradients and the optimiser
state) stays fp32, as do LayerNorm and the attention softmax.

Where the dtypes meet: a bf16 layer gets an fp32 activation and hands on an fp32 one.
A forward pre-hook casts the layer's input to bf16 and a forward hook casts its output
back to fp32; autograd records both casts, so the gradient flows back through the
bf16 matmul into fp32 activations. A peft LoRA layer computes `base_layer(x)` (bf16
inside, fp32 out) and adds `lora_B(lora_A(x))` in fp32, so the sum is fp32, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of CPUs with native bf16 arithmetic (Intel Cooper Lake / Sapphire Rapids and later,
# AMD Zen 4 and later): without them torch converts bf16 to fp32 and back around every matmul.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports in /proc/cpuinfo (empty when none, or not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags = set(re.findall(r"\b(?:avx512_bf16|amx_bf16|amx_tile)\b", cpuinfo))
    return sorted(f for f in flags if f in BF16_CPU_FLAGS)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes in bf16 natively (avx512_bf16 or AMX), from /proc/cpuinfo or torch."""
    if cpu_bf16_flags(cpuinfo):
        return True
    if cpuinfo is not None:  # an explicit cpuinfo text decides alone (tests, another machine's file)
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch's own CPUID probe
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def resolve_precision(requested: Literal["auto", "fp32", "bf16"], device: torch.device | str) -> str:
    """"fp32" or "bf16" for `device`: "auto" picks bf16 where the hardware computes in bf16 natively.

    CPU: bf16 when `cpu_has_bf16()`; elsewhere bf16 would be emulated and slower than fp32.
    CUDA: bf16 when the GPU supports it natively (compute capability 8.0 and later: A100, H100, ...).
    An explicit "fp32" or "bf16" is kept as asked.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision = {requested!r} is not allowed: choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "bf16" if torch.cuda.get_device_capability(index) >= (8, 0) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"  # mps, xpu, ...: not measured here


@dataclass
class BF16Base:
    """What `freeze_base_in_bf16` changed; `remove()` takes the hooks off and casts back to fp32."""

    modules: list[str] = field(default_factory=list)  # names of the layers now stored in bf16
    params: int = 0  # parameters cast
    handles: list[Any] = field(default_factory=list, repr=False)

    def remove(self, model: nn.Module) -> None:
        """Undo: hooks off, the layers back to fp32 (their values keep the bf16 rounding)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        layers = dict(model.named_modules())
        for name in self.modules:
            layers[name].to(torch.float32)
        self.modules, self.params = [], 0


def freeze_base_in_bf16(model: nn.Module, skip: tuple[str, ...] = (), embeddings: bool = True) -> BF16Base:
    """Store the frozen floating weights of Linear (and Embedding) layers in bf16; see the module docstring.

    Left in fp32: every layer with a trainable parameter (adapters, a trained head), LayerNorm and
    every other layer type, the model's output embeddings (a causal LM's head, often tied to its input
    embeddings), peft's frozen copies of the head (`original_module`), the base layer of a DoRA adapter
    (DoRA reads the base weight in its own fp32 arithmetic), bitsandbytes layers (already quantised),
    and every module whose name starts with one of `skip`.
    """
    kept_out = _output_weights(model)
    dora_bases = {f"{name}.base_layer" for name, m in model.named_modules() if _uses_dora(m)}
    done = BF16Base()
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear)
        if not (is_linear or (embeddings and isinstance(module, nn.Embedding))):
            continue
        params = list(module.parameters(recurse=False))
        if (not params or any(p.requires_grad for p in params) or _is_quantised(module)
                or any(p.dtype != torch.float32 for p in params) or id(module.weight) in kept_out
                or name in dora_bases or ".original_module" in f".{name}" or "modules_to_save" in name
                or any(name == s or name.startswith(s + ".") for s in skip)):
            continue
        module.to(torch.bfloat16)
        if is_linear:
            done.handles.append(module.register_forward_pre_hook(_input_to_weight_dtype))
        done.handles.append(module.register_forward_hook(_output_to_fp32))
        done.modules.append(name)
        done.params += sum(p.numel() for p in params)
    return done


def dtype_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts by (trainable or frozen, dtype), e.g. {"frozen bfloat16": 21_000_000, ...}."""
    out: dict[str, int] = {}
    for p in model.parameters():
        key = f"{'trainable' if p.requires_grad else 'frozen'} {str(p.dtype).removeprefix('torch.')}"
        out[key] = out.get(key, 0) + p.numel()
    return out


# --- pieces ---------------------------------------------------------------------------

def _input_to_weight_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype),) + tuple(args[1:])
    return None


def _output_to_fp32(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16:
        return output.to(torch.float32)
    return None


def _output_weights(model: nn.Module) -> set[int]:
    """ids of the output-embedding weights (a causal LM's head), wherever peft or a wrapper put the model."""
    get: Callable[[], Any] | None = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if get is not None else None
    except (AttributeError, NotImplementedError):
        head = None
    weight = getattr(head, "weight", None)
    return {id(weight)} if weight is not None else set()


def _uses_dora(module: nn.Module) -> bool:
    flags = getattr(module, "use_dora", None)  # peft LoRA layers: {adapter name: bool}
    return isinstance(flags, dict) and any(flags.values())


def _is_quantised(module: nn.Module) -> bool:
    """bitsandbytes Linear4bit / Linear8bitLt (subclasses of nn.Linear) and their packed weights."""
    return type(module).__module__.startswith("bitsandbytes") or \
        type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params")
