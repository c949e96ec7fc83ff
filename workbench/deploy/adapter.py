"""A small adapter between the server and the predictors `workbench.load_predictor` returns.

The server sees one `ServedModel` whatever the task, and reads the task's row (`spec`: its route, whether it
generates) rather than its name:

- a text in, a head's output out (`Predictor`: `.model`, `.tokenizer`, `.labels`, `.predict(texts, batch_size)`):
  `predict(texts)` gives per text what the predictor gives, less the text: `{"label", "scores"}` (text
  classification), `{"value"}` (text regression), `{"entities", "tokens", "tags"}` (token classification,
  whose entity types are its `labels` here);
- chat (`ChatPredictor`: `.answer(conversation, max_new_tokens)`, `.stream(...)`): `answer`, `stream`, and
  for a predictor with a causal LM (`.model`, `.encoder.prompt_ids`) `scheduler(...)`: the continuous-batching
  generation thread (generation.py) that the chat route submits `prompt_ids(messages)` to;
- seq2seq (`Seq2SeqPredictor`: `.predict(texts, batch_size)` giving `{"translation"}`): `translate`.

`run(texts)` is what the micro-batcher calls: `translate` for a task that generates, else `predict`.

Also here: the run's evaluation split (texts and true labels, rebuilt from the run's config and seed exactly
as training split it) and the drift baseline read from the run directory.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import WorkbenchError
from ..run_paths import RunPaths
from ..store import RunStore
from ..task_table import DEFAULT_TASK, task_spec, tasks_where
from .monitor import Baseline
from .runs import eval_split, merge_adapters, task_row, tokenizer_of

if TYPE_CHECKING:  # torch is imported when a model is served, not with this module
    from .generation import GenerationScheduler

__all__ = ["ServedModel", "drift_baseline", "eval_split", "load_served_model", "merge_adapters", "predictions_file",
           "task_row", "tokenizer_of"]


class ServedModel:
    """One run's model, as the server calls it. Every model call runs on the caller's (worker) thread."""

    def __init__(self, predictor: Any, run_id: str, artifact: str = "fp32", info: dict[str, Any] | None = None,
                 task: str | None = None) -> None:
        self.predictor, self.run_id, self.artifact = predictor, run_id, artifact
        self.spec = task_spec(task) if task else task_row(predictor)  # `task`: the run's, for an artifact
        self.task, self.route = self.spec.name, self.spec.route
        self.tokenizer = tokenizer_of(predictor)
        # the names /metrics counts answers under: class labels, or entity types
        self.labels: list[str] = list(getattr(predictor, "labels", None) or getattr(predictor, "types", None) or [])
        self.max_length = getattr(predictor, "max_length", None) or getattr(
            getattr(predictor, "encoder", None), "max_length", None) or 512
        self.max_new_tokens = int(getattr(predictor, "max_new_tokens", 0) or 64)
        self.info = info or {}  # the artifact's record (marked, reasons) when one is served
        self._count_lock = threading.Lock()

    def run(self, texts: list[str]) -> list[Any]:
        """One micro-batch: translations for a task that generates, else the predictor's answers."""
        return self.translate(texts) if self.spec.generates else self.predict(texts)

    # --- a text in, a head's output out -------------------------------------------------------------------
    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text, in order, the predictor's answer without the text: label and scores, value, or entities."""
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

    def batches_generation(self) -> bool:
        """Whether chat requests can share decode steps: a chat predictor with a causal LM and its encoder."""
        return (self.route == "/v1/chat/completions" and hasattr(self.predictor, "model")
                and hasattr(getattr(self.predictor, "encoder", None), "prompt_ids") and self.tokenizer is not None)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids a conversation is answered from, as `answer` builds them (the run's system prompt
        first, the assistant's cue last); a WorkbenchError for a conversation the model cannot answer."""
        from ..tasks.chat import check_messages, with_system_prompt

        checked = check_messages(list(messages) + [{"role": "assistant", "content": "-"}], "the conversation")[:-1]
        conversation = with_system_prompt(checked, getattr(self.predictor, "system_prompt", None))
        with self._count_lock:
            return self.predictor.encoder.prompt_ids(conversation)

    def decode(self, ids: list[int]) -> str:
        """Generated token ids as text, special tokens dropped."""
        with self._count_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def scheduler(self, max_batch: int, max_queue: int, on_step: Any = None) -> GenerationScheduler:
        """A (not yet started) generation thread for this chat model: up to `max_batch` answers share each
        decode step; greedy answers equal `answer`'s."""
        if not self.batches_generation():
            raise WorkbenchError(f"run {self.run_id} ({self.task}) has no causal LM to batch: serve it with "
                                 "max_generation_batch=1")
        from .generation import GenerationScheduler

        tok = self.tokenizer
        return GenerationScheduler(self.predictor.model, tok.eos_token_id, tok.pad_token_id, self.decode,
                                   max_batch=max_batch, max_queue=max_queue, on_step=on_step)

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


def _prompt_lengths(record: dict[str, Any], home: Path) -> Baseline | None:
    """The input-length baseline of a generating run (chat, translation): the characters of each evaluation
    prompt's last user turn (chat) or source text (translation), as the server measures requests. None when
    the run's data can no longer be read."""
    from ..config import Config
    from ..tasks import task_of
    from ..tasks.generation import prompt_and_reference

    try:
        config = Config.from_dict(record["config"])
        held = task_of(config).load_data(config, home).eval
    except Exception:  # the data moved or changed since training: no drift signal, the server still runs
        return None
    lengths = [len(prompt_and_reference(conv)[0][-1]["content"]) for conv in held]
    return Baseline.from_eval([], lengths, str(config.data.source)) if lengths else None


def load_served_model(run: str = "latest", home: str | Path | None = None, artifact: str | None = None
                      ) -> ServedModel:
    """The run's model ready to serve: fp32 (adapters merged where they can be) or an optimised artifact."""
    from ..predict import load_predictor, with_calibration

    store = RunStore(home)
    record = store.get(run)
    predictor = load_predictor(record["id"], store.home, calibrated=False)
    spec = task_row(predictor)
    if not spec.generates and hasattr(predictor, "model"):
        predictor.model = merge_adapters(predictor.model)
    if not artifact or artifact == "fp32":
        return ServedModel(with_calibration(predictor, record) if spec.classes else predictor, record["id"])
    if not spec.optimizable:
        raise WorkbenchError(f"run {record['id']} is a {spec.name} run: optimised artifacts exist for "
                             f"{' and '.join(tasks_where(optimizable=True))} runs only; serve it without --artifact")
    from .artifacts import apply_artifact

    predictor, info = apply_artifact(predictor, Path(record["dir"]), artifact)
    # the run's temperature and abstain threshold apply to its artifacts' probabilities too
    return ServedModel(with_calibration(predictor, record) if spec.classes else predictor, record["id"], artifact,
                       info, task=spec.name)


# --- the run's evaluation split ---------------------------------------------------------------------------


def predictions_file(record: dict[str, Any]) -> Path | None:
    """The best evaluation's per-example predictions (<run>/eval/step-N.json), when the run wrote them."""
    named = (record.get("metrics") or {}).get("predictions_file")
    if named and Path(named).is_file():
        return Path(named)
    best = (record.get("metrics") or {}).get("best_step")
    path = RunPaths.of(record).eval_step(best) if best is not None else None
    return path if path is not None and path.is_file() else None


def drift_baseline(record: dict[str, Any], home: str | Path | None = None) -> Baseline | None:
    """What the served answers are compared with, from the run's best evaluation: predicted labels (or values,
    for text regression; entity types, for token classification) and the evaluation texts' lengths
    (characters); for a generating run (chat, translation), the lengths of the evaluation prompts."""
    spec = task_spec((record.get("config") or {}).get("task") or DEFAULT_TASK)
    if spec.generates:
        return _prompt_lengths(record, Path(home) if home else Path(record["dir"]).parents[1])
    preds = predictions_file(record)
    if preds is None:
        return None
    rows = json.loads(preds.read_text())["rows"]
    if spec.kind == "tokens":  # a tag per token: the entities' types are what the server counts
        return Baseline.from_eval([span["type"] for r in rows for span in r.get("predicted_spans", ())],
                                  [len(r["text"]) for r in rows], str(preds))
    try:  # the full texts (the predictions file keeps the first 600 characters of each)
        texts = eval_split(record)[0]
        if len(texts) != len(rows):
            raise WorkbenchError("split changed")
        lengths = [len(t) for t in texts]
    except Exception:
        lengths = [len(r["text"]) for r in rows]
    return Baseline.from_eval([r["predicted"] for r in rows], lengths, str(preds))
