"""RunCompare: every run in the store as a sortable table; overlay chosen runs' curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import traitlets as T

from workbench.store import RunStore

from . import _style as S
from .confusion import ConfusionMatrix
from .loss_curve import LossCurve

MAX_MATRICES = 4


def _get(path: str) -> Callable[[dict[str, Any]], Any]:
    def read(record: dict[str, Any]) -> Any:
        node: Any = record
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node
    return read


# column title -> how to read it from a run record (RunStore.list())
COLUMNS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "created": lambda r: r.get("created_at"),
    "run": lambda r: r.get("id"),
    "name": lambda r: r.get("name") or "",
    "status": _get("status"),
    "model": _get("config.model"),
    "data": _get("config.data.source"),
    "method": _get("config.method.name"),
    "trainable %": _get("info.trainable_percent"),
    "trainable": _get("info.trainable_params"),
    "accuracy": _get("metrics.accuracy"),
    "f1_macro": _get("metrics.f1_macro"),
    "baseline accuracy": _get("metrics.baseline.accuracy"),
    "baseline f1_macro": _get("metrics.baseline.f1_macro"),
    "answers with": _get("metrics.answers_with.by"),
    "wall s": _get("timings.wall_seconds"),
    "samples/s": _get("timings.samples_per_second"),
    "peak MB": _get("timings.peak_memory_mb"),
}
# the table's columns: title -> the sort column it reads; "trainable" shows the count and the share together
SHOWN: dict[str, str] = {
    "name": "name", "status": "status", "model": "model", "data": "data", "method": "method",
    "trainable": "trainable", "accuracy": "accuracy", "f1_macro": "f1_macro", "baseline acc.": "baseline accuracy",
    "baseline F1": "baseline f1_macro", "answers with": "answers with", "time": "wall s",
    "samples/s": "samples/s", "peak MB": "peak MB", "run": "run", "created": "created",
}
VISIBLE_ROWS = 8  # about this many rows fit the table's scroll box


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers by value, then text case-insensitively."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value).lower())


class RunCompare(W.VBox):
    """A table of runs (sort by any column), and the chosen runs' curves and confusion matrices."""

    runs = T.List(T.Dict(), help="run records, as RunStore.list() gives them")
    sort_by = T.Enum(list(COLUMNS), default_value="created")
    descending = T.Bool(True)
    selected = T.List(T.Unicode(), help="run ids to overlay")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, background: bool = True, store: RunStore | None = None,
                 **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self.curve = LossCurve(store=self.store, background=background)
        self.matrices: list[ConfusionMatrix] = []
        style = S.label_style()
        sort = W.Dropdown(options=list(COLUMNS), description="Sort by", style=style, layout=S.control_layout())
        direction = W.ToggleButton(description="descending", icon="sort-amount-desc", layout=W.Layout(width="auto"))
        refresh = W.Button(description="Refresh", icon="refresh", layout=W.Layout(width="auto"))
        refresh.on_click(lambda _: self.refresh())
        self._pick = W.SelectMultiple(options=[], description="Overlay", rows=6, style=style,
                                      layout=S.full_width(max_width="48em", flex="0 0 auto"))
        self._table = W.HTML("", layout=S.full_width(flex="0 0 auto"))  # never squeezed under the list below
        self._matrix_box = W.Box([], layout=S.wrap_row())
        self._error_html = S.inline_error()
        super().__init__(children=[
            W.Box([sort, direction, refresh], layout=S.wrap_row()), self._table, self._pick,
            W.HTML(S.message("Ctrl/Cmd-click to choose several runs to compare.", "muted")),
            self._error_html, S.section("Curves"), self.curve,
            S.section("Confusion matrices (best evaluation of each run)"), self._matrix_box,
        ], **{"layout": S.full_width(), **kwargs})
        W.link((self, "sort_by"), (sort, "value"))
        W.link((self, "descending"), (direction, "value"))
        self._pick.observe(self._on_pick, names="value")
        self.observe(self._show_table, names=["runs", "sort_by", "descending"])
        self.observe(self._on_selected, names="selected")
        self.observe(lambda c: setattr(self._error_html, "value", S.message(c["new"])), names="error")
        self.refresh()

    # --- validation ------------------------------------------------------------------------
    @T.validate("selected")
    def _valid_selected(self, proposal: dict[str, Any]) -> list[str]:
        """Cross-field: only runs that are in the table can be chosen."""
        known = {r["id"] for r in self.runs}
        return [r for r in dict.fromkeys(proposal["value"]) if r in known]

    # --- public -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the run list again."""
        try:
            self.runs = self.store.list()
            self.error = ""
        except Exception as exc:
            self.error = f"could not read the runs ({type(exc).__name__}: {exc})"

    def sorted_runs(self) -> list[dict[str, Any]]:
        """The runs in table order; runs without a value for the sort column come last either way."""
        read = COLUMNS[self.sort_by]
        present = [r for r in self.runs if read(r) is not None]
        missing = [r for r in self.runs if read(r) is None]
        return sorted(present, key=lambda r: _sort_key(read(r)), reverse=self.descending) + missing

    # --- control -> traits ---------------------------------------------------------------------
    def _on_pick(self, change: dict[str, Any]) -> None:
        self.selected = [v for v in change["new"] if isinstance(v, str)]

    # --- view ------------------------------------------------------------------------------------
    def _show_table(self, change: Any = None) -> None:
        runs = self.sorted_runs()
        rows = [[_cell(title, run) for title in SHOWN] for run in runs]
        arrow = " \u25bc" if self.descending else " \u25b2"
        header = [t + (arrow if SHOWN[t] == self.sort_by or (t == "trainable" and self.sort_by == "trainable %")
                       else "") for t in SHOWN]
        if runs:
            more = f"; scroll the table for the other {len(runs) - VISIBLE_ROWS}" if len(runs) > VISIBLE_ROWS else ""
            self._table.value = (S.table_html(header, rows, max_height="17em", nowrap=True)
                                 + S.message(f"{len(runs)} run{'s' * (len(runs) != 1)}{more}", "muted"))
        else:
            self._table.value = S.message("no runs yet", "muted")
        options = [(f"{r.get('name') or r['id']} ({r['status']}, {r['id']})", r["id"]) for r in runs]
        keep = tuple(r for r in self.selected if r in {o[1] for o in options})
        if list(self._pick.options) != options:
            self._pick.options = options
        self._pick.value = keep
        self.selected = list(keep)

    def _on_selected(self, change: Any = None) -> None:
        self._pick.value = tuple(self.selected)
        self.curve.run_ids = list(self.selected)
        for matrix in self.matrices[len(self.selected[:MAX_MATRICES]):]:
            matrix.close()
        self.matrices = self.matrices[: len(self.selected[:MAX_MATRICES])]
        for i, run_id in enumerate(self.selected[:MAX_MATRICES]):
            if i == len(self.matrices):
                self.matrices.append(ConfusionMatrix(store=self.store, background=self.background, height=300,
                                                     layout=W.Layout(flex="1 1 24em", min_width="0")))
            if self.matrices[i].run_id != run_id:
                self.matrices[i].run_id = run_id
            best = next((r.get("metrics") or {} for r in self.runs if r["id"] == run_id), {}).get("best_step")
            if isinstance(best, int) and best in self.matrices[i].steps:
                self.matrices[i].step = best
        self._matrix_box.children = tuple(self.matrices)


def _cell(title: str, run: dict[str, Any]) -> Any:
    """One table cell, formatted for reading (sorting uses the raw values in COLUMNS)."""
    value = COLUMNS[SHOWN[title]](run)
    if value is None or value == "":
        return ""
    if title == "trainable" and isinstance(value, (int, float)):
        share = COLUMNS["trainable %"](run)
        return S.human_count(value) + (f" ({_percent(share)})" if isinstance(share, (int, float)) else "")
    if title == "answers with":  # with the answer's own figures: an ensemble scores apart from the model alone
        answer = _get("metrics.answers_with")(run) or {}
        shown = [f"{answer[k]:.4f}" for k in ("accuracy", "f1_macro") if isinstance(answer.get(k), (int, float))]
        return f"{value} ({' / '.join(shown)})" if shown else value
    if title == "time" and isinstance(value, (int, float)):
        return S.human_seconds(value)
    if title == "peak MB" and isinstance(value, (int, float)):
        return f"{value:,.0f}"
    if title == "created" and isinstance(value, (int, float)):
        import time

        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    if isinstance(value, float):
        return round(value, 4)
    return value


def _percent(share: float) -> str:
    """100 -> "100%", 2.076 -> "2.08%", 0.0123 -> "0.012%"."""
    return f"{share:.0f}%" if share >= 10 else f"{share:.2f}%" if share >= 0.1 else f"{share:.2g}%"
