"""LLM Workbench: a headless core for fine-tuning pretrained language models.

The core never imports UI code. Heavy libraries (torch, transformers) load on
first use, so `import workbench` stays cheap.
"""

from __future__ import annotations

from typing import Any

from .callbacks import Callback, EvalResult, TrainControl, TrainState
from .config import Config, DataConfig, MethodConfig, TrackConfig, TrainConfig
from .errors import WorkbenchError
from .store import RunStore

__version__ = "0.1.0"

__all__ = [
    "Callback", "Config", "DataConfig", "EvalResult", "MethodConfig", "RunStore", "TrackConfig", "TrainConfig",
    "TrainControl", "TrainState", "WorkbenchError", "train", "launch", "RunHandle", "load_predictor", "predict",
    "inspect_model",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import workbench` light
    if name == "train":
        from .trainer import train
        return train
    if name in ("launch", "RunHandle"):
        from . import launch as _launch
        return getattr(_launch, name)
    if name in ("load_predictor", "predict"):
        from . import predict as _predict
        return getattr(_predict, name)
    if name == "inspect_model":
        from .methods import inspect_model
        return inspect_model
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
