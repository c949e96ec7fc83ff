"""MethodLadder: pick methods, run them as a ladder in its own process, and compare them in a table and a plot.

Start checks the rungs (`workbench.ladder.create_ladder`, on a worker thread) and starts
`python -m workbench ladder --resume ID` as its own process (`launch_ladder`): the kernel stays free, and
a reload or a kernel restart neither kills nor loses the ladder. Stop asks the current rung to stop at its
next step and the ladder to start no other. Results are read from the ladder's ladder.json and the run
store; the plot shows accuracy against trainable parameters (log axis), zero-shot rungs and the classical
baseline as dashed horizontal lines (they train nothing, so they have no place on a log axis). Under the
rungs the table has two reference rows (`references`): the classical baseline (TF-IDF + logistic
regression) every rung fitted on the shared split, and the ensemble of the best trained rung with it,
whose note says whether it beats both.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import traitlets as T

from workbench import Config, WorkbenchError
from workbench.config import METHODS, ZERO_SHOT_METHODS
from workbench.methods import DEFAULT_METHOD, LADDER_ORDER, default_ladder, method_spec
from workbench.store import RunStore

from . import _style as S
from ._background import Poller, run_job
from ._figure import LiveFigure

POLL_S = 1.0
STATUSES = ("idle", "checking", "queued", "running", "stopping", "completed", "stopped", "failed")
ACTIVE = ("checking", "queued", "running", "stopping")
ORDER = LADDER_ORDER  # the choices as a ladder: zero-shot first, then more and more trained
# the rungs ticked at first: the encoder's zero-shot and head-only baselines, then the default method
FIRST_RUNGS = tuple(n for n in default_ladder("encoder") if method_spec(n).family in ("zero-shot", "head"))
TABLE = (("method", "method"), ("model", "model"), ("status", "status"), ("accuracy", "accuracy"),
         ("macro-F1", "f1_macro"), ("trainable", "trainable_params"), ("% params", "trainable_percent"),
         ("wall", "wall_seconds"), ("peak MB", "peak_memory_mb"), ("lr", "learning_rate"), ("run", "run_id"),
         ("note", "note"))


class MethodLadder(W.VBox):
    """Choose methods, Start/Stop a ladder, and read its table and accuracy-vs-trainable-parameters plot.

    `config_factory` gives the ladder's base Config at Start (the dashboard can gather its panels);
    by default the `config` passed in, else the defaults.
    """

    methods = T.List(T.Unicode(), default_value=[*FIRST_RUNGS, DEFAULT_METHOD],
                     help="the rungs, in the order they run")
    ladder_id = T.Unicode("", help="the ladder shown (and controlled)")
    status = T.Enum(STATUSES, default_value="idle")
    rows = T.List(T.Dict(), help="one row per rung: method, accuracy, f1_macro, trainable_params, ...")
    references = T.List(T.Dict(), help="the classical baseline's row and the ensemble's (best rung + classical)")
    error = T.Unicode("")
    read_only = T.Bool(False, help="hide Start/Stop (view ladders only)")

    def __init__(self, config: Config | None = None, home: str | Path | None = None, background: bool = True,
                 config_factory: Callable[[], Config] | None = None, ladder_id: str | None = None,
                 **kwargs: Any) -> None:
        self.store = RunStore(home)
        self.home = self.store.home
        self.background = background
        self.config = config
        self.config_factory: Callable[[], Config] = config_factory or (lambda: self.config or Config())
        self.process: Any = None
        self._lock = threading.RLock()
        self._poller = Poller(self._tick, POLL_S, name="method-ladder-poll")
        style = S.label_style()
        self._pick = W.SelectMultiple(options=_ordered(METHODS), description="Methods", rows=len(METHODS), style=style,
                                      layout=S.control_layout())
        self._start = W.Button(description="Start", icon="play", button_style="success",
                               layout=W.Layout(width="auto"))
        self._stop = W.Button(description="Stop", icon="stop", button_style="warning", disabled=True,
                              layout=W.Layout(width="auto"))
        refresh = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="auto"))
        self._start.on_click(lambda _: self.start())
        self._stop.on_click(lambda _: self.stop())
        refresh.on_click(lambda _: self.refresh())
        self._ladders = W.Dropdown(options=[], description="Ladder", style=style,  # in a column: no flex-basis
                                   layout=S.full_width(max_width="32em"))
        self._controls = W.Box([self._start, self._stop], layout=S.wrap_row())
        self._status = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self._table = W.HTML("", layout=S.full_width())
        self.fig = LiveFigure(layout=S.figure_layout(
            xaxis={**S.figure_layout()["xaxis"], "type": "log", "title": {"text": "trainable parameters"}},
            yaxis={**S.figure_layout()["yaxis"], "title": {"text": "accuracy"}, "range": [0, 1.02]},
            showlegend=False, margin={**S.figure_layout()["margin"], "r": 175},  # room for the baselines' names
        ))
        self.fig.add_scatter(x=[], y=[], mode="markers+text", textposition="top center", name="trained",
                             marker={"size": 11, "color": S.RUN_COLORS[0]},
                             hovertemplate="%{customdata}<extra></extra>")
        super().__init__(children=[
            W.Box([self._pick, W.VBox([self._controls, self._ladders, refresh])], layout=S.wrap_row()),
            W.HTML(S.message("Each method is one run on the same data, split and seed; the ladder runs as its own "
                             "process. Zero-shot rungs and the classical baseline (TF-IDF + logistic regression) "
                             "train nothing: dashed lines in the plot. Under the rungs: the classical baseline, and "
                             "the ensemble of the best rung with it (its note says whether it beats both).",
                             "muted")),
            self._status, self._error_html, S.section("Results"), self._table,
            S.section("Accuracy against trainable parameters"), self.fig,
        ], **{"layout": S.full_width(), **kwargs})
        self._pick.value = tuple(self.methods)
        self._pick.observe(self._on_pick, names="value")
        self._ladders.observe(self._on_ladder_pick, names="value")
        self.observe(self._on_methods, names="methods")
        self.observe(self._on_ladder_id, names="ladder_id")
        self.observe(self._show_status, names=["status", "ladder_id"])
        self.observe(self._show_rows, names=["rows", "references"])
        self.observe(lambda c: setattr(self._error_html, "value", S.message(c["new"])), names="error")
        self.observe(self._show_read_only, names="read_only")
        self._show_status()
        self._follow(ladder_id)

    # --- validation ----------------------------------------------------------------------------
    @T.validate("methods")
    def _valid_methods(self, proposal: dict[str, Any]) -> list[str]:
        unknown = [m for m in proposal["value"] if m not in METHODS]
        if unknown:
            raise T.TraitError(f"method {unknown[0]!r} is unknown: choose from {', '.join(METHODS)}")
        return list(dict.fromkeys(proposal["value"]))

    # --- public -----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def start(self) -> None:
        """Check the rungs and launch the ladder as its own process; errors show inline."""
        if self.read_only:
            self.error = "this page is read-only: training is switched off"
            return
        if self.active:
            self.error = "a ladder is already going: stop it first"
            return
        if not self.methods:
            self.error = "choose at least one method"
            return
        try:
            config = self.config_factory()
        except WorkbenchError as exc:
            self.error = str(exc)
            return
        self.error, self.status = "", "checking"
        self._start.disabled = True
        run_job(lambda: self._create_and_launch(config, list(self.methods)), sync=not self.background,
                name="method-ladder-start")

    def stop(self) -> None:
        """Ask the ladder to stop: the current rung stops at its next step, no further rung starts."""
        from workbench.ladder import request_stop

        if not self.ladder_id or not self.active:
            return
        try:
            request_stop(self.ladder_id, self.home)
        except WorkbenchError as exc:
            self.error = str(exc)
            return
        self.status = "stopping"
        self._stop.disabled = True

    def refresh(self) -> bool:
        """Read the ladder list, the shown ladder and its runs now; True while the ladder is going."""
        from workbench.ladder import ladder_rows, list_ladders, reference_rows

        with self._lock:
            try:
                ladders = list_ladders(self.home)
            except Exception as exc:
                self.error = f"could not read the ladders ({type(exc).__name__}: {exc})"
                return False
            options = [(f"{lad['id']} ({lad['status']}, {', '.join(lad['methods'])})", lad["id"]) for lad in ladders]
            if list(self._ladders.options) != options:
                self._ladders.options = options
            if self._ladders.value != (self.ladder_id or None) and self.ladder_id in {o[1] for o in options}:
                self._ladders.value = self.ladder_id
            ladder = next((lad for lad in ladders if lad["id"] == self.ladder_id), None)
            if ladder is None:
                self.rows, self.references = [], []
                return self.status in ("checking",)
            try:
                rows = ladder_rows(ladder, self.store)
                self.references = reference_rows(rows, self.store)
                self.rows = rows
            except Exception as exc:
                self.error = f"could not read the ladder's runs ({type(exc).__name__}: {exc})"
                return False
            going = ladder["status"] in ("queued", "running")
            if self.status == "checking" or (self.status == "stopping" and going):
                return True  # a ladder being checked is not this one yet; a stop takes until the step ends
            self.status = ladder["status"] if ladder["status"] in STATUSES else "failed"
            if ladder.get("error") and not going:
                self.error = ladder["error"]
            self._start.disabled = self.read_only or going
            self._stop.disabled = not going
            return going

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> str:
        """Block until the ladder ends (scripts, notebooks, tests); returns its status. Waits on the ladder's
        state, however slow the machine; `timeout` (seconds) gives up earlier and returns the status then."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            if self.status == "idle" and self.error:
                return self.status
            if self.status not in ACTIVE and self.ladder_id:
                return self.status
            if not self.background or not self._poller.running:
                self.refresh()
            time.sleep(poll)
        return self.status

    def close(self) -> None:
        self._poller.stop()
        super().close()

    # --- work --------------------------------------------------------------------------------------
    def _create_and_launch(self, config: Config, methods: list[str]) -> None:
        from workbench.ladder import create_ladder, launch_ladder

        try:
            ladder_id = create_ladder(config, methods, self.home, isolate=True)
            self.process = launch_ladder(ladder_id, self.home)
        except WorkbenchError as exc:
            self.error, self.status = str(exc), "idle"
            self._start.disabled = self.read_only
            return
        except Exception as exc:  # words, not a traceback
            self.error, self.status = f"could not start the ladder ({type(exc).__name__}: {str(exc)[:300]})", "idle"
            self._start.disabled = self.read_only
            return
        self.status = "queued"
        self.ladder_id = ladder_id
        self._stop.disabled = False
        self._poll()

    def _follow(self, ladder_id: str | None) -> None:
        """Show `ladder_id`, else the newest ladder (a reloaded page follows the ladder in progress)."""
        from workbench.ladder import list_ladders

        try:
            ladders = list_ladders(self.home)
        except Exception:
            ladders = []
        if ladder_id is None and ladders:
            ladder_id = ladders[0]["id"]
        if ladder_id:
            self.ladder_id = ladder_id
        else:
            self.refresh()
        if self.active:
            self._poll()

    def _poll(self) -> None:
        if self.background:
            self._poller.start()
        else:
            self.refresh()

    def _tick(self) -> bool:
        try:
            return self.refresh()
        except Exception as exc:  # keep the page alive; say what went wrong
            self.error = f"lost track of the ladder ({type(exc).__name__}: {exc})"
            return False

    # --- controls -> traits -------------------------------------------------------------------------
    def _on_pick(self, change: dict[str, Any]) -> None:
        chosen = {m for m in change["new"] if isinstance(m, str) and m in METHODS}
        if chosen != set(self.methods):
            self.methods = _ordered(chosen)

    def _on_methods(self, change: dict[str, Any]) -> None:
        if set(self._pick.value) != set(self.methods):
            self._pick.value = tuple(self.methods)

    def _on_ladder_pick(self, change: dict[str, Any]) -> None:
        if isinstance(change["new"], str) and change["new"] != self.ladder_id:
            self.ladder_id = change["new"]

    def _on_ladder_id(self, change: dict[str, Any]) -> None:
        self.refresh()
        if self.active:
            self._poll()

    # --- view ----------------------------------------------------------------------------------------
    def _show_status(self, change: Any = None) -> None:
        if not self.ladder_id and self.status == "idle":
            self._status.value = S.message("no ladder yet: choose methods and press Start", "muted")
            return
        self._status.value = S.message(" | ".join(p for p in (f"ladder {self.ladder_id}" if self.ladder_id else "",
                                                              self.status) if p), "muted")

    def _show_rows(self, change: Any = None) -> None:
        rows = self.rows
        metric = next((r["metric"] for r in rows if r.get("metric")), "accuracy")  # the task's headline figure
        columns = TABLE if metric == "accuracy" else [c if c[1] != "accuracy" else (metric, "score") for c in TABLE
                                                      if c[1] != "f1_macro"]
        body = [[_fmt(key, r.get(key)) for _, key in columns] for r in rows + self.references]
        self._table.value = S.table_html([t for t, _ in columns], body) if rows else S.message("no rungs yet", "muted")
        self.fig.layout.yaxis.title.text = metric
        trained = [r for r in rows if r["method"] not in ZERO_SHOT_METHODS and r.get("score") is not None
                   and r.get("trainable_params")]
        ensemble = [r for r in self.references if r["method"] == "ensemble" and r.get("trainable_params")]
        trained += ensemble  # the ensemble trains what its rung trained: a point above (or below) it
        baselines = [r for r in rows if r["method"] in ZERO_SHOT_METHODS and r.get("score") is not None]
        baselines += [r for r in self.references if r["method"] == "classical" and r.get("score") is not None]
        with self.fig.batch_update():  # whole arrays each time (LiveFigure: a page opened late shows them too)
            trace = self.fig.data[0]
            trace.x = [r["trainable_params"] for r in trained]
            trace.y = [r["score"] for r in trained]
            trace.text = point_labels(trained)
            trace.textposition = text_positions([r["trainable_params"] for r in trained])
            trace.customdata = [_hover(r) for r in trained]
            self.fig.layout.shapes = [
                {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": r["score"],
                 "y1": r["score"], "line": {"dash": "dash", "color": S.RUN_COLORS[i % len(S.RUN_COLORS)]}}
                for i, r in enumerate(baselines)]
            # in the right margin, clear of the points (full fine-tuning sits at the right edge); close
            # baselines step down so their words never overlap
            self.fig.layout.annotations = [
                {"xref": "paper", "x": 1.01, "xanchor": "left", "yref": "y", "y": r["score"], "yanchor": "middle",
                 "yshift": shift, "showarrow": False, "text": f"{_short(r['method'])} {r['score']:.3f}",
                 "hovertext": _hover(r), "font": {"color": S.RUN_COLORS[baselines.index(r) % len(S.RUN_COLORS)]}}
                for r, shift in zip(baselines, label_shifts([r["score"] for r in baselines]))]

    def _show_read_only(self, change: Any = None) -> None:
        self._controls.layout.display = "none" if self.read_only else ""
        self._start.disabled = self.read_only or self.active


def point_labels(rows: list[dict[str, Any]]) -> list[str]:
    """One label per point; methods with the same trainable count (lora and qlora) share one: "lora / qlora"."""
    labels = []
    for i, r in enumerate(rows):
        same = [x["method"] for x in rows if x["trainable_params"] == r["trainable_params"]]
        first = next(j for j, x in enumerate(rows) if x["trainable_params"] == r["trainable_params"])
        labels.append(" / ".join(same) if i == first else "")
    return labels


POSITIONS = ("top center", "bottom center", "middle right", "middle left")


def text_positions(xs: list[float], near: float = 1.5) -> list[str]:
    """Where each point's label goes: points within a factor `near` of each other on the (log) x axis take
    turns above, below, left and right of their marker, so a cluster (head-only, ia3, prompt tuning) stays
    readable."""
    out = ["top center"] * len(xs)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    turn = 0
    for prev, i in zip(order, order[1:]):
        turn = turn + 1 if xs[prev] > 0 and xs[i] / xs[prev] < near else 0
        out[i] = POSITIONS[turn % len(POSITIONS)]
    return out


def label_shifts(values: list[float], close: float = 0.04, step: int = 14) -> list[int]:
    """Pixel shifts that stack labels whose values are within `close` of the one above them."""
    shifts = [0] * len(values)
    order = sorted(range(len(values)), key=lambda i: -values[i])
    for above, i in zip(order, order[1:]):
        if values[above] - values[i] < close:
            shifts[i] = shifts[above] - step
    return shifts


def _short(method: str) -> str:
    return method.replace("zero-shot-", "zero-shot ")


def _ordered(methods: Any) -> list[str]:
    """Methods in ladder order (zero-shot first); methods the ladder order does not know go last."""
    known = [m for m in ORDER if m in methods]
    return known + sorted(m for m in methods if m not in ORDER)


def _hover(row: dict[str, Any]) -> str:
    return (f"<b>{row['method']}</b> ({row.get('model')})<br>accuracy {_fmt('accuracy', row.get('accuracy'))}, "
            f"macro-F1 {_fmt('f1_macro', row.get('f1_macro'))}<br>"
            f"trainable {S.human_count(row.get('trainable_params'))}"
            f" ({_fmt('trainable_percent', row.get('trainable_percent'))} %)<br>wall "
            f"{S.human_seconds(row.get('wall_seconds'))}, peak {_fmt('peak_memory_mb', row.get('peak_memory_mb'))} MB")


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "" if key == "note" else "-"
    if key == "trainable_params":
        return S.human_count(value)
    if key == "wall_seconds":
        return S.human_seconds(value)
    if key in ("accuracy", "f1_macro", "score"):
        return f"{value:.3f}"
    if key == "peak_memory_mb":
        return f"{value:,.0f}"
    if key == "learning_rate":
        return f"{value:.0e}"
    if key == "trainable_percent":
        return f"{value:.3g}"
    return str(value)
