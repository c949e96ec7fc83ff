"""Playground: type text, see the label and scores a trained run predicts."""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ipywidgets as W
import traitlets as T

from workbench import WorkbenchError
from workbench.store import RunStore

from . import _style as S
from ._background import run_job

MAX_TEXT_CHARS = 10_000
CACHED_PREDICTORS = 3  # models kept in memory, least recently used dropped first


class Playground(W.VBox):
    """Predict with a run's best weights; the predictor of each run is loaded once and cached."""

    run_id = T.Unicode("", help="the run whose model predicts")
    runs = T.List(T.Unicode(), help="runs with a trained model")
    text = T.Unicode("", help="the text to classify")
    result = T.Dict(allow_none=True, default_value=None, help="{'label': ..., 'scores': {label: p}}")
    error = T.Unicode("")
    busy = T.Bool(False)

    def __init__(self, home: str | Path | None = None, background: bool = True, store: RunStore | None = None,
                 **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._predictors: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        style = S.label_style()
        self._run = W.Dropdown(options=[], description="Run", style=style, layout=S.full_width(max_width="48em"))
        self._text = W.Textarea(placeholder="Type or paste a text to classify", rows=4, description="Text",
                                style=style, layout=S.full_width())
        self._predict = W.Button(description="Predict", icon="magic", button_style="primary",
                                 layout=W.Layout(width="auto"))
        refresh = W.Button(description="Refresh runs", icon="refresh", layout=W.Layout(width="auto"))
        self._predict.on_click(lambda _: self.predict())
        refresh.on_click(lambda _: self.refresh_runs())
        self._output = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        super().__init__(children=[self._run, self._text, W.Box([self._predict, refresh], layout=S.wrap_row()),
                                   self._error_html, self._output], **{"layout": S.full_width(), **kwargs})
        self._run.observe(self._on_run_control, names="value")
        self._text.observe(self._on_text_control, names="value")
        self.observe(self._show_error, names="error")
        self.observe(self._show_result, names="result")
        self.observe(self._on_run, names="run_id")
        self.refresh_runs()

    # --- validation --------------------------------------------------------------------------
    @T.validate("run_id")
    def _valid_run(self, proposal: dict[str, Any]) -> str:
        """Cross-field: a run must be one with a trained model (or empty)."""
        value = proposal["value"]
        if value and value not in self.runs:
            raise T.TraitError(f"run {value!r} has no trained model: choose one of {', '.join(self.runs) or 'none'}")
        return value

    # --- public ----------------------------------------------------------------------------------
    def refresh_runs(self) -> None:
        """Find the classification runs that have a trained model (chat and seq2seq runs have their own)."""
        try:
            records = self.store.list()
        except Exception as exc:
            self.error = f"could not read the runs ({type(exc).__name__}: {exc})"
            return
        ready = [r for r in records
                 if (r.get("config") or {}).get("task", "text-classification") == "text-classification"
                 and (Path(r["dir"]) / "model" / "trainable.safetensors").is_file()]
        self.runs = [r["id"] for r in ready]
        self._run.options = [(f"{r.get('name') or r['id']} ({r['id']}, accuracy "
                              f"{(r.get('metrics') or {}).get('accuracy', float('nan')):.3f})", r["id"]) for r in ready]
        if self.run_id not in self.runs:
            self.run_id = self.runs[0] if self.runs else ""
        self._run.value = self.run_id or None

    def predict(self, text: str | None = None) -> None:
        """Classify `text` (default: the text box); the result lands in `result` (on a worker thread)."""
        if text is not None:
            self.text = text
        content = self.text
        if not self.run_id:
            self.error = "no run with a trained model yet: train one, then press Refresh runs"
            return
        if not content.strip():
            self.error = "type a text to classify"
            return
        if len(content) > MAX_TEXT_CHARS:
            self.error = f"the text is {len(content):,} characters: at most {MAX_TEXT_CHARS:,}"
            return
        run_id = self.run_id
        self.error, self.busy = "", True
        self._predict.disabled = True
        self._output.value = S.message("predicting ..." if run_id in self._predictors else
                                       f"loading the model of run {run_id} ...", "muted")
        run_job(lambda: self._predict_now(run_id, content), sync=not self.background, name="playground-predict")

    def predictor(self, run_id: str) -> Any:
        """The cached predictor of a run, loaded on first use."""
        from workbench.predict import load_predictor

        with self._lock:
            if run_id in self._predictors:
                self._predictors.move_to_end(run_id)
                return self._predictors[run_id]
        loaded = load_predictor(run_id, self.store.home)
        with self._lock:
            self._predictors[run_id] = loaded
            while len(self._predictors) > CACHED_PREDICTORS:
                self._predictors.popitem(last=False)
        return loaded

    # --- worker ----------------------------------------------------------------------------------
    def _predict_now(self, run_id: str, text: str) -> None:
        try:
            out = self.predictor(run_id).predict(text)[0]
            self.result = {"label": out["label"], "scores": dict(out["scores"]), "run_id": run_id}
        except WorkbenchError as exc:
            self.error, self.result = str(exc), None
        except Exception as exc:
            self.error, self.result = f"prediction failed ({type(exc).__name__}: {str(exc)[:300]})", None
        finally:
            self.busy = False
            self._predict.disabled = False

    # --- control <-> traits ---------------------------------------------------------------------
    def _on_run_control(self, change: dict[str, Any]) -> None:
        if change["new"] in self.runs:
            self.run_id = change["new"]

    def _on_text_control(self, change: dict[str, Any]) -> None:
        value = change["new"]
        self.text = value[:MAX_TEXT_CHARS + 1] if isinstance(value, str) else ""

    def _on_run(self, change: dict[str, Any]) -> None:
        self._run.value = change["new"] or None
        self.result = None

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def _show_result(self, change: Any = None) -> None:
        res = self.result
        if not res:
            self._output.value = ""
            return
        scores = dict(sorted(res["scores"].items(), key=lambda kv: -kv[1]))
        self._output.value = (f'<div style="font-size:1.2em; margin:4px 0">Predicted: '
                              f'<b>{html.escape(str(res["label"]))}</b></div>'
                              + S.bars_html(scores, fmt="{:.3f}"))
