"""LossCurve: train loss, eval loss, accuracy and macro-F1 of one or several runs, followed live from the store.

The run's classical baseline (TF-IDF + logistic regression, fitted when the run starts) is drawn as dashed
horizontal lines at its accuracy and macro-F1, so the model's curve is read against what a one-second
model does on the same eval split.

In Voila, points added to a FigureWidget before the browser connects never reach the page.
So this widget keeps each run's history in Python, REPLACES whole arrays on every redraw
(`trace.x = [...]`), and draws on a LiveFigure, whose state for a view opened later (a Voila page
loaded or reloaded mid-run or after the run) is the figure as it is now: the whole history.
Redraws happen at most ~5x/s.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T

from workbench.store import FINAL_STATUSES, RunStore
from workbench.task_table import DEFAULT_TASK, TASKS

from . import _style as S
from ._background import Poller
from ._figure import LiveFigure
from .run_summary import baseline_of

REDRAW_MIN_S = 0.2  # at most ~5 redraws per second
MAX_LINE_POINTS = 2000  # per train-loss line drawn; a longer history is drawn every k-th step (and the last)
POLL_S = 0.2
TRACES_PER_RUN = 8  # raw loss, smoothed loss, eval loss, accuracy, best, macro-F1, baseline accuracy and macro-F1
# the two 0..1 figures drawn on the right axis, by the run's view (its task row's), the first one starred at the
# best checkpoint: (key in the eval point, words); a named-entity run's are entity F1 and token accuracy
SCORES = {"entities": (("f1", "entity F1"), ("accuracy", "token accuracy"))}
DEFAULT_SCORES = (("accuracy", "accuracy"), ("f1_macro", "macro-F1"))


@dataclass
class RunHistory:
    """Everything the plot shows of one run, as plain lists (rebuilt into whole arrays on each redraw)."""

    run_id: str
    label: str = ""
    seq: int = 0
    status: str = "queued"
    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_epoch: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    f1_macro: list[float] = field(default_factory=list)
    f1: list[float] = field(default_factory=list)  # entity F1 (named entities)
    view: str = "confusion"  # the run's task row's view: which figures are drawn
    baseline: dict[str, Any] | None = None  # the classical baseline's figures (info.baseline, then metrics.baseline)
    best_step: int | None = None
    warmup_steps: int | None = None
    early_stop_step: int | None = None
    max_steps: int = 0

    def add(self, p: dict[str, Any]) -> None:
        self.seq = max(self.seq, int(p["seq"]))
        kind, step = p["kind"], int(p["step"])
        if kind == "train" and _finite(p.get("loss")):
            self.train_steps.append(step)
            self.train_loss.append(float(p["loss"]))
            self.train_epoch.append(float(p.get("epoch") or 0))
            self.max_steps = int(p.get("max_steps") or self.max_steps)
        elif kind == "eval":
            self.eval_steps.append(step)
            self.eval_loss.append(float(p["eval_loss"]) if _finite(p.get("eval_loss")) else None)
            self.accuracy.append(float(p["accuracy"]) if _finite(p.get("accuracy")) else None)
            self.f1_macro.append(float(p["f1_macro"]) if _finite(p.get("f1_macro")) else None)
            self.f1.append(float(p["f1"]) if _finite(p.get("f1")) else None)
            if p.get("is_best"):
                self.best_step = step
        elif kind == "event":
            event = p.get("event")
            if event == "train_begin":
                resumed = int(p.get("resumed_from_step") or 0)
                self.truncate(resumed)  # a resumed run rewrites what came after its checkpoint
                self.warmup_steps = p.get("warmup_steps")
                self.max_steps = int(p.get("max_steps") or self.max_steps)
            elif event == "early_stop":
                self.early_stop_step = step
            elif event == "train_end" and p.get("status") in FINAL_STATUSES:
                self.status = p["status"]

    @property
    def scores(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """The two figures drawn on the right axis: (key, words) each."""
        return SCORES.get(self.view, DEFAULT_SCORES)

    def truncate(self, after_step: int) -> None:
        keep = [i for i, s in enumerate(self.train_steps) if s <= after_step]
        self.train_steps = [self.train_steps[i] for i in keep]
        self.train_loss = [self.train_loss[i] for i in keep]
        self.train_epoch = [self.train_epoch[i] for i in keep]
        keep = [i for i, s in enumerate(self.eval_steps) if s <= after_step]
        self.eval_steps = [self.eval_steps[i] for i in keep]
        self.eval_loss = [self.eval_loss[i] for i in keep]
        self.accuracy = [self.accuracy[i] for i in keep]
        self.f1_macro = [self.f1_macro[i] for i in keep]
        self.f1 = [self.f1[i] for i in keep]
        if self.best_step is not None and self.best_step > after_step:
            self.best_step = None
        if self.early_stop_step is not None and self.early_stop_step > after_step:
            self.early_stop_step = None


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard smooths): weight 0 = raw values."""
    if weight <= 0:
        return list(values)
    out, last = [], 0.0
    for n, y in enumerate(values, 1):
        last = last * weight + (1 - weight) * y
        out.append(last / (1 - weight**n))
    return out


def thin(n: int, limit: int = MAX_LINE_POINTS) -> list[int]:
    """Indexes of the points drawn out of `n`: all of them up to `limit`, else every k-th and the last.

    Every redraw sends whole arrays (a page opened late must get the whole history), so the size of a
    redraw is bounded here: 8000 steps at 5 redraws/s was ~1.5 MB/s and the page fell minutes behind.
    """
    if n <= limit:
        return list(range(n))
    k = -(-n // limit)
    keep = list(range(0, n, k))
    return keep if keep[-1] == n - 1 else [*keep, n - 1]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


class LossCurve(W.VBox):
    """Live training curves of the runs in `run_ids` (overlaid). `refresh()` reads the store now."""

    run_ids = T.List(T.Unicode(), help="runs to show, overlaid")
    smoothing = T.Float(0.6, min=0.0, max=0.99, help="EMA weight for the train loss; 0 = raw")
    log_scale = T.Bool(False, help="logarithmic loss axis")
    live = T.Bool(True, help="poll the store while a shown run is going")
    statuses = T.Dict(help="run id -> status")
    points_seen = T.Int(0, help="store records read so far, all runs together")

    def __init__(self, home: str | Path | None = None, run_ids: list[str] | tuple[str, ...] = (),
                 background: bool = True, store: RunStore | None = None, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._histories: dict[str, RunHistory] = {}
        self._lock = threading.RLock()
        self._last_draw = 0.0
        self._dirty = False
        self._poller = Poller(self._tick, POLL_S, name="loss-curve-poll")
        self.fig = LiveFigure(layout=S.figure_layout(
            xaxis={**S.figure_layout()["xaxis"], "title": {"text": "step"}},
            yaxis={**S.figure_layout()["yaxis"], "title": {"text": "loss"}},
            yaxis2={"title": {"text": "accuracy / macro-F1"}, "overlaying": "y", "side": "right", "range": [0, 1.02],
                    "gridcolor": "rgba(0,0,0,0)", "zerolinecolor": S.GRID_GREY},
        ))
        self.fig.layout.width = None
        smoothing = W.FloatSlider(min=0.0, max=0.99, step=0.01, description="Smoothing", readout_format=".2f",
                                  continuous_update=False, style=S.label_style(), layout=S.control_layout())
        log = W.ToggleButton(description="log scale", icon="line-chart", layout=W.Layout(width="auto"))
        self._info = W.HTML("", layout=S.full_width())
        super().__init__(children=[W.Box([smoothing, log], layout=S.wrap_row()), self.fig, self._info],
                         **{"layout": S.full_width(), **kwargs})
        W.link((self, "smoothing"), (smoothing, "value"))  # the trait is the source of truth
        W.link((self, "log_scale"), (log, "value"))
        self.observe(self._on_runs, names="run_ids")
        self.observe(self._on_style, names=["smoothing", "log_scale"])
        self.observe(self._on_live, names="live")
        if run_ids:
            self.run_ids = list(run_ids)

    # --- public ---------------------------------------------------------------------------
    def history(self, run_id: str) -> RunHistory:
        return self._histories[run_id]

    def refresh(self) -> bool:
        """Read new records of every shown run and redraw now (no threads); True while any run goes on."""
        with self._lock:
            going = self._read()
            self._draw()
            return going

    def add_run(self, run_id: str) -> None:
        if run_id not in self.run_ids:
            self.run_ids = [*self.run_ids, run_id]

    # --- reading ----------------------------------------------------------------------------
    def _read(self) -> bool:
        going, statuses, seen = False, {}, 0
        for run_id in list(self.run_ids):
            hist = self._histories.get(run_id)
            if hist is None:
                continue
            try:
                record = self.store.get(run_id)
                points = self.store.points(run_id, after_seq=hist.seq)
            except Exception as exc:  # a deleted run or a busy database: keep what we have
                self._info.value = S.message(f"run {run_id}: {type(exc).__name__}: {exc}")
                continue
            for p in points:
                hist.add(p)
            if points:
                self._dirty = True
            seen += len(points)
            if record["status"] != hist.status:
                hist.status = record["status"]
                self._dirty = True
            hist.label = record.get("name") or run_id
            task = TASKS.get((record.get("config") or {}).get("task", DEFAULT_TASK))
            hist.view = task.view if task is not None else hist.view
            baseline = baseline_of(record)
            if baseline != hist.baseline:
                hist.baseline = baseline
                self._dirty = True
            statuses[run_id] = hist.status
            going = going or hist.status not in FINAL_STATUSES
        self.statuses = statuses
        self.points_seen = self.points_seen + seen
        return going

    def _tick(self) -> bool:
        if not self.live:
            return False
        try:
            with self._lock:
                going = self._read()
                if self._dirty and time.monotonic() - self._last_draw >= REDRAW_MIN_S:
                    self._draw()
                if not going and self._dirty:
                    self._draw()
        except Exception as exc:  # keep following: the next redraw replaces every array anyway
            self._dirty = True
            self._info.value = S.message(f"redraw failed ({type(exc).__name__}: {exc}); retrying", "muted")
            return True
        return going

    # --- drawing -------------------------------------------------------------------------------
    def _on_runs(self, change: Any = None) -> None:
        with self._lock:
            wanted = list(dict.fromkeys(self.run_ids))
            self._histories = {r: self._histories.get(r) or RunHistory(r) for r in wanted}
            self._read()  # first: the legend names the runs
            self._rebuild_traces()
            self._draw()
        if self.background and self.live and self.run_ids:
            self._poller.start()

    def _on_live(self, change: dict[str, Any]) -> None:
        if change["new"] and self.background and self.run_ids:
            self._poller.start()

    def _on_style(self, change: Any = None) -> None:
        with self._lock:
            self.fig.layout.yaxis.type = "log" if self.log_scale else "linear"
            self._draw()

    def _rebuild_traces(self) -> None:
        many = len(self._histories) > 1
        traces = []
        for i, hist in enumerate(self._histories.values()):
            color = S.RUN_COLORS[i % len(S.RUN_COLORS)]
            prefix = f"{_short(hist.label or hist.run_id)}: " if many else ""
            group = hist.run_id
            (_, first), (_, second) = hist.scores
            traces += [
                go.Scatter(name=f"{prefix}train loss (raw)", mode="lines", legendgroup=group, showlegend=False,
                           line={"color": color, "width": 1}, opacity=0.3, hoverinfo="skip"),
                go.Scatter(name=f"{prefix}train loss", mode="lines", legendgroup=group,
                           line={"color": color, "width": 2},
                           hovertemplate="step %{x}<br>loss %{y:.4f}<br>epoch %{customdata}<extra></extra>"),
                go.Scatter(name=f"{prefix}eval loss", mode="lines+markers", legendgroup=group,
                           line={"color": color, "width": 2, "dash": "dot"}, marker={"size": 7, "symbol": "circle"}),
                go.Scatter(name=f"{prefix}{first}", mode="lines+markers", legendgroup=group, yaxis="y2",
                           line={"color": color, "width": 1.5, "dash": "dash"},
                           marker={"size": 7, "symbol": "diamond"}),
                go.Scatter(name=f"{prefix}best checkpoint", mode="markers", legendgroup=group, yaxis="y2",
                           marker={"size": 15, "symbol": "star", "color": color,
                                   "line": {"width": 1, "color": S.FONT_GREY}}),
                go.Scatter(name=f"{prefix}{second}", mode="lines+markers", legendgroup=group, yaxis="y2",
                           line={"color": color, "width": 1.5, "dash": "dashdot"},
                           marker={"size": 6, "symbol": "triangle-up"}),
                go.Scatter(name=f"{prefix}baseline accuracy", mode="lines", legendgroup=group, yaxis="y2",
                           line={"color": S.FONT_GREY, "width": 1.5, "dash": "dash"},
                           hovertemplate="classical baseline<br>accuracy %{y:.3f}<extra></extra>"),
                go.Scatter(name=f"{prefix}baseline macro-F1", mode="lines", legendgroup=group, yaxis="y2",
                           line={"color": S.FONT_GREY, "width": 1, "dash": "dot"},
                           hovertemplate="classical baseline<br>macro-F1 %{y:.3f}<extra></extra>"),
            ]
        scores = {h.scores for h in self._histories.values()} or {DEFAULT_SCORES}
        with self.fig.batch_update():
            self.fig.data = ()
            if traces:
                self.fig.add_traces(traces)
            self.fig.layout.yaxis2.title.text = (" / ".join(words for _, words in next(iter(scores)))
                                                 if len(scores) == 1 else "scores (0 to 1)")

    def _draw(self) -> None:
        """Replace every array of every trace (never append), and the marker lines."""
        self._dirty = False
        self._last_draw = time.monotonic()
        shapes, notes = [], []
        with self.fig.batch_update():
            for i, hist in enumerate(self._histories.values()):
                base = i * TRACES_PER_RUN
                if base + TRACES_PER_RUN > len(self.fig.data):
                    break
                raw, smooth, ev, acc, best, f1, base_acc, base_f1 = self.fig.data[base: base + TRACES_PER_RUN]
                drawn = thin(len(hist.train_steps))  # the smoothing runs over every step, then thins
                steps = [hist.train_steps[j] for j in drawn]
                smoothed = ema(hist.train_loss, self.smoothing)
                raw.x, raw.y = (steps, [hist.train_loss[j] for j in drawn]) if self.smoothing > 0 else ([], [])
                smooth.x, smooth.y = steps, [smoothed[j] for j in drawn]
                smooth.customdata = [int(hist.train_epoch[j]) + 1 for j in drawn]
                ev.x, ev.y = list(hist.eval_steps), list(hist.eval_loss)
                (first, _), (second, _) = hist.scores
                acc.x, acc.y = list(hist.eval_steps), list(getattr(hist, first))
                f1.x, f1.y = list(hist.eval_steps), list(getattr(hist, second))
                _reference(base_acc, hist, "accuracy")
                _reference(base_f1, hist, "f1_macro")
                if hist.best_step is not None and hist.best_step in hist.eval_steps:
                    j = len(hist.eval_steps) - 1 - hist.eval_steps[::-1].index(hist.best_step)
                    best.x, best.y = [hist.best_step], [getattr(hist, first)[j]]
                else:
                    best.x, best.y = [], []
                color = S.RUN_COLORS[i % len(S.RUN_COLORS)]
                if hist.warmup_steps:
                    shapes.append(_vline(hist.warmup_steps, color, "dot"))
                    notes.append(_note(hist.warmup_steps, "warmup end"))
                if hist.early_stop_step is not None:
                    shapes.append(_vline(hist.early_stop_step, color, "dash"))
                    notes.append(_note(hist.early_stop_step, "early stop"))
            self.fig.layout.shapes = tuple(shapes)
            self.fig.layout.annotations = tuple(notes)
        self._info.value = S.message(" | ".join(
            f"{h.label}: {h.status}, {len(h.train_steps)} steps, {len(h.eval_steps)} evaluations"
            + (f"; classical baseline accuracy {h.baseline['accuracy']:.3f}, macro-F1 {h.baseline['f1_macro']:.3f}"
               if h.baseline and _finite(h.baseline.get("accuracy")) and _finite(h.baseline.get("f1_macro")) else "")
            for h in self._histories.values()), "muted")

    def close(self) -> None:
        self._poller.stop()
        super().close()


def _reference(trace: Any, hist: RunHistory, key: str) -> None:
    """A flat dashed line at the baseline's figure across every step drawn so far (whole arrays, each time)."""
    value = (hist.baseline or {}).get(key)
    if not _finite(value):
        trace.x, trace.y = [], []
        return
    last = max([hist.max_steps, *hist.train_steps[-1:], *hist.eval_steps[-1:], 1])
    trace.x, trace.y = [0, last], [float(value), float(value)]


def _short(label: str, width: int = 18) -> str:
    """A run's name for a legend entry: its end, where names differ (ladder rungs end in the method)."""
    return label if len(label) <= width else "..." + label[-(width - 3):]


def _vline(x: float, color: str, dash: str) -> dict[str, Any]:
    return {"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
            "line": {"color": color, "width": 1, "dash": dash}}


def _note(x: float, text: str) -> dict[str, Any]:
    return {"x": x, "xref": "x", "y": 1, "yref": "paper", "text": text, "showarrow": False, "yanchor": "bottom",
            "font": {"size": 10, "color": S.FONT_GREY}}
