"""RunSummary: the fine-tuned model beside the classical baseline, what the run chose, and what answers.

Every classification and regression run fits a classical baseline (TF-IDF + a linear model) when it starts.
This widget follows one run in the store and shows, while it trains and at the end:

- a table: the fine-tuned model's best evaluation so far, the classical baseline, and (at the end) the
  ensemble of the two, each with accuracy and macro-F1 (regression: RMSE, MAE, Spearman), the row the run
  answers with marked;
- why it answers with that (`metrics.answers_with.why`), and the plain sentence of
  `baseline_note` when the model is not better than the baseline;
- the settings the run chose from the data (`info.decisions`) and how many training texts were cut
  (`info.truncation`);
- for a finished classification run, its calibration (`metrics.calibration`): "ECE 0.091 -> 0.049
  (temperature 1.58)" and the reliability bins before and after scaling;
- for a run that continued another (continual learning), what it forgot: "forgetting: accuracy on run X's
  eval split: 0.875 -> 0.844 (-0.031)" (`metrics.forgetting`);
- with `extend=True` (a page that may train), an "Extend run" panel under it (`ExtendRunPanel`): the shown
  run, once completed, continued on new data, and what it forgot.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import ipywidgets as W
import traitlets as T

from workbench.store import FINAL_STATUSES, RunStore
from workbench.task_table import DEFAULT_TASK
from workbench.tasks.ensemble import baseline_note

from . import _style as S
from ._background import Poller
from .extend import ExtendRunPanel, forgetting_text
from .reliability import calibration_text, reliability_rows

POLL_S = 1.0
CLASS_FIGURES = (("accuracy", "accuracy"), ("macro-F1", "f1_macro"))
REGRESSION_FIGURES = (("RMSE", "rmse"), ("MAE", "mae"), ("Spearman", "spearman"))
ENTITY_FIGURES = (("entity F1", "f1"), ("precision", "precision"), ("recall", "recall"),
                  ("token accuracy", "accuracy"))


def baseline_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The classical baseline's figures: the final ones, else those recorded when the run started."""
    metrics, info = record.get("metrics") or {}, record.get("info") or {}
    found = metrics.get("baseline") or info.get("baseline")
    return found if isinstance(found, dict) else None


def best_eval(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best evaluation so far (the newest one marked best, else the newest)."""
    evals = [p for p in points if p.get("kind") == "eval"]
    best = [p for p in evals if p.get("is_best")]
    return (best or evals or [None])[-1]


def figures_text(figures: dict[str, Any] | None) -> str:
    """"accuracy 0.812, macro-F1 0.790" (or RMSE / MAE / Spearman for a number): every figure it has."""
    if not figures:
        return ""
    names = (ENTITY_FIGURES if "f1" in figures and "f1_macro" not in figures else
             CLASS_FIGURES if "accuracy" in figures else REGRESSION_FIGURES)
    return ", ".join(f"{title} {figures[key]:.3f}" for title, key in names if _number(figures.get(key)))


def truncation_text(truncation: dict[str, Any] | None) -> str:
    if not truncation or not truncation.get("texts_measured"):
        return ""
    cut, measured = truncation.get("texts_cut", 0), truncation["texts_measured"]
    text = (f"{cut} of {measured} training texts measured ({truncation.get('share_cut', 0):.0%}) are longer than "
            f"max_length {truncation.get('max_length')} tokens (the longest: {truncation.get('longest_tokens')})")
    return text + (f" and are read as {truncation.get('mode')}" if cut else "")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


class RunSummary(W.VBox):
    """The model beside its classical baseline, the run's choices and its answer, for `run_id` (followed live)."""

    run_id = T.Unicode("", help="the run shown")
    status = T.Unicode("", help="that run's status")
    model = T.Dict(allow_none=True, default_value=None, help="the fine-tuned model's best evaluation so far")
    baseline = T.Dict(allow_none=True, default_value=None, help="the classical baseline's figures")
    ensemble = T.Dict(allow_none=True, default_value=None, help="the mean of model and baseline, at the end")
    answers_with = T.Dict(allow_none=True, default_value=None, help="metrics.answers_with: what the run answers with")
    note = T.Unicode("", help="baseline_note: said when the model is not better than the baseline")
    decisions = T.List(T.Dict(), help="info.decisions: each setting chosen from the data, its value and why")
    truncation = T.Dict(allow_none=True, default_value=None, help="info.truncation")
    calibration = T.Dict(allow_none=True, default_value=None,
                         help="metrics.calibration: the fitted temperature, ECE before and after, reliability bins")
    task = T.Unicode("", help="the run's task (config.task)")
    forgetting = T.Dict(allow_none=True, default_value=None,
                        help="metrics.forgetting: the continued run's eval split before and after this run trained")
    abstain_below = T.Float(allow_none=True, default_value=None, help="train.abstain_below of the run's config")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, run_id: str = "", background: bool = True,
                 store: RunStore | None = None, extend: bool = False, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        # it starts runs: only on a page that may train (the dashboard passes extend=not read_only)
        self.extend = ExtendRunPanel(store=self.store, background=background) if extend else None
        self.background = background
        self._lock = threading.RLock()
        self._poller = Poller(self._tick, POLL_S, name="run-summary-poll")
        self._figures = W.HTML("", layout=S.full_width())
        self._answer = W.HTML("", layout=S.full_width())
        self._choices = W.HTML("", layout=S.full_width())
        extension = [S.section("Extend the run: continue on new data"), self.extend] if self.extend else []
        super().__init__(children=[self._figures, self._answer, self._choices, *extension],
                         **{"layout": S.full_width(), **kwargs})
        if self.extend is not None:
            T.dlink((self, "run_id"), (self.extend, "run_id"))
            T.dlink((self, "status"), (self.extend, "run_status"))  # a run that completes becomes extendable
        self.observe(self._on_run, names="run_id")
        self.observe(self._show, names=["model", "baseline", "ensemble", "answers_with", "note", "decisions",
                                        "truncation", "calibration", "forgetting", "abstain_below", "error",
                                        "status"])
        self._show()
        if run_id:
            self.run_id = run_id

    # --- reading -----------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read the run's record and evaluations now; True while the run goes on."""
        with self._lock:
            if not self.run_id:
                return False
            try:
                record = self.store.get(self.run_id)
                points = self.store.points(self.run_id, kind="eval")
            except Exception as exc:  # a deleted run, a busy database: say so, keep the page
                self.error = f"run {self.run_id}: {type(exc).__name__}: {exc}"
                return False
            self._absorb(record, points)
            return record["status"] not in FINAL_STATUSES

    def _absorb(self, record: dict[str, Any], points: list[dict[str, Any]]) -> None:
        metrics, info = record.get("metrics") or {}, record.get("info") or {}
        final = record["status"] in FINAL_STATUSES and any(k in metrics for k in ("accuracy", "rmse", "f1"))
        best = metrics if final else best_eval(points)
        keys = ("accuracy", "f1_macro", "f1", "precision", "recall", "rmse", "mae", "spearman", "step", "best_step")
        self.model = {k: best[k] for k in keys if best is not None and _number(best.get(k))} or None
        self.baseline = baseline_of(record)
        self.ensemble = metrics.get("ensemble") if isinstance(metrics.get("ensemble"), dict) else None
        self.answers_with = metrics.get("answers_with") if isinstance(metrics.get("answers_with"), dict) else None
        self.note = (baseline_note(metrics) or "") if final else ""
        self.decisions = [d for d in info.get("decisions") or [] if isinstance(d, dict)]
        self.truncation = info.get("truncation") if isinstance(info.get("truncation"), dict) else None
        found = metrics.get("calibration")
        self.calibration = found if final and isinstance(found, dict) else None
        self.task = str((record.get("config") or {}).get("task") or DEFAULT_TASK)
        found = metrics.get("forgetting")
        self.forgetting = found if final and isinstance(found, dict) else None
        abstain = ((record.get("config") or {}).get("train") or {}).get("abstain_below")
        self.abstain_below = float(abstain) if _number(abstain) else None
        self.error = ""
        self.status = record["status"]

    def _on_run(self, change: Any = None) -> None:
        self.model = self.baseline = self.ensemble = self.answers_with = self.truncation = None
        self.calibration = self.abstain_below = self.forgetting = None
        self.note, self.decisions, self.status, self.error = "", [], "", ""
        going = self.refresh()
        if going and self.background:
            self._poller.start()

    def _tick(self) -> bool:
        try:
            return self.refresh()
        except Exception as exc:  # keep the page alive
            self.error = f"stopped following the run ({type(exc).__name__}: {exc})"
            return False

    # --- view ----------------------------------------------------------------------------------------
    def rows(self) -> list[list[str]]:
        """The comparison table's rows: what, figures, and which one answers."""
        by = (self.answers_with or {}).get("by")
        out = []
        if self.model:
            step = self.model.get("best_step", self.model.get("step"))
            what = "fine-tuned model" + (f" (best, step {step})" if step is not None else "")
            out.append([what, figures_text(self.model), "answers" if by == "fine-tuned" else ""])
        if self.baseline:
            weights = self.baseline.get("class_weight")
            what = "classical baseline" + (f" ({weights} class weights)" if weights else "")
            seconds = self.baseline.get("seconds")
            out.append([what + (f", {seconds:.1f} s" if _number(seconds) else ""), figures_text(self.baseline), ""])
        if self.ensemble:
            weights = self.ensemble.get("weights") or [0.5, 0.5]
            what = f"ensemble ({weights[0]:g} x model + {weights[1]:g} x baseline probabilities)"
            out.append([what, figures_text(self.ensemble), "answers" if by == "ensemble" else ""])
        return out

    def _show(self, change: Any = None) -> None:
        rows = self.rows()
        if not self.run_id:
            self._figures.value = S.message("no run chosen", "muted")
        elif rows:
            what = ("the model beside the classical baseline (TF-IDF + a linear model) on the same eval split"
                    if self.baseline else "the model's best evaluation (no classical baseline was fitted)")
            head = S.message(what + ("" if self.status in FINAL_STATUSES else ", while it trains"), "muted")
            self._figures.value = head + S.table_html(["", "eval figures", "run answers with"], rows)
        else:
            self._figures.value = S.message("no figures yet", "muted")
        answer = ""
        if self.answers_with:
            answer = S.message(f"answers with: {self.answers_with.get('by')} "
                               f"({figures_text(self.answers_with)}): {self.answers_with.get('why', '')}", "ok")
        if self.note:
            answer += S.message(self.note)
        forgot = forgetting_text(self.forgetting, self.task)
        if forgot:
            answer += S.message(f"forgetting: {forgot}", "ok")
        self._answer.value = answer + self._calibration_html() + S.message(self.error)
        self._choices.value = self._choices_html()

    def _calibration_html(self) -> str:
        text = calibration_text(self.calibration, self.abstain_below)
        if not text:
            return ""
        kept = self.calibration.get("kept_identity")
        line = S.message(f"calibration: {text}" + (f"; {kept}" if kept else ", fitted on the eval split"), "ok")
        rows = reliability_rows(self.calibration)
        if not rows:
            return line
        return line + (f'<details style="color:{S.MUTED_COLOR}"><summary>reliability per confidence bin '
                       f"({self.calibration.get('rows', 0)} eval rows)</summary>"
                       + S.table_html(["confidence", "rows before / after", "accuracy before", "confidence before",
                                       "accuracy after", "confidence after"], rows) + "</details>")

    def _choices_html(self) -> str:
        parts = []
        if self.decisions:
            rows = [[d.get("field", ""), d.get("value", ""), d.get("why", "")] for d in self.decisions]
            parts.append(f'<details open style="color:{S.MUTED_COLOR}"><summary>chosen from the data '
                         f"({len(rows)})</summary>" + S.table_html(["setting", "value", "why"], rows) + "</details>")
        cut = truncation_text(self.truncation)
        if cut:
            parts.append(S.message(cut, "muted"))
        return "".join(parts)

    def close(self) -> None:
        self._poller.stop()
        if self.extend is not None:
            self.extend.close()
        super().close()

