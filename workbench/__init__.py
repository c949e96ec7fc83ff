"""LLM Workbench: a headless core for fine-tuning pretrained language models.

The core never imports UI code. Heavy libraries (torch, transformers) load on
first use, so `import workbench` stays cheap.
"""

from __future__ import annotations

import logging
from typing import Any

from .callbacks import Callback, TrainControl, TrainState
from .config import Config, DataConfig, MethodConfig, TrackConfig, TrainConfig
from .errors import WorkbenchError
from .store import RunStore

__version__ = "0.1.0"


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes (0.49+) warns on every import on an AVX-512 CPU that the optional `kernels` package is
    missing, then uses its own 4-bit CPU kernel: nothing is wrong, so that one line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())

__all__ = [
    "Callback", "Config", "DataConfig", "EvalResult", "MethodConfig", "RunStore", "TrackConfig", "TrainConfig",
    "TrainControl", "TrainState", "WorkbenchError", "train", "launch", "attach", "RunHandle", "load_predictor",
    "predict", "inspect_model",
]


# Bound here, after their submodules load, so `workbench.launch` and `workbench.predict` are the
# functions whatever else imports those modules later (both modules import torch only when used).
from .launch import RunHandle, attach, launch  # noqa: E402
from .predict import load_predictor, predict  # noqa: E402

_LAZY = {"train": "loop", "inspect_model": "models.inspect", "EvalResult": "tasks.base"}


def __getattr__(name: str) -> Any:  # lazy: keep `import workbench` light (no torch until needed)
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value

