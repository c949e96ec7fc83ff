"""EntitiesView: a named-entity run's F1 per entity type over its evaluations, the confusion over entity types,
and the sentences it got most wrong, with gold and predicted entities marked in the text.

What ConfusionMatrix is to a classifier (the task rows whose `view` is "entities"). Each evaluation point in
the store carries the entity figures (f1, precision, recall, token accuracy), "per_type" {type: {precision,
recall, f1, support}}, "confusion_matrix" over "confusion_labels" = [*types, "O"] (rows: gold entities by type;
columns: the type of the predicted span with exactly its ends; the "O" column: missed, the "O" row: predicted
spans that match no gold entity) and "mistakes" (the worst sentences with their gold and predicted spans).
<run>/eval/step-N.json holds every eval sentence: clicking a cell (or `select_cell(gold, predicted)`) lists the
sentences behind it. The first few worst sentences have an explain button (`explain_sentence(i)`: each word
coloured by how much it pushed each predicted entity).

Both figures are LiveFigures redrawn from the whole history (at most every REDRAW_MIN_S), so a page opened or
reloaded mid-run draws every evaluation so far. `marked_html` is what the Playground shows for a typed text too.
"""

from __future__ import annotations

import hashlib
import html
import threading
import time
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T

from workbench.store import FINAL_STATUSES, RunStore

from . import _style as S
from ._background import Poller
from ._figure import LiveFigure
from .explain_view import ExampleExplainer
from .heatmap import LATEST, EvalStepView, confusion_figure, heatmap_cells

POLL_S = 0.5
REDRAW_MIN_S = 0.2  # at most ~5 redraws per second (STYLE: live plots)
NONE = "O"  # the confusion's last label: no entity there (a missed gold entity, a spurious predicted one)
WORST_SHOWN = 20
SENTENCES_SHOWN = 50
# one colour per entity type, the same in every view (chosen from the type's name, not its position)
TYPE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f")


def type_color(kind: str) -> str:
    """The colour of an entity type: stable across runs, pages and views."""
    return TYPE_COLORS[int(hashlib.sha1(kind.encode("utf-8")).hexdigest(), 16) % len(TYPE_COLORS)]


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i: i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def mark(text: str, kind: str) -> str:
    """One entity: its text on its type's colour, the type as a small label after it (both escaped)."""
    color = type_color(kind)
    return (f'<mark data-type="{html.escape(kind)}" title="{html.escape(kind)}" style="background:{_rgba(color, 0.22)}; '
            f'color:inherit; border-bottom:2px solid {color}; border-radius:3px; padding:0 2px">{html.escape(text)}'
            f'<span style="font-size:0.7em; font-weight:bold; color:{color}; margin-left:3px; '
            f'vertical-align:middle">{html.escape(kind)}</span></mark>')


def marked_html(text: str, spans: list[dict[str, Any]]) -> str:
    """`text` with each span ({"type", "start", "end"}: character offsets into it) marked by type, every piece
    escaped; a span that overlaps an earlier one or falls outside the text is left unmarked."""
    out, at = [], 0
    for span in sorted((s for s in spans if isinstance(s, dict)), key=lambda s: (int(s.get("start", 0)),
                                                                                 -int(s.get("end", 0)))):
        start, end = int(span.get("start", -1)), int(span.get("end", -1))
        if start < at or end <= start or end > len(text):
            continue
        out.append(html.escape(text[at:start]))
        out.append(mark(text[start:end], str(span.get("type", "?"))))
        at = end
    out.append(html.escape(text[at:]))
    return ('<span style="white-space:pre-wrap; overflow-wrap:anywhere; line-height:1.9">' + "".join(out)
            + "</span>")


def sentence_html(sentence: dict[str, Any], gold: str = "gold", predicted: str = "predicted",
                  number: int | None = None) -> str:
    """A sentence twice: its gold entities marked, then the predicted ones (headed "#number" when given)."""
    text = str(sentence.get("text") or "")
    label = f'<span style="color:{S.MUTED_COLOR}; display:inline-block; width:6em">{{}}</span>'
    head = f'<div style="color:{S.MUTED_COLOR}">#{number}</div>' if number is not None else ""
    return (f'<div style="margin:4px 0; padding:4px 0; border-bottom:{S.BORDER}">{head}'
            f"<div>{label.format(gold)}{marked_html(text, list(sentence.get(gold) or []))}</div>"
            f"<div>{label.format(predicted)}{marked_html(text, list(sentence.get(predicted) or []))}</div></div>")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


class EntitiesView(EvalStepView, W.VBox):
    """F1 per entity type over the evaluations of `run_id`, and the type confusion and worst sentences at
    `step` (None = the latest evaluation); follows a live run."""

    run_id = T.Unicode("", help="the run shown")
    step = T.Int(None, allow_none=True, help="evaluation step shown; None = the latest")
    steps = T.List(T.Int(), help="steps with an evaluation")
    best_step = T.Int(None, allow_none=True)
    normalize = T.Bool(False, help="row-normalised confusion (each gold type's share) instead of counts")
    types = T.List(T.Unicode(), help="the entity types seen in the run's evaluations")
    figures = T.Dict(help="f1, precision, recall, accuracy (token) and eval_loss of the shown evaluation")
    per_type = T.Dict(help="type -> precision, recall, f1, support of the shown evaluation")
    labels = T.List(T.Unicode(), help="the confusion's rows and columns: the types, then O")
    matrix = T.List(T.List(T.Int()), help="rows: gold entities by type (O: spurious); columns: predicted (O: missed)")
    worst = T.List(T.Dict(), help="the shown evaluation's sentences with the most wrong entities, worst first")
    selected = T.Tuple(allow_none=True, default_value=None, help="(gold type, predicted type) of the chosen cell")
    sentences = T.List(T.Dict(), help="eval sentences behind the chosen cell")
    error = T.Unicode("")

    def __init__(self, home: Any = None, run_id: str = "", background: bool = True, store: RunStore | None = None,
                 height: int = 380, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._evals: dict[int, dict[str, Any]] = {}
        self._seq, self._status = 0, ""
        self._lock = threading.RLock()
        self._last_draw, self._dirty = 0.0, False
        self._drawn_types: tuple[str, ...] | None = None
        self._rows_cache: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._poller = Poller(self._tick, POLL_S, name="entities-poll")
        self._step_pick = W.Dropdown(options=[("latest", LATEST)], value=LATEST, description="Evaluation",
                                     style=S.label_style(), layout=S.control_layout())
        norm = W.ToggleButton(description="row-normalised", icon="percent", layout=W.Layout(width="auto"))
        self.f1_fig = LiveFigure(layout=S.figure_layout(
            height=300, xaxis={**S.figure_layout()["xaxis"], "title": {"text": "step"}},
            yaxis={**S.figure_layout()["yaxis"], "title": {"text": "F1"}, "range": [0, 1.02]}))
        self.fig = confusion_figure(height, predicted="predicted type (O: missed)", true="gold type (O: spurious)")
        self.fig.data[0].on_click(self._on_click)
        self._title = W.HTML("", layout=S.full_width())
        self._per_type = W.HTML("", layout=W.Layout(flex="1 1 18em", min_width="0"))
        self._worst = W.HTML("", layout=S.full_width())
        self._cell = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        self.explainer = ExampleExplainer(self.store, background, "sentence")
        plot_box = W.Box([self.fig], layout=W.Layout(flex="3 1 22em", min_width="0"))
        super().__init__(children=[
            W.Box([self._step_pick, norm], layout=S.wrap_row()), self._title, self.f1_fig,
            W.Box([plot_box, self._per_type], layout=S.wrap_row()), self._error_html, self._cell, self._worst,
            self.explainer,
        ], **{"layout": S.full_width(), **kwargs})
        W.link((self, "normalize"), (norm, "value"))
        self._step_pick.observe(self._on_step_pick, names="value")
        self.observe(self._on_run, names="run_id")
        self.observe(self._redraw, names=["step", "normalize"])
        self.observe(lambda change: setattr(self._error_html, "value", S.message(self.error)), names="error")
        if run_id:
            self.run_id = run_id

    # --- public -----------------------------------------------------------------------------------
    def explain_sentence(self, index: int) -> Any:
        """Attribute the run's entities in `worst[index]` to its words (on a worker thread, returned; None when
        refused): the result lands in `explainer.explanation`, a failure in its view's error."""
        return self.explainer.explain(index)

    def refresh(self) -> bool:
        """Read new evaluations from the store and redraw now; True while the run goes on."""
        with self._lock:
            if self._read():
                self._draw()
            return self._status not in FINAL_STATUSES

    @property
    def shown_step(self) -> int | None:
        if self.step is not None and self.step in self._evals:
            return self.step
        return max(self._evals) if self._evals else None

    def f1_history(self) -> dict[str, list[float | None]]:
        """Each type's F1 at every evaluation (in step order), and "all" for the micro F1 over entities."""
        steps = sorted(self._evals)
        out: dict[str, list[float | None]] = {"all": [self._evals[s].get("f1") for s in steps]}
        for kind in self.types:
            out[kind] = [((self._evals[s].get("per_type") or {}).get(kind) or {}).get("f1") for s in steps]
        return out

    def select_cell(self, gold: str, predicted: str) -> list[dict[str, Any]]:
        """The eval sentences behind a cell: a gold entity of type `gold` whose exact span was predicted as
        `predicted` (O: missed); gold O: a predicted `predicted` entity with no gold entity at its ends."""
        if gold not in self.labels or predicted not in self.labels or gold == predicted == NONE:
            self.error = f"no cell ({gold!r}, {predicted!r}): types are {', '.join(self.labels)}"
            return []
        step = self.shown_step
        if step is None:
            return []
        chosen = [r for r in self._rows(step) if _in_cell(r, gold, predicted)]
        self.error = ""
        self.selected = (gold, predicted)
        self.sentences = chosen
        self._show_cell()
        return chosen

    # --- reading ----------------------------------------------------------------------------------
    def _on_run(self, change: Any = None) -> None:
        with self._lock:
            self._evals, self._seq, self._status = {}, 0, ""
            self._drawn_types = None
            self.selected, self.sentences, self.step, self.best_step, self.types = None, [], None, None, []
            self._cell.value = ""
            self._read()
            self._draw()
        if self.background and self.run_id and self._status not in FINAL_STATUSES:
            self._poller.start()

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
            if isinstance(p.get("per_type"), dict) and isinstance(p.get("confusion_matrix"), list):
                self._evals[int(p["step"])] = p
                if p.get("is_best"):
                    self.best_step = int(p["step"])
        if new:
            self.steps = sorted(self._evals)
            seen = list(self.types)
            for s in self.steps:
                seen += [str(k) for k in self._evals[s].get("labels") or self._evals[s]["per_type"] if k not in seen]
            self.types = seen
            self._step_pick.options = [("latest", LATEST)] + [
                (f"step {s}" + (" (best)" if s == self.best_step else ""), s) for s in self.steps]
            self._step_pick.value = self.step if self.step in self._evals else LATEST
        return bool(new)

    def _tick(self) -> bool:
        try:
            with self._lock:
                self._dirty = self._read() or self._dirty
                if self._dirty and time.monotonic() - self._last_draw >= REDRAW_MIN_S:
                    self._draw()
                return self._status not in FINAL_STATUSES or self._dirty
        except Exception as exc:  # keep the page alive; say what went wrong
            self.error = f"stopped following the run ({type(exc).__name__}: {exc})"
            return False

    # --- drawing ------------------------------------------------------------------------------------
    def _redraw(self, change: Any = None) -> None:
        with self._lock:
            self._draw()
            if self.selected:
                self.select_cell(*self.selected)

    def _draw(self) -> None:
        self._dirty, self._last_draw = False, time.monotonic()
        self._draw_f1()
        step = self.shown_step
        heat = self.fig.data[0]
        if step is None:
            self.labels, self.matrix, self.figures, self.per_type, self.worst = [], [], {}, {}, []
            with self.fig.batch_update():
                heat.z, heat.x, heat.y, heat.text = [], [], [], []
            self._title.value = S.message("no evaluation yet" if self.run_id else "no run chosen", "muted")
            self._per_type.value = self._worst.value = ""
            self.explainer.show(self.run_id, [])
            return
        p = self._evals[step]
        types = p.get("labels") or list(p["per_type"])
        labels = [str(x) for x in p.get("confusion_labels") or [*types, NONE]]
        counts = [[int(v) for v in row] for row in p["confusion_matrix"]]
        self.labels, self.matrix = labels, counts
        z, text = heatmap_cells(counts, self.normalize)
        with self.fig.batch_update():  # whole arrays, every time
            heat.z, heat.x, heat.y, heat.text = z, labels, labels, text
        self.figures = {k: float(p[k]) for k in ("f1", "precision", "recall", "accuracy", "eval_loss")
                        if _finite(p.get(k))}
        self.per_type = {str(k): dict(v) for k, v in p["per_type"].items() if isinstance(v, dict)}
        f = self.figures
        best = " (best)" if step == self.best_step else ""
        words = ", ".join(f"{title} {f[k]:.3f}" for title, k in (("entity F1", "f1"), ("precision", "precision"),
                                                                 ("recall", "recall"), ("token accuracy", "accuracy"))
                          if k in f)
        self._title.value = S.message(f"run {self.run_id}, step {step}{best}: {words} - click a cell to see its "
                                      "sentences", "muted")
        rows = [[kind, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                for kind, v in self.per_type.items()]
        self._per_type.value = S.table_html(["entity type", "precision", "recall", "F1", "support"], rows)
        self.worst = [m for m in p.get("mistakes") or [] if isinstance(m, dict)][:WORST_SHOWN]
        self._worst.value = (S.message(f"the {len(self.worst)} sentences with the most wrong entities, worst first",
                                       "muted") + "".join(sentence_html(m, number=i + 1)
                                                          for i, m in enumerate(self.worst))) if self.worst else ""
        texts = [str(m.get("text") or "") for m in self.worst]
        if texts != self.explainer.texts or self.run_id != self.explainer.run_id:  # a redraw keeps an explanation
            self.explainer.show(self.run_id, texts)

    def _draw_f1(self) -> None:
        """A line per entity type (and a thick one for all entities) over every evaluation: whole arrays."""
        if tuple(self.types) != self._drawn_types:
            traces = [go.Scatter(name="all entities (micro F1)", mode="lines+markers",
                                 line={"color": S.FONT_GREY, "width": 3}, marker={"size": 7})]
            traces += [go.Scatter(name=kind, mode="lines+markers", line={"color": type_color(kind), "width": 1.5},
                                  marker={"size": 6}) for kind in self.types]
            with self.f1_fig.batch_update():
                self.f1_fig.data = ()
                self.f1_fig.add_traces(traces)
            self._drawn_types = tuple(self.types)
        steps = sorted(self._evals)
        history = self.f1_history()
        with self.f1_fig.batch_update():
            for trace, key in zip(self.f1_fig.data, ["all", *self.types]):
                trace.x, trace.y = steps, history[key]
            best = self.best_step
            self.f1_fig.layout.shapes = (({"type": "line", "xref": "x", "yref": "paper", "x0": best, "x1": best,
                                           "y0": 0, "y1": 1, "line": {"color": S.FONT_GREY, "width": 1,
                                                                      "dash": "dot"}},) if best is not None else ())

    def _show_cell(self) -> None:
        if not self.selected:
            self._cell.value = ""
            return
        gold, predicted = self.selected
        what = (f"predicted {predicted} spans that match no gold entity" if gold == NONE else
                f"gold {gold} entities that were missed" if predicted == NONE else
                f"gold {gold} entities predicted as {predicted}")
        shown = self.sentences[:SENTENCES_SHOWN]
        more = f" (first {len(shown)} shown)" if len(self.sentences) > len(shown) else ""
        self._cell.value = S.message(f"{len(self.sentences)} sentences with {what}{more}", "muted") + "".join(
            sentence_html(r, "gold_spans", "predicted_spans") for r in shown)

    def close(self) -> None:
        self._poller.stop()
        super().close()


def _in_cell(row: dict[str, Any], gold: str, predicted: str) -> bool:
    """Whether an eval sentence holds an entity counted in the cell (gold, predicted) of the type confusion."""
    truth = {(s.get("start"), s.get("end")): s.get("type") for s in row.get("gold_spans") or []}
    guess = {(s.get("start"), s.get("end")): s.get("type") for s in row.get("predicted_spans") or []}
    if gold == NONE:
        return any(kind == predicted and ends not in truth for ends, kind in guess.items())
    return any(kind == gold and guess.get(ends, NONE) == predicted for ends, kind in truth.items())
