"""RegressionView: a text-regression run's predicted-vs-true scatter, its figures and its worst errors.

What ConfusionMatrix is to a classifier: each evaluation writes <run dir>/eval/step-<N>.json with every
held-out text's true and predicted value; the scatter puts them against the diagonal (a perfect model), the
title gives RMSE against the mean-prediction baseline and the rank correlation, and the table lists the
largest errors, worst first; the first few have an explain button (`explain_error(i)`: each word coloured by
how much it pushed the predicted value up or down). It follows a live run.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T

from workbench.run_paths import RunPaths
from workbench.store import FINAL_STATUSES, RunStore

from . import _style as S
from ._background import Poller
from ._figure import LiveFigure
from .explain_view import ExampleExplainer

POLL_S = 1.0
WORST_SHOWN = 20
TEXT_CHARS_SHOWN = 200


class RegressionView(W.VBox):
    """Predicted against true values of `run_id` at `step` (None = the latest evaluation)."""

    run_id = T.Unicode("", help="the run shown")
    step = T.Int(None, allow_none=True, help="evaluation step shown; None = the latest")
    steps = T.List(T.Int(), help="steps with an evaluation")
    figures = T.Dict(help="rmse, baseline_rmse, mae, pearson, spearman of the shown evaluation")
    points = T.Int(0, help="held-out predictions drawn")
    worst = T.List(T.Dict(), help="the largest errors of the shown evaluation, worst first")
    error = T.Unicode("")

    def __init__(self, home: Any = None, run_id: str = "", background: bool = True, store: RunStore | None = None,
                 height: int = 380, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._evals: dict[int, dict[str, Any]] = {}
        self._seq, self._status = 0, ""
        self._lock = threading.RLock()
        self._poller = Poller(self._tick, POLL_S, name="regression-poll")
        self.fig = LiveFigure(data=[
            go.Scattergl(x=[], y=[], mode="markers", name="held-out text", marker={"size": 5, "opacity": 0.6},
                         text=[], hovertemplate="true %{x:.2f}<br>predicted %{y:.2f}<br>%{text}<extra></extra>"),
            go.Scatter(x=[], y=[], mode="lines", name="perfect", line={"dash": "dot", "color": "gray"}),
        ], layout=S.figure_layout(height=height, margin={"l": 60, "r": 10, "t": 30, "b": 50},
                                  xaxis={"title": {"text": "true value"}}, yaxis={"title": {"text": "predicted"}}))
        self._title, self._table, self._error_html = W.HTML(""), W.HTML("", layout=S.full_width()), S.inline_error()
        self.explainer = ExampleExplainer(self.store, background, "error")
        super().__init__(children=[self._title, self.fig, self._error_html, self._table, self.explainer],
                         **{"layout": S.full_width(), **kwargs})
        self.observe(self._on_run, names="run_id")
        self.observe(lambda change: self._draw(), names="step")
        self.observe(lambda change: setattr(self._error_html, "value", S.message(self.error)), names="error")
        if run_id:
            self.run_id = run_id

    def explain_error(self, index: int) -> Any:
        """Attribute the run's value for `worst[index]` to the words of its text (on a worker thread, returned;
        None when refused): the result lands in `explainer.explanation`, a failure in its view's error."""
        return self.explainer.explain(index)

    def refresh(self) -> bool:
        """Read new evaluations and redraw; True while the run goes on."""
        with self._lock:
            if self._read():
                self._draw()
            return self._status not in FINAL_STATUSES

    def _on_run(self, change: Any = None) -> None:
        with self._lock:
            self._evals, self._seq, self._status, self.step = {}, 0, "", None
            self._read()
            self._draw()
        if self.background and self.run_id and self._status not in FINAL_STATUSES:
            self._poller.start()

    def _tick(self) -> bool:
        try:
            return self.refresh()
        except Exception as exc:  # keep the page alive; say what went wrong
            self.error = f"stopped following the run ({type(exc).__name__}: {exc})"
            return False

    def _read(self) -> bool:
        if not self.run_id:
            return False
        try:
            self._status = self.store.get(self.run_id)["status"]
            new = self.store.points(self.run_id, kind="eval", after_seq=self._seq)
        except Exception as exc:  # e.g. the run was deleted
            self.error, self._status = f"run {self.run_id}: {exc}", "failed"
            return False
        for p in new:
            self._seq = max(self._seq, p["seq"])
            if isinstance(p.get("rmse"), (int, float)):
                self._evals[int(p["step"])] = p
        self.steps = sorted(self._evals)
        return bool(new)

    def _rows(self, step: int) -> list[dict[str, Any]]:
        path = RunPaths(self.store.run_dir(self.run_id)).eval_step(step)
        try:
            rows = json.loads(path.read_text(encoding="utf-8")).get("rows", [])
        except (OSError, ValueError) as exc:
            self.error = f"no predictions saved for step {step} ({type(exc).__name__})"
            return []
        return [r for r in rows if isinstance(r, dict) and isinstance(r.get("true"), (int, float))
                and isinstance(r.get("predicted"), (int, float))]

    def _draw(self) -> None:
        step = self.step if self.step in self._evals else (max(self._evals) if self._evals else None)
        scatter, diagonal = self.fig.data
        if step is None:
            with self.fig.batch_update():
                scatter.x, scatter.y, scatter.text, diagonal.x, diagonal.y = [], [], [], [], []
            self._title.value = S.message("no evaluation yet" if self.run_id else "no run chosen", "muted")
            self.points, self.worst, self._table.value = 0, [], ""
            self.explainer.show(self.run_id, [])
            return
        rows = self._rows(step)
        true, pred = [float(r["true"]) for r in rows], [float(r["predicted"]) for r in rows]
        lo, hi = min(true + pred, default=0.0), max(true + pred, default=1.0)
        with self.fig.batch_update():  # whole arrays, every time
            scatter.x, scatter.y = true, pred
            scatter.text = [(r.get("text") or "")[:80] for r in rows]
            diagonal.x, diagonal.y = [lo, hi], [lo, hi]
        p = self._evals[step]
        self.figures = {k: p.get(k) for k in ("rmse", "baseline_rmse", "mae", "pearson", "spearman")}
        self.points = len(rows)
        self._title.value = S.message(
            f"run {self.run_id}, step {step}: RMSE {p['rmse']:.3f} (predicting the mean: {p['baseline_rmse']:.3f}), "
            f"MAE {p['mae']:.3f}, Spearman {p['spearman']:.3f}", "muted")
        worst = sorted(rows, key=lambda r: -abs(float(r["predicted"]) - float(r["true"])))[:WORST_SHOWN]
        self.worst = worst
        self._table.value = S.message(f"the {len(worst)} largest errors", "muted") + S.table_html(
            ["#", "text", "true", "predicted", "error"],
            [[i + 1, (r.get("text") or "")[:TEXT_CHARS_SHOWN], f"{r['true']:.2f}", f"{r['predicted']:.2f}",
              f"{r['predicted'] - r['true']:+.2f}"] for i, r in enumerate(worst)])
        texts = [str(r.get("text") or "") for r in worst]
        if texts != self.explainer.texts or self.run_id != self.explainer.run_id:  # a redraw keeps an explanation
            self.explainer.show(self.run_id, texts)

    def close(self) -> None:
        self._poller.stop()
        super().close()
