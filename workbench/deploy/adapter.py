"""A small adapter between the server and the predictors `workbench.load_predictor` returns.

The server sees one `ServedModel` whatever the task:

- classification (`Predictor`: `.model`, `.tokenizer`, `.labels`, `.predict(texts, batch_size)`):
  `predict(texts)` gives per text `{"label", "scores"}`. A task whose predictor returns `{"text", "value"}`
  (text regression) passes through unchanged as `{"value"}`: /v1/classify serves it with no change here;
- chat (`ChatPredictor`: `.answer(conversation, max_new_tokens)`, `.stream(...)`): `answer`, `stream`;
- seq2seq (`Seq2SeqPredictor`: `.predict(texts, batch_size)` giving `{"translation"}`): `translate`.

Also here: the run's evaluation split (texts and true labels, rebuilt from the run's config and seed exactly
as training split it) and the drift baseline read from the run directory.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

from ..errors import WorkbenchError
from ..store import RunStore
from .monitor import Baseline

from .runs import CHAT, CLASSIFICATION, SEQ2SEQ, eval_split, merge_adapters, task_of, tokenizer_of

__all__ = ["CHAT", "CLASSIFICATION", "SEQ2SEQ", "ServedModel", "drift_baseline", "eval_split", "load_served_model",
           "merge_adapters", "predictions_file", "task_of", "tokenizer_of"]


class ServedModel:
    """One run's model, as the server calls it. Every model call runs on the caller's (worker) thread."""

    def __init__(self, predictor: Any, run_id: str, artifact: str = "fp32", info: dict[str, Any] | None = None
                 ) -> None:
        self.predictor, self.run_id, self.artifact = predictor, run_id, artifact
        self.task = task_of(predictor)
        self.tokenizer = tokenizer_of(predictor)
        self.labels: list[str] = list(getattr(predictor, "labels", []) or [])
        self.max_length = getattr(predictor, "max_length", None) or getattr(
            getattr(predictor, "encoder", None), "max_length", None) or 512
        self.max_new_tokens = int(getattr(predictor, "max_new_tokens", 0) or 64)
        self.info = info or {}  # the artifact's record (marked, reasons) when one is served
        self._count_lock = threading.Lock()

    # --- classification --------------------------------------------------------------------------------
    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text, in order, its label and each label's score (or its value, for a regression task)."""
        results = self.predictor.predict(list(texts), batch_size=max(1, len(texts)))
        return [{k: v for k, v in r.items() if k != "text"} for r in results]

    # --- seq2seq -----------------------------------------------------------------------------------------
    def translate(self, texts: list[str]) -> list[str]:
        results = self.predictor.predict(list(texts), batch_size=max(1, len(texts)))
        return [r["translation"] for r in results]

    # --- chat --------------------------------------------------------------------------------------------
    def answer(self, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0) -> str:
        return self.predictor.answer(messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)

    def stream(self, messages: list[dict[str, str]], max_tokens: int, stop: threading.Event,
               temperature: float = 0.0, top_p: float = 1.0) -> Iterator[str]:
        return self.predictor.stream(messages, max_new_tokens=max_tokens, stop=stop, temperature=temperature,
                                     top_p=top_p)

    # --- token counts (metrics, usage) -------------------------------------------------------------------
    def count_tokens(self, texts: list[str], truncate: bool = True) -> list[int]:
        if self.tokenizer is None or not texts:
            return [0] * len(texts)
        with self._count_lock:  # a fast tokenizer is not safe to call from two threads at once
            enc = self.tokenizer(list(texts), truncation=truncate, max_length=self.max_length if truncate else None,
                                 add_special_tokens=truncate)
        return [len(ids) for ids in enc["input_ids"]]

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        tok = self.tokenizer
        if tok is None:
            return 0
        try:
            if getattr(tok, "chat_template", None):
                with self._count_lock:
                    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                return len(ids)
        except Exception:  # a template that needs more than the messages: count the contents instead
            pass
        return sum(self.count_tokens([m["content"] for m in messages], truncate=False))


def _prompt_lengths(record: dict[str, Any]) -> Baseline | None:
    """The input-length baseline of a chat or translation run: the characters of each evaluation prompt's last
    user turn (chat) or source text (translation), as the server measures requests. None when the run's data
    can no longer be read."""
    from ..config import Config
    from ..tasks.generation import prompt_and_reference

    try:
        config = Config.from_dict(record["config"])
        if config.task == CHAT:
            from ..tasks.chat import load_chat_data as load
        else:
            from ..tasks.seq2seq import load_seq2seq_data as load
        held = load(config.data, config.train.seed).eval
    except Exception:  # the data moved or changed since training: no drift signal, the server still runs
        return None
    lengths = [len(prompt_and_reference(conv)[0][-1]["content"]) for conv in held]
    return Baseline.from_eval([], lengths, str(config.data.source)) if lengths else None


def load_served_model(run: str = "latest", home: str | Path | None = None, artifact: str | None = None
                      ) -> ServedModel:
    """The run's model ready to serve: fp32 (adapters merged where they can be) or an optimised artifact."""
    from ..predict import load_predictor

    store = RunStore(home)
    record = store.get(run)
    predictor = load_predictor(record["id"], store.home)
    if task_of(predictor) == CLASSIFICATION and hasattr(predictor, "model"):
        predictor.model = merge_adapters(predictor.model)
    if not artifact or artifact == "fp32":
        return ServedModel(predictor, record["id"])
    if task_of(predictor) != CLASSIFICATION:
        raise WorkbenchError(f"run {record['id']} is a {task_of(predictor)} run: optimised artifacts exist for "
                             "classification runs only; serve it without --artifact")
    from .artifacts import apply_artifact

    predictor, info = apply_artifact(predictor, Path(record["dir"]), artifact)
    return ServedModel(predictor, record["id"], artifact, info)


# --- the run's evaluation split ---------------------------------------------------------------------------


def predictions_file(record: dict[str, Any]) -> Path | None:
    """The best evaluation's per-example predictions (<run>/eval/step-N.json), when the run wrote them."""
    named = (record.get("metrics") or {}).get("predictions_file")
    if named and Path(named).is_file():
        return Path(named)
    best = (record.get("metrics") or {}).get("best_step")
    path = Path(record["dir"]) / "eval" / f"step-{best}.json"
    return path if best is not None and path.is_file() else None


def drift_baseline(record: dict[str, Any]) -> Baseline | None:
    """Predicted labels (or values, for text regression) from the run's best evaluation and the evaluation
    texts' lengths (characters); for chat and translation runs, the lengths of the evaluation prompts."""
    if (record.get("config") or {}).get("task") in (CHAT, SEQ2SEQ):
        return _prompt_lengths(record)
    preds = predictions_file(record)
    if preds is None:
        return None
    rows = json.loads(preds.read_text())["rows"]
    try:  # the full texts (the predictions file keeps the first 600 characters of each)
        texts = eval_split(record)[0]
        if len(texts) != len(rows):
            raise WorkbenchError("split changed")
        lengths = [len(t) for t in texts]
    except Exception:
        lengths = [len(r["text"]) for r in rows]
    return Baseline.from_eval([r["predicted"] for r in rows], lengths, str(preds))
