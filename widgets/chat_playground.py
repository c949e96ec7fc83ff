"""Chat playground: ask a tuned chat run a question and watch its answer arrive token by token."""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ipywidgets as W
import traitlets as T

from workbench import WorkbenchError
from workbench.config import MAX_NEW_TOKENS
from workbench.run_paths import RunPaths
from workbench.store import RunStore
from workbench.task_table import tasks_where

from . import _style as S
from ._background import run_job

MAX_QUESTION_CHARS = 4_000
CACHED_MODELS = 2  # chat models kept in memory, least recently used dropped first
CONVERSATION_TASKS = tasks_where(kind="generation", system_prompt=True)  # the task rows that answer a question


class ChatPlayground(W.VBox):
    """Greedy answers of a chat run's best weights, streamed into `answer` as they are generated.

    Generation runs on a worker thread (and transformers' own generate thread behind a
    TextIteratorStreamer), so the kernel stays free; Stop ends it at the next token.
    """

    run_id = T.Unicode("", help="the chat run that answers")
    runs = T.List(T.Unicode(), help="chat runs with a trained model")
    question = T.Unicode("", help="the question to answer")
    answer = T.Unicode("", help="the answer so far; grows while tokens arrive")
    max_new_tokens = T.Int(64, help="the longest answer, in tokens")
    error = T.Unicode("")
    status = T.Unicode("", help="what the playground is doing, in words")
    busy = T.Bool(False)

    def __init__(self, home: str | Path | None = None, background: bool = True, store: RunStore | None = None,
                 **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        style = S.label_style()
        self._run = W.Dropdown(options=[], description="Chat run", style=style, layout=S.full_width(max_width="48em"))
        self._question = W.Textarea(placeholder="Ask a question", rows=2, description="Question", style=style,
                                    layout=S.full_width())
        self._tokens = W.BoundedIntText(value=self.max_new_tokens, min=1, max=MAX_NEW_TOKENS,
                                        description="Max tokens", style=style, layout=W.Layout(width="16em"))
        self._ask = W.Button(description="Ask", icon="comment", button_style="primary", layout=W.Layout(width="auto"))
        self._stop = W.Button(description="Stop", icon="stop", disabled=True, layout=W.Layout(width="auto"))
        refresh = W.Button(description="Refresh runs", icon="refresh", layout=W.Layout(width="auto"))
        self._ask.on_click(lambda _: self.ask())
        self._stop.on_click(lambda _: self.stop())
        refresh.on_click(lambda _: self.refresh_runs())
        self._status_html = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self._output = W.HTML("", layout=S.full_width())
        super().__init__(children=[self._run, self._question,
                                   W.Box([self._tokens, self._ask, self._stop, refresh], layout=S.wrap_row()),
                                   self._error_html, self._status_html, self._output],
                         **{"layout": S.full_width(), **kwargs})
        self._wire()
        self.refresh_runs()

    def _wire(self) -> None:
        """Controls -> traits, traits -> display; no observer writes the trait it observes."""
        self._run.observe(self._on_run_control, names="value")
        self._question.observe(self._on_question_control, names="value")
        self._tokens.observe(self._on_tokens_control, names="value")
        self.observe(self._show_error, names="error")
        self.observe(self._show_status, names="status")
        self.observe(self._show_answer, names=["answer", "question"])
        self.observe(self._on_run, names="run_id")
        self.observe(self._on_busy, names="busy")

    # --- validation --------------------------------------------------------------------------
    @T.validate("run_id")
    def _valid_run(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"]
        if value and value not in self.runs:
            raise T.TraitError(f"run {value!r} is not a chat run with a trained model: choose one of "
                               f"{', '.join(self.runs) or 'none'}")
        return value

    @T.validate("max_new_tokens")
    def _valid_tokens(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not 1 <= value <= MAX_NEW_TOKENS:
            raise T.TraitError(f"max_new_tokens = {value} is not allowed: 1 to {MAX_NEW_TOKENS}")
        return value

    # --- public ----------------------------------------------------------------------------------
    def refresh_runs(self) -> None:
        """Find the chat runs that have a trained model."""
        try:
            records = self.store.list()
        except Exception as exc:
            self.error = f"could not read the runs ({type(exc).__name__}: {exc})"
            return
        ready = [r for r in records if (r.get("config") or {}).get("task") in CONVERSATION_TASKS
                 and RunPaths.of(r).trainable.is_file()]
        self.runs = [r["id"] for r in ready]
        self._run.options = [(f"{r.get('name') or r['id']} ({r['id']}, held-out loss "
                              f"{(r.get('metrics') or {}).get('eval_loss', float('nan')):.3f})", r["id"])
                             for r in ready]
        if self.run_id not in self.runs:
            self.run_id = self.runs[0] if self.runs else ""
        self._run.value = self.run_id or None

    def ask(self, question: str | None = None) -> threading.Thread | None:
        """Answer `question` (default: the question box); tokens land in `answer` as they come."""
        if question is not None:
            self.question = question
        text = self.question
        if self.busy:
            self.error = "an answer is still being generated: press Stop first"
            return None
        if not self.run_id:
            self.error = "no chat run with a trained model yet: train one (task: chat), then press Refresh runs"
            return None
        if not text.strip():
            self.error = "type a question"
            return None
        if len(text) > MAX_QUESTION_CHARS:
            self.error = f"the question is {len(text):,} characters: at most {MAX_QUESTION_CHARS:,}"
            return None
        run_id, tokens = self.run_id, self.max_new_tokens
        self._stop_event = threading.Event()
        self.error, self.answer, self.busy = "", "", True
        self.status = "answering ..." if run_id in self._models else f"loading the model of run {run_id} ..."
        return run_job(lambda: self._answer_now(run_id, text, tokens, self._stop_event), sync=not self.background,
                       name="chat-playground")

    def stop(self) -> None:
        """End the answer being generated at its next token."""
        self._stop_event.set()

    def model(self, run_id: str) -> Any:
        """The cached chat predictor of a run, loaded on first use."""
        from workbench.predict import load_predictor

        with self._lock:
            if run_id in self._models:
                self._models.move_to_end(run_id)
                return self._models[run_id]
        loaded = load_predictor(run_id, self.store.home)
        if getattr(loaded, "task", "") not in CONVERSATION_TASKS:
            raise WorkbenchError(f"run {run_id} is not a chat run: use the Playground for classifiers")
        with self._lock:
            self._models[run_id] = loaded
            while len(self._models) > CACHED_MODELS:
                self._models.popitem(last=False)
        return loaded

    # --- worker ----------------------------------------------------------------------------------
    def _answer_now(self, run_id: str, question: str, max_new_tokens: int, stop: threading.Event) -> None:
        try:
            predictor = self.model(run_id)
            self.status = "answering ..."
            for piece in predictor.stream(question, max_new_tokens=max_new_tokens, stop=stop):
                self.answer += piece  # each piece reaches the page as it comes
            self.status = "stopped" if stop.is_set() else ""
        except WorkbenchError as exc:
            self.error, self.status = str(exc), ""
        except Exception as exc:
            self.error, self.status = f"generation failed ({type(exc).__name__}: {str(exc)[:300]})", ""
        finally:
            self.busy = False

    # --- control <-> traits ---------------------------------------------------------------------
    def _on_run_control(self, change: dict[str, Any]) -> None:
        if change["new"] in self.runs:
            self.run_id = change["new"]

    def _on_question_control(self, change: dict[str, Any]) -> None:
        value = change["new"]
        self.question = value[:MAX_QUESTION_CHARS + 1] if isinstance(value, str) else ""

    def _on_tokens_control(self, change: dict[str, Any]) -> None:
        value = change["new"]
        if isinstance(value, int) and 1 <= value <= MAX_NEW_TOKENS:
            self.max_new_tokens = value

    def _on_run(self, change: dict[str, Any]) -> None:
        self._run.value = change["new"] or None
        self.answer = ""

    def _on_busy(self, change: dict[str, Any]) -> None:
        self._ask.disabled = change["new"]
        self._stop.disabled = not change["new"]

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def _show_status(self, change: Any = None) -> None:
        self._status_html.value = S.message(self.status, "muted")

    def _show_answer(self, change: Any = None) -> None:
        if not self.answer and not self.busy:
            self._output.value = ""
            return
        self._output.value = (f'<div style="white-space:pre-wrap; overflow-wrap:anywhere; margin:4px 0">'
                              f'<b>Q:</b> {html.escape(self.question)}<br><b>A:</b> {html.escape(self.answer)}'
                              "</div>")
