"""What the server and the optimiser both read from a trained run: its task kind, tokenizer, merged model and
evaluation split (adapter.py serves it, artifacts.py makes faster artifacts of it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

CLASSIFICATION, CHAT, SEQ2SEQ = "classification", "chat", "seq2seq"
MERGEABLE = ("lora", "adalora", "ia3")


def task_of(predictor: Any) -> str:
    task = getattr(predictor, "task", None)
    if task in (CHAT, SEQ2SEQ):
        return task
    return CLASSIFICATION


def tokenizer_of(predictor: Any) -> Any:
    tok = getattr(predictor, "tokenizer", None)
    if tok is None and getattr(predictor, "encoder", None) is not None:
        tok = getattr(predictor.encoder, "tokenizer", None)
    return tok


def merge_adapters(model: Any) -> Any:
    """A peft model's lora/adalora/ia3 adapters merged into its weights (same outputs, faster); else unchanged.

    The trained head copies (peft's modules_to_save) are put in place of the originals first.
    """
    try:
        from peft import PeftModel
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    kind = str(getattr(model.peft_config.get(model.active_adapter), "peft_type", "")).lower()
    if not any(m in kind for m in MERGEABLE):
        return model  # prompt tuning: the virtual tokens are an input, nothing to merge
    base = model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.modules_to_save[module.active_adapters[0]])
    return model.merge_and_unload().eval()


def eval_split(record: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    """The run's evaluation texts, true label indices and label names, split as training split them."""
    from ..config import Config
    from ..data import prepare

    config = Config.from_dict(record["config"])
    if config.task != "text-classification":
        raise WorkbenchError(f"run {record['id']} is a task: {config.task} run: only classification runs have "
                             "an evaluation split of labelled texts")
    split = prepare(config.data, config.train.seed)
    model_dir = Path(record["dir"]) / "model"
    labels = json.loads((model_dir / "labels.json").read_text()) if (model_dir / "labels.json").is_file() \
        else split.labels
    if labels != split.labels:
        raise WorkbenchError(f"run {record['id']}: its data now gives labels {split.labels[:5]}, the run was "
                             f"trained on {labels[:5]}: the data source changed since training")
    return split.eval_texts, split.eval_labels, labels
