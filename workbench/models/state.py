"""A model's reproducible state: the seeds it is built under and the parameters a run trains.

A run stores only its trainable parameters (safetensors); rebuilding it is the base weights, built under
the same seed, plus those parameters.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import WorkbenchError


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise WorkbenchError(f"checkpoint does not fit this model ({missing[0]!r} unknown): "
                             "was it made with another model or method?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
