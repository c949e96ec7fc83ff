"""Predictions from a finished run's best weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .catalog import resolve_model
from .config import Config
from .errors import WorkbenchError
from .store import RunStore


class Predictor:
    """A trained classifier: `predict(texts)` returns label and per-label scores for each text.

    `encode` turns texts into token ids as the run's training did (BuiltModel.encode: a prompt for a
    causal-LM classifier); left out, the tokenizer reads the text cut to `max_length`.
    """

    def __init__(self, model: Any, tokenizer: Any, labels: list[str], max_length: int,
                 run_id: str = "", encode: Callable[[list[str], int], list[dict[str, list[int]]]] | None = None
                 ) -> None:
        self.model, self.tokenizer, self.labels, self.max_length = model.eval(), tokenizer, labels, max_length
        self.run_id = run_id
        self.encode = encode

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        import torch

        from .trainer import collate

        if isinstance(texts, str):
            texts = [texts]
        out: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start: start + batch_size]
            if self.encode is not None:
                encodings = self.encode(chunk, self.max_length)
                batch = collate(self.tokenizer, encodings, list(range(len(chunk))), None)
            else:
                batch = self.tokenizer(chunk, truncation=True, max_length=self.max_length, padding=True,
                                       return_tensors="pt")
            with torch.no_grad():
                probs = torch.softmax(self.model(**batch).logits.float(), dim=-1)
            for text, p in zip(chunk, probs.tolist()):
                best = max(range(len(p)), key=p.__getitem__)
                out.append({"text": text, "label": self.labels[best],
                            "scores": {name: float(s) for name, s in zip(self.labels, p)}})
        return out


def load_predictor(run_id: str = "latest", home: str | Path | None = None) -> Predictor:
    """Rebuild the run's model (base weights + the run's trained parameters)."""
    from safetensors.torch import load_file

    from .methods import build_model
    from .trainer import load_trainable_state, set_seed

    store = RunStore(home)
    record = store.get(run_id)
    model_dir = Path(record["dir"]) / "model"
    method = record["config"].get("method", {}).get("name", "")
    if method.startswith("zero-shot"):
        raise WorkbenchError(f"run {record['id']} is a {method} baseline: it trained no model to load; "
                             "pick a trained run")
    if record["config"].get("task") == "chat":  # a chat model answers: workbench.chat.ChatPredictor
        from .chat import load_chat_predictor

        return load_chat_predictor(record, store.home)
    if record["config"].get("task") == "seq2seq":  # an encoder-decoder translates: workbench.seq2seq
        from .seq2seq import load_seq2seq_predictor

        return load_seq2seq_predictor(record, store.home)
    if not (model_dir / "trainable.safetensors").is_file():
        raise WorkbenchError(f"run {record['id']} has no trained model yet (status {record['status']}): "
                             "wait until it completes an evaluation, or pick another run")
    config = Config.from_dict(record["config"])
    labels = json.loads((model_dir / "labels.json").read_text())
    set_seed(config.train.seed)
    built = build_model(config, resolve_model(config.model, store.home, config.trust_remote_code), labels)
    load_trainable_state(built.model, load_file(str(model_dir / "trainable.safetensors")))
    return Predictor(built.model, built.tokenizer, labels, config.train.max_length, record["id"], built.encode)


def predict(run_id: str, texts: str | list[str], home: str | Path | None = None) -> list[dict[str, Any]]:
    return load_predictor(run_id, home).predict(texts)
