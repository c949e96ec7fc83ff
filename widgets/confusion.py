"""ConfusionMatrix: the eval confusion matrix of a run, per-class scores, and the examples behind a cell.

The view follows the run's task row (`workbench.task_table`, its `view`): a run whose task has no classes but a
number per text shows a RegressionView (predicted against true values and the worst errors) in the same place,
a named-entity run an EntitiesView (F1 per entity type, the type confusion, the worst sentences), so a
dashboard needs one diagnostics slot for every task.

Each evaluation of a run writes <run dir>/eval/step-<N>.json with every eval example's prediction;
clicking a cell (or `select_cell(true, predicted)`) lists those examples, most confident first. Each of the
first few has an explain button (`explain_example(i)`): its text with each word coloured by how much it pushed
the run's answer (`workbench.explain`, in an ExplainView).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import ipywidgets as W
import traitlets as T

from workbench.metrics import collapse_note
from workbench.store import FINAL_STATUSES, RunStore
from workbench.task_table import DEFAULT_TASK, TASKS

from . import _style as S
from ._background import Poller
from .entities import EntitiesView
from .explain_view import ExampleExplainer
from .heatmap import LATEST, EvalStepView, confusion_figure, heatmap_cells
from .regression import RegressionView
from .run_summary import baseline_of

POLL_S = 1.0
MAX_EXAMPLES_SHOWN = 50
TEXT_CHARS_SHOWN = 300


class ConfusionMatrix(EvalStepView, W.VBox):
    """Confusion matrix of `run_id` at `step` (None = latest evaluation); follows a live run."""

    run_id = T.Unicode("", help="the run shown")
    step = T.Int(None, allow_none=True, help="evaluation step shown; None = the latest")
    normalize = T.Bool(False, help="row-normalised (recall per true label) instead of counts")
    labels = T.List(T.Unicode())
    matrix = T.List(T.List(T.Int()), help="counts: rows = true label, columns = predicted")
    steps = T.List(T.Int(), help="steps with an evaluation")
    best_step = T.Int(None, allow_none=True)
    selected = T.Tuple(allow_none=True, default_value=None, help="(true label, predicted label) of the chosen cell")
    examples = T.List(T.Dict(), help="eval examples in the chosen cell, most confident first")
    baseline = T.Dict(allow_none=True, default_value=None, help="the run's classical baseline figures")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, run_id: str = "", background: bool = True,
                 store: RunStore | None = None, height: int = 380, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._evals: dict[int, dict[str, Any]] = {}
        self._seq = 0
        self._status = ""
        self._lock = threading.RLock()
        self._rows_cache: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._poller = Poller(self._tick, POLL_S, name="confusion-poll")
        self._step_pick = W.Dropdown(options=[("latest", LATEST)], value=LATEST, description="Evaluation",
                                     style=S.label_style(), layout=S.control_layout())
        norm = W.ToggleButton(description="row-normalised", icon="percent", layout=W.Layout(width="auto"))
        self.fig = confusion_figure(height)  # a page opened at any time shows the current matrix
        self.fig.data[0].on_click(self._on_click)
        self._per_class = W.HTML("", layout=W.Layout(flex="1 1 18em", min_width="0"))
        self._title = W.HTML("", layout=S.full_width())
        self._examples = W.HTML("", layout=S.full_width())
        self.explainer = ExampleExplainer(self.store, background, "example")
        self.explain_view, self._explain_buttons = self.explainer.view, self.explainer.buttons
        self._error_html = S.inline_error()
        plot_box = W.Box([self.fig], layout=W.Layout(flex="3 1 22em", min_width="0"))
        self._classification_view = (
            W.Box([self._step_pick, norm], layout=S.wrap_row()), self._title,
            W.Box([plot_box, self._per_class], layout=S.wrap_row()),
            self._error_html, self._examples, self.explainer,
        )
        self.regression: RegressionView | None = None  # made when a run of the regression view is shown
        self.entities: EntitiesView | None = None  # made when a run of the entities view is shown
        self._height = height
        super().__init__(children=self._classification_view, **{"layout": S.full_width(), **kwargs})
        W.link((self, "normalize"), (norm, "value"))
        self._step_pick.observe(self._on_step_pick, names="value")
        self.observe(self._on_run, names="run_id")
        self.observe(self._draw_and_reselect, names=["step", "normalize"])
        self.observe(self._show_error, names="error")
        if run_id:
            self.run_id = run_id

    # --- public -------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read new evaluations from the store and redraw now; True while the run goes on."""
        other = self.other_view
        if other is not None:
            return other.refresh()
        with self._lock:
            changed = self._read()
            if changed:
                self._draw()
            return self._status not in FINAL_STATUSES

    def select_cell(self, true_label: str, predicted_label: str) -> list[dict[str, Any]]:
        """List the eval examples with this true and predicted label, most confident first."""
        if true_label not in self.labels or predicted_label not in self.labels:
            self.error = f"no cell ({true_label!r}, {predicted_label!r}): labels are {', '.join(self.labels)}"
            return []
        step = self.shown_step
        if step is None:
            return []
        rows = self._rows(step)
        chosen = [r for r in rows if r.get("true") == true_label and r.get("predicted") == predicted_label]
        chosen.sort(key=lambda r: -float(r.get("confidence") or 0.0))
        self.error = ""
        self.selected = (true_label, predicted_label)
        self.examples = chosen
        self._show_examples()
        return chosen

    def explain_example(self, index: int) -> Any:
        """Attribute the run's answer for `examples[index]` to the words of its text as the evaluation saved it
        (its first characters, personal data masked as the run stores it), on a worker thread (returned; None
        when refused): the result lands in `explanation`, a failure in the explain view."""
        if not 0 <= index < len(self.examples):
            self.explain_view.error = f"no example {index + 1} in the chosen cell: choose one of the listed"
            return None
        return self.explainer.explain(index)

    @property
    def shown_step(self) -> int | None:
        if self.step is not None and self.step in self._evals:
            return self.step
        return max(self._evals) if self._evals else None

    # --- reading --------------------------------------------------------------------------------
    def _on_run(self, change: Any = None) -> None:
        if self._show_view():
            return
        with self._lock:
            self._evals, self._seq, self._status = {}, 0, ""
            self.selected, self.examples, self.step = None, [], None
            self._examples.value = ""
            self.explainer.show(self.run_id, [])
            self._read()
            self._draw()
        if self.background and self.run_id and self._status not in FINAL_STATUSES:
            self._poller.start()

    @property
    def view(self) -> str:
        """The shown run's viewer, from its task's row ("confusion" when no run or an unknown task is shown)."""
        try:
            task = (self.store.get(self.run_id).get("config") or {}).get("task", DEFAULT_TASK) if self.run_id else None
        except Exception:  # an unknown run: the matrix view reports it
            task = None
        return TASKS[task].view if task in TASKS else "confusion"

    @property
    def other_view(self) -> RegressionView | EntitiesView | None:
        """The viewer shown in place of the matrix (None while the matrix is shown)."""
        for view in (self.regression, self.entities):
            if view is not None and self.children == (view,):
                return view
        return None

    def _show_view(self) -> bool:
        """Show the run's own viewer in place of the matrix where its task's view is another; True when it did."""
        view = self.view
        if view == "regression":
            if self.regression is None:
                self.regression = RegressionView(store=self.store, background=self.background, height=self._height)
            shown: RegressionView | EntitiesView = self.regression
        elif view == "entities":
            if self.entities is None:
                self.entities = EntitiesView(store=self.store, background=self.background, height=self._height)
            shown = self.entities
        else:
            if self.children != self._classification_view:
                self.children = self._classification_view
            return False
        self._poller.stop()
        self.children = (shown,)
        shown.run_id = self.run_id
        return True

    def _read(self) -> bool:
        if not self.run_id:
            return False
        try:
            record = self.store.get(self.run_id)
            self._status = record["status"]
            self.baseline = baseline_of(record)
            points = self.store.points(self.run_id, kind="eval", after_seq=self._seq)
        except Exception as exc:  # e.g. the run was deleted
            self.error = f"run {self.run_id}: {exc}"
            self._status = "failed"
            return False
        for p in points:
            self._seq = max(self._seq, p["seq"])
            if isinstance(p.get("confusion_matrix"), list) and isinstance(p.get("labels"), list):
                self._evals[int(p["step"])] = p
                if p.get("is_best"):
                    self.best_step = int(p["step"])
        if points:
            self.steps = sorted(self._evals)
            options = [("latest", LATEST)] + [
                (f"step {s}" + (" (best)" if s == self.best_step else ""), s) for s in self.steps]
            self._step_pick.options = options
            self._step_pick.value = self.step if self.step in self._evals else LATEST
        return bool(points)

    def _tick(self) -> bool:
        try:
            return self.refresh()
        except Exception as exc:  # keep the page alive; say what went wrong
            self.error = f"stopped following the run ({type(exc).__name__}: {exc})"
            return False

    # --- drawing ----------------------------------------------------------------------------------
    def _draw_and_reselect(self, change: Any = None) -> None:
        with self._lock:
            self._draw()
            if self.selected:
                self.select_cell(*self.selected)

    def _draw(self) -> None:
        step = self.shown_step
        heat = self.fig.data[0]
        if step is None:
            self.labels, self.matrix = [], []
            with self.fig.batch_update():
                heat.z, heat.x, heat.y, heat.text = [], [], [], []
            self._title.value = S.message("no evaluation yet" if self.run_id else "no run chosen", "muted")
            self._per_class.value = ""
            return
        p = self._evals[step]
        labels = [str(x) for x in p["labels"]]
        counts = [[int(v) for v in row] for row in p["confusion_matrix"]]
        self.labels, self.matrix = labels, counts
        z, text = heatmap_cells(counts, self.normalize)
        with self.fig.batch_update():  # whole arrays, every time
            heat.z, heat.x, heat.y, heat.text = z, labels, labels, text
        best = " (best)" if step == self.best_step else ""
        acc = p.get("accuracy")
        collapsed = collapse_note(labels, counts)
        base = self.baseline or {}
        beside = (f" (classical baseline: accuracy {base['accuracy']:.3f}, macro-F1 {base['f1_macro']:.3f})"
                  if isinstance(base.get("accuracy"), (int, float)) and isinstance(base.get("f1_macro"), (int, float))
                  else "")
        self._title.value = S.message(
            f"run {self.run_id}, step {step}{best}: accuracy {acc:.3f}, macro-F1 {p.get('f1_macro', 0):.3f}{beside} "
            f"- click a cell to see its examples" if isinstance(acc, (int, float)) else f"step {step}", "muted") + (
            S.message(f"warning: {collapsed}") if collapsed else "")
        per = p.get("per_class") or {}
        rows = [[name, per.get(name, {}).get("precision"), per.get(name, {}).get("recall"),
                 per.get(name, {}).get("f1"), per.get(name, {}).get("support")] for name in labels]
        self._per_class.value = S.table_html(["label", "precision", "recall", "F1", "support"], rows)

    @property
    def explanation(self) -> dict[str, Any] | None:
        """The explanation of the chosen example (None until one is asked for)."""
        return self.explainer.explanation

    def _show_examples(self) -> None:
        if not self.selected:
            self._examples.value = ""
            self.explainer.show(self.run_id, [])
            return
        true, pred = self.selected
        rows = [[i + 1, (r.get("text") or "")[:TEXT_CHARS_SHOWN], r.get("true"), r.get("predicted"),
                 f"{float(r.get('confidence') or 0):.3f}"] for i, r in enumerate(self.examples[:MAX_EXAMPLES_SHOWN])]
        more = len(self.examples) - len(rows)
        head = S.message(f"{len(self.examples)} examples: true {true}, predicted {pred}"
                         + (f" (first {len(rows)} shown)" if more > 0 else ""), "muted")
        self._examples.value = head + S.table_html(["#", "text", "true", "predicted", "confidence"], rows)
        self.explainer.show(self.run_id, [str(r.get("text") or "") for r in self.examples[:len(rows)]])

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def close(self) -> None:
        self._poller.stop()
        for view in (self.regression, self.entities):
            if view is not None:
                view.close()
        super().close()
