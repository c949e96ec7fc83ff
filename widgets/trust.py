"""TrustView: how a finished run holds up off its eval split: perturbed texts, out-of-domain texts, slices.

It reads the run's reports (`RunPaths.robustness`, `RunPaths.slices`: written by `workbench evaluate`, by the
Playground's test file, or by this view's own button) and shows:

- robustness: accuracy and the share of answers that flip under each perturbation (regression: RMSE and the
  mean absolute change), as bars and a table, with the out-of-domain confidence shift below;
- slices: accuracy per slice (regression: RMSE) with the overall as a line, flagged slices in the error colour,
  and one plain sentence naming them.

"Run robustness check" scores the run on a chosen test file (`evaluate_file(..., robustness=True)`) on a worker
thread; the files offered are the workspace's uploads (<home>/uploads) and any path given to `check(path)` from
Python. A read-only page shows the reports only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T
from plotly.subplots import make_subplots

from workbench.errors import WorkbenchError
from workbench.run_paths import RunPaths
from workbench.store import RunStore

from . import _style as S
from ._background import run_job
from ._figure import LiveFigure

TEST_FILE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
FLAG_COLOR = "#d62728"
BAR_COLOR = "#1f77b4"
FLIP_COLOR = "#ff7f0e"
SLICES_DRAWN = 24  # flagged slices first, then the others in report order


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:.1f} %"


def _num(x: Any, digits: int = 3) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.{digits}f}"


def slices_sentence(report: dict[str, Any] | None) -> str:
    """One sentence naming the flagged slices of a slices report (or saying there are none)."""
    if not report:
        return ""
    regression = report.get("kind") == "regression"
    metric = "RMSE" if regression else "accuracy"
    key = "rmse" if regression else "accuracy"
    overall = (report.get("overall") or {}).get(key)
    flagged = report.get("flagged") or []
    if not flagged:
        return (f"No slice is flagged: {report.get('rule', '')}. Overall {metric} {_num(overall)} on "
                f"{(report.get('overall') or {}).get('rows', '?')} rows.")
    parts = []
    for s in flagged[:5]:
        what = {"length": f"texts of {s['value']}", "term": f"texts {s['value']} {s['group']!r}",
                "column": f"{s['group']} = {s['value']}"}.get(s["kind"], f"{s['group']} {s['value']}")
        gap = f"{abs(s['gap']) * 100:.1f} points below" if not regression else f"{s['gap']:+.3f} against"
        parts.append(f"{what} ({metric} {_num(s.get(key))}, {gap} the overall {_num(overall)}, {s['rows']} rows)")
    more = f", and {len(flagged) - 5} more" if len(flagged) > 5 else ""
    return f"Weaker than the overall: {'; '.join(parts)}{more}."


def robustness_sentence(report: dict[str, Any] | None) -> str:
    """One sentence on the most fragile perturbation and the out-of-domain confidence shift."""
    if not report:
        return ""
    rows = [p for p in report.get("perturbations", []) if p.get("changed")]
    if report.get("kind") == "regression":
        key, what = "mean_abs_change", "moves the answers most (mean absolute change {:.3f})"
        worst = max(rows, key=lambda p: p.get(key) or 0, default=None)
        text = f"{worst['name']} " + what.format(worst[key]) + "." if worst else ""
    else:
        worst = max(rows, key=lambda p: p.get("flip_rate") or 0, default=None)
        text = (f"{worst['name'].capitalize()} flips the most answers ({_pct(worst['flip_rate'])} of the "
                f"{worst['changed']} texts it changed; accuracy {_num(worst['accuracy'])} against "
                f"{_num(report['clean']['accuracy'])} clean)." if worst else "")
    ood = report.get("ood") or {}
    for s in ood.get("sets", []):
        text += (f" On {s['name']} the mean confidence is {_num(s['mean_confidence'])} against "
                 f"{_num(ood['in_domain_confidence'])} in domain (AUROC {_num(s['auroc'])}).")
    return text.strip()


def _figure(height: int) -> LiveFigure:
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.22,
                        subplot_titles=("under perturbation", "by slice"))
    fig.add_trace(go.Bar(x=[], y=[], name="accuracy", marker={"color": BAR_COLOR}), row=1, col=1)
    fig.add_trace(go.Bar(x=[], y=[], name="answers flipped", marker={"color": FLIP_COLOR}), row=1, col=1)
    fig.add_trace(go.Bar(x=[], y=[], name="slice", marker={"color": []}, showlegend=False, customdata=[],
                         hovertemplate="%{x}<br>%{y:.3f}, %{customdata} rows<extra></extra>"), row=2, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="overall", line={"dash": "dot", "color": "gray"}),
                  row=2, col=1)
    fig.update_layout(**S.figure_layout(height=height, barmode="group", margin={"l": 50, "r": 10, "t": 30, "b": 90}))
    return LiveFigure(fig)


class TrustView(W.VBox):
    """The robustness and slices reports of `run_id`, with a button that measures them on a test file."""

    run_id = T.Unicode("", help="the run shown")
    robustness = T.Dict(allow_none=True, default_value=None, help="the run's robustness report (None: none yet)")
    slices = T.Dict(allow_none=True, default_value=None, help="the run's slices report (None: none yet)")
    summary = T.Unicode("", help="the plain sentences shown: fragile perturbations, flagged slices")
    test_file = T.Unicode("", help="the file the check runs on")
    running = T.Bool(False, help="a check is being measured")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, run_id: str = "", background: bool = True,
                 store: RunStore | None = None, read_only: bool = False, height: int = 560, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background, self.read_only = background, read_only
        self.fig = _figure(height)
        self._title = W.HTML("", layout=S.full_width())
        self._sentence = W.HTML("", layout=S.full_width())
        self._table = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        children: list[W.Widget] = [self._title, self._sentence, self.fig, self._table, self._error_html]
        if not read_only:
            self._file = W.Dropdown(options=[], description="Test file", style=S.label_style(),
                                    layout=S.control_layout())
            self._button = W.Button(description="Run robustness check", icon="shield", button_style="primary",
                                    layout=W.Layout(width="auto"))
            refresh = W.Button(description="", icon="refresh", tooltip="list the uploaded files again",
                               layout=W.Layout(width="auto"))
            self._button.on_click(lambda _: self._check_clicked())
            refresh.on_click(lambda _: self.list_files())
            hint = W.HTML(S.message("a labelled file the run has not seen: the check perturbs its texts and "
                                    "scores the run on each copy (a minute or more on a CPU)", "muted"))
            children = [W.Box([self._file, self._button, refresh], layout=S.wrap_row()), hint] + children
            W.dlink((self, "running"), (self._button, "disabled"))
        super().__init__(children=children, **{"layout": S.full_width(), **kwargs})
        self.observe(self._on_run, names="run_id")
        self.observe(lambda c: setattr(self._error_html, "value", S.message(self.error)), names="error")
        if not read_only:
            self.list_files()
        if run_id:
            self.run_id = run_id
        else:
            self.refresh()

    # --- public -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the shown run's reports and redraw."""
        self.robustness, self.slices = self._read("robustness"), self._read("slices")
        self._draw()

    def list_files(self) -> list[str]:
        """The uploaded files a check can run on (newest first), offered in the file list."""
        folder = self.store.home / "uploads"
        files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TEST_FILE_EXTENSIONS),
                       key=lambda p: -p.stat().st_mtime) if folder.is_dir() else []
        if not self.read_only:
            self._file.options = [(p.name, str(p)) for p in files]
        return [str(p) for p in files]

    def check(self, source: str | Path) -> None:
        """Measure robustness and slices of the shown run on the labelled file `source` (on a worker thread)."""
        if self.read_only:
            self.error = "this page is read-only: robustness checks run from a notebook or the CLI"
            return
        if self.running:
            self.error = "a check is running: wait for it to finish"
            return
        if not self.run_id:
            self.error = "no run chosen: train or pick a run first"
            return
        run_id, self.test_file, self.error, self.running = self.run_id, str(source), "", True
        self._title.value = S.message(f"measuring run {run_id} on {Path(str(source)).name} ...", "muted")
        run_job(lambda: self._check_now(run_id, str(source)), sync=not self.background, name="trust-check")

    def _check_clicked(self) -> None:
        if not self._file.value:
            self.error = "no test file: upload one in Try it (or Set up), then press the refresh button"
            return
        self.check(self._file.value)

    # --- worker -------------------------------------------------------------------------------
    def _check_now(self, run_id: str, source: str) -> None:
        from workbench.evaluate import evaluate_file

        try:
            evaluate_file(run_id, source, self.store.home, robustness=True)
        except WorkbenchError as exc:
            self.error = str(exc).splitlines()[0]
        except Exception as exc:  # words, never a traceback
            self.error = f"could not check {Path(source).name} ({type(exc).__name__}: {exc})".splitlines()[0]
        finally:
            self.running = False
        if run_id == self.run_id:
            self.refresh()

    def _on_run(self, change: Any = None) -> None:
        self.error = ""
        self.refresh()

    # --- reading and drawing ----------------------------------------------------------------------
    def _read(self, name: str) -> dict[str, Any] | None:
        if not self.run_id:
            return None
        try:
            path = getattr(RunPaths(self.store.run_dir(self.run_id)), name)
            report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError, WorkbenchError, KeyError) as exc:
            self.error = f"run {self.run_id}: the {name} report could not be read ({type(exc).__name__})"
            return None
        return report if isinstance(report, dict) else None

    def _draw(self) -> None:
        rob, sl = self.robustness, self.slices
        if not self.run_id:
            self._title.value = S.message("no run chosen", "muted")
        elif not rob and not sl:
            self._title.value = S.message(f"run {self.run_id} has no robustness or slices report yet: run a check on "
                                          "a test file (or `workbench evaluate RUN FILE --robustness`)", "muted")
        else:
            where = (rob or sl or {}).get("file", "")
            self._title.value = S.message(f"run {self.run_id} on {Path(str(where)).name}, measured "
                                          f"{(rob or sl or {}).get('measured_at', '?')}", "muted")
        self.summary = " ".join(s for s in (robustness_sentence(rob), slices_sentence(sl)) if s)
        flagged = bool(sl and sl.get("flagged"))
        self._sentence.value = S.message(slices_sentence(sl), "error" if flagged else "muted") + S.message(
            robustness_sentence(rob), "muted")
        self._draw_figure(rob, sl)
        self._table.value = self._robustness_table(rob)

    def _draw_figure(self, rob: dict[str, Any] | None, sl: dict[str, Any] | None) -> None:
        first, second, bars, overall = self.fig.data
        regression = (rob or sl or {}).get("kind") == "regression"
        names = [p["name"] for p in (rob or {}).get("perturbations", [])]
        ps = (rob or {}).get("perturbations", [])
        shown = (sl or {}).get("flagged", []) + [s for s in (sl or {}).get("slices", []) if not s.get("flagged")]
        shown = shown[:SLICES_DRAWN]
        key = "rmse" if regression else "accuracy"
        labels = [f"{s['group']}: {s['value']}" if s["kind"] != "length" else s["value"] for s in shown]
        level = (sl or {}).get("overall", {}).get(key)
        with self.fig.batch_update():  # whole arrays, every time
            first.x, first.y = names, [p.get(key) for p in ps]
            first.name = "RMSE" if regression else "accuracy"
            second.x = names
            second.y = [p.get("mean_abs_change" if regression else "flip_rate") for p in ps]
            second.name = "mean |change|" if regression else "answers flipped (of changed texts)"
            bars.x, bars.y = labels, [s.get(key) for s in shown]
            bars.marker.color = [FLAG_COLOR if s.get("flagged") else BAR_COLOR for s in shown]
            bars.customdata = [s.get("rows") for s in shown]
            overall.x, overall.y = (labels, [level] * len(labels)) if level is not None else ([], [])

    @staticmethod
    def _robustness_table(rob: dict[str, Any] | None) -> str:
        if not rob:
            return ""
        if rob.get("kind") == "regression":
            rows = [[p["name"], p["changed"], _num(p["rmse"]), _num(p.get("mean_abs_change"))]
                    for p in rob["perturbations"]]
            return S.table_html(["perturbation", "texts changed", "RMSE", "mean |change|"], rows)
        rows = [[p["name"], p["changed"], _num(p["accuracy"]), f"{p['accuracy_drop'] * 100:+.1f}",
                 _pct(p.get("flip_rate")), p.get("description", "")] for p in rob["perturbations"]]
        table = S.table_html(["perturbation", "texts changed", "accuracy", "drop (points)", "answers flipped",
                              "what it does"], rows)
        ood = rob.get("ood") or {}
        ood_rows = [[s["name"], s["rows"], _num(s["mean_confidence"]), f"{s['shift']:+.3f}", _num(s["auroc"])]
                    for s in ood.get("sets", [])]
        if not ood_rows:
            return table
        return table + S.message(f"out of domain ({ood.get('source')}): mean top-class probability "
                                 f"{_num(ood.get('in_domain_confidence'))} on the test file", "muted") + S.table_html(
            ["texts", "rows", "mean confidence", "shift", "AUROC (in vs out)"], ood_rows)
