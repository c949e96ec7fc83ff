"""Loading pretrained models: where the weights come from, their tokenizer and config, what kind they are.

The bottom of the model layer: everything here reads a checkpoint (catalog asset, local folder or hub id)
and nothing here knows about tasks, methods or runs.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
from torch import nn

from ..catalog import ModelSource, hub_error
from ..config import VIRTUAL_TOKEN_METHODS, Config
from ..errors import WorkbenchError


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


def check_context(config: Config, model_config: Any) -> int | None:
    limit = context_limit(model_config)
    if config.train.max_length is None:  # left out: chosen within the limit when the run starts
        return limit
    if limit is not None and config.train.max_length > limit:
        raise WorkbenchError(f"train.max_length = {config.train.max_length} is beyond the model's limit of "
                             f"{limit} tokens: set train.max_length <= {limit}")
    virtual = config.method.num_virtual_tokens if config.method.name in VIRTUAL_TOKEN_METHODS else 0
    if limit is not None and virtual and config.train.max_length + virtual > limit:
        raise WorkbenchError(f"train.max_length = {config.train.max_length} plus method.num_virtual_tokens = "
                             f"{virtual} is beyond the model's limit of {limit} tokens: "
                             f"keep their sum <= {limit}")
    return limit


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a 4-bit weight stores two values per byte and counts twice its numel."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and p.__class__.__name__ == "Params4bit" else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def quiet_libraries() -> None:
    """Load reports and progress bars are noise in a run log; warnings that matter still show."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*newly initialized.*")


def architecture(model_config: Any) -> str:
    archs = getattr(model_config, "architectures", None) or []
    return archs[0] if archs else getattr(model_config, "model_type", "unknown")


def is_causal_lm(model_config: Any) -> bool:
    """A decoder that predicts the next token (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    archs = getattr(model_config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return bool(getattr(model_config, "is_decoder", False)) and not getattr(model_config, "is_encoder_decoder", False)


def output_module(model: torch.nn.Module) -> str:
    out = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is out), "lm_head")


def load_pretrained(auto_class: Any, source: ModelSource, trust_remote_code: bool, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained` with a one-line message when the weights cannot be read (offline hub ids
    name the fix)."""
    try:
        return auto_class.from_pretrained(source.path, **load_kwargs(source, trust_remote_code), **kwargs)
    except OSError as exc:
        if source.origin == "hub":
            raise hub_error(source.name, exc) from None
        raise WorkbenchError(f"model {source.name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
