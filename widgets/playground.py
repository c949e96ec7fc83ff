"""Playground: type text, see what a trained run answers; or upload a labelled test file and score the run on it
beside its classical baseline (`workbench.evaluate.evaluate_file`, on a worker thread).

What the answer looks like follows the run's task row (`workbench.task_table`, its `view`): the label and its
scores (a confusion view), the predicted number (regression), or the typed text with each entity marked by its
type (entities). Runs that generate text answer in the ChatPlayground. Under an answer, Explain colours each
word by how much it pushed that answer (`workbench.explain`, shown by an ExplainView).
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ipywidgets as W
import traitlets as T

from workbench import WorkbenchError
from workbench.run_paths import RunPaths
from workbench.store import RunStore
from workbench.task_table import DEFAULT_TASK, TASKS

from . import _style as S
from ._background import run_job
from .data_panel import MAX_UPLOAD_BYTES, UPLOAD_EXTENSIONS, save_upload, uploaded_file
from .entities import marked_html
from .explain_view import ExplainView

MAX_TEXT_CHARS = 10_000
CACHED_PREDICTORS = 3  # models kept in memory, least recently used dropped first
WORDS = {  # by the run's view: (the text box's placeholder, what a test file holds)
    "confusion": ("Type or paste a text to classify", "with a text and a label column, rows the run never saw: the "
                  "run's answer and its classical baseline are scored on it"),
    "regression": ("Type or paste a text to score", "with a text and a number column, rows the run never saw: "
                   "the run is scored on it"),
    "entities": ("Type or paste a sentence to find its named entities", "of sentences as tokens with a BIO tag "
                 "each (JSONL or Parquet: a tokens and a tags column), sentences the run never saw: its entity "
                 "F1 per type is measured on them"),
}
FIGURE_TITLES = {"f1_macro": "macro-F1", "f1": "entity F1", "rmse": "RMSE", "mae": "MAE", "r2": "R2",
                 "spearman": "Spearman"}  # a figure's words in the run list and the scores table (else its name)


def task_of(record: dict[str, Any]) -> Any:
    """A run record's task row (the default task's for a record without one)."""
    name = (record.get("config") or {}).get("task", DEFAULT_TASK)
    return TASKS.get(name)


def answers_here(record: dict[str, Any]) -> bool:
    """Whether the Playground answers with this run: a task that does not generate, and a trained model."""
    spec = task_of(record)
    return spec is not None and not spec.generates and RunPaths.of(record).trainable.is_file()


class Playground(W.VBox):
    """Predict with a run's best weights; the predictor of each run is loaded once and cached."""

    run_id = T.Unicode("", help="the run whose model predicts")
    runs = T.List(T.Unicode(), help="runs with a trained model")
    text = T.Unicode("", help="the text to classify")
    view = T.Unicode("confusion", help="the chosen run's view (its task row): how an answer is shown")
    result = T.Dict(allow_none=True, default_value=None, help="the predictor's answer for the text, with the run_id: "
                    "{'label', 'scores'}, {'value'} or {'entities': [{type, start, end, text, score}], ...}")
    error = T.Unicode("")
    busy = T.Bool(False)
    test_file = T.Unicode("", help="the labelled file the run was last scored on")
    evaluation = T.Dict(allow_none=True, default_value=None, help="evaluate_file's result for test_file")
    evaluation_error = T.Unicode("", help="why the file could not be scored (one line)")
    evaluating = T.Bool(False)
    explanation = T.Dict(allow_none=True, default_value=None, help="explain_predictor's answer for the shown "
                         "result's text (one attribution per word), with the run_id")
    explaining = T.Bool(False)

    def __init__(self, home: str | Path | None = None, background: bool = True, store: RunStore | None = None,
                 uploads: bool = True, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._predictors: OrderedDict[str, Any] = OrderedDict()
        self._views: dict[str, str] = {}
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
        self._explain = W.Button(description="Explain", icon="search", tooltip="colour each word by how much it "
                                 "pushed this answer", layout=W.Layout(width="auto", display="none"))
        self._explain.on_click(lambda _: self.explain())
        self.explain_view = ExplainView()
        self._error_html = S.inline_error()
        self._evaluation_html = W.HTML("", layout=S.full_width())
        self._upload: W.FileUpload | None = None  # none on a read-only page: nothing to upload to
        self._upload_hint = W.HTML("", layout=S.full_width())
        children = [self._run, self._text, W.Box([self._predict, refresh], layout=S.wrap_row()),
                    self._error_html, self._output, self._explain, self.explain_view]
        if uploads:
            self._upload = W.FileUpload(accept=",".join(UPLOAD_EXTENSIONS), multiple=False,
                                        description="Test file", layout=W.Layout(width="auto"))
            self._upload.observe(self._on_upload, names="value")
            children += [S.section("Score the run on a labelled test file"), self._upload_hint,
                         self._upload, self._evaluation_html]
        super().__init__(children=children, **{"layout": S.full_width(), **kwargs})
        self.observe(self._show_evaluation, names=["evaluation", "evaluation_error", "evaluating"])
        self._run.observe(self._on_run_control, names="value")
        self._text.observe(self._on_text_control, names="value")
        self.observe(self._show_error, names="error")
        self.observe(self._show_result, names="result")
        self.observe(self._show_explanation, names="explanation")
        self.observe(self._on_run, names="run_id")
        self.observe(self._show_view, names="view")
        self._show_view()
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
        """Find the runs that have a trained model and answer a text (chat and seq2seq runs have their own)."""
        try:
            records = self.store.list()
        except Exception as exc:
            self.error = f"could not read the runs ({type(exc).__name__}: {exc})"
            return
        ready = [r for r in records if answers_here(r)]
        self._views = {r["id"]: task_of(r).view for r in ready}
        self.runs = [r["id"] for r in ready]
        self._run.options = [(run_label(r), r["id"]) for r in ready]
        if self.run_id not in self.runs:
            self.run_id = self.runs[0] if self.runs else ""
        self._run.value = self.run_id or None
        self.view = self._views.get(self.run_id, "confusion")

    def predict(self, text: str | None = None) -> threading.Thread | None:
        """Classify `text` (default: the text box); the result lands in `result` (on a worker thread, which is
        returned: `.join()` it to wait for the answer; None when the answer came inline or was refused)."""
        if text is not None:
            self.text = text
        content = self.text
        if not self.run_id:
            self.error = "no run with a trained model yet: train one, then press Refresh runs"
            return None
        if not content.strip():
            self.error = "type a text to classify"
            return None
        if len(content) > MAX_TEXT_CHARS:
            self.error = f"the text is {len(content):,} characters: at most {MAX_TEXT_CHARS:,}"
            return None
        run_id = self.run_id
        self.error, self.busy = "", True
        self._predict.disabled = True
        self._output.value = S.message("predicting ..." if run_id in self._predictors else
                                       f"loading the model of run {run_id} ...", "muted")
        return run_job(lambda: self._predict_now(run_id, content), sync=not self.background, name="playground-predict")

    def explain(self) -> threading.Thread | None:
        """Attribute the shown answer to the words of its text (on a worker thread, returned; None when
        refused): the result lands in `explanation`, a failure in the explain view's error line."""
        result = self.result or {}
        text, run_id = result.get("text"), result.get("run_id")
        if not isinstance(text, str) or not run_id:
            self.explain_view.error = "predict first: Explain colours the words of the shown answer's text"
            return None
        if self.explaining:
            self.explain_view.error = "an explanation is being computed: wait for it to finish"
            return None
        self.explaining, self.explain_view.error = True, ""
        self._explain.disabled = True
        return run_job(lambda: self._explain_now(run_id, text), sync=not self.background, name="playground-explain")

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

    def evaluate(self, source: str | Path) -> None:
        """Score the chosen run on a labelled file (`evaluate_file`, on a worker thread): `evaluation`, or
        `evaluation_error` in one line."""
        if self.evaluating:
            self.evaluation_error = "a file is being scored: wait for it to finish"
            return
        if not self.run_id:
            self.evaluation_error = "no run with a trained model yet: train one, then press Refresh runs"
            return
        run_id = self.run_id
        self.test_file, self.evaluation, self.evaluation_error, self.evaluating = str(source), None, "", True
        run_job(lambda: self._evaluate_now(run_id, str(source)), sync=not self.background, name="playground-evaluate")

    def _on_upload(self, change: dict[str, Any]) -> None:
        if not change["new"]:
            return  # cleared
        try:
            path = save_upload(self.store.home, *uploaded_file(change["new"]))
        except WorkbenchError as exc:
            self.evaluation, self.evaluation_error = None, one_line(str(exc))
            return
        finally:
            self._upload.value = ()  # free the bytes held by the widget
        self.evaluate(path)

    def _evaluate_now(self, run_id: str, source: str) -> None:
        from workbench.evaluate import evaluate_file

        try:
            self.evaluation = evaluate_file(run_id, source, self.store.home)
        except WorkbenchError as exc:
            self.evaluation_error = one_line(str(exc))
        except Exception as exc:  # words, never a traceback
            self.evaluation_error = one_line(f"could not score {Path(source).name} ({type(exc).__name__}: {exc})")
        finally:
            self.evaluating = False

    # --- worker ----------------------------------------------------------------------------------
    def _predict_now(self, run_id: str, text: str) -> None:
        try:
            out = dict(self.predictor(run_id).predict(text)[0])
            if isinstance(out.get("scores"), dict):
                out["scores"] = dict(out["scores"])
            self.result = {**out, "run_id": run_id}
        except WorkbenchError as exc:
            self.error, self.result = str(exc), None
        except Exception as exc:
            self.error, self.result = f"prediction failed ({type(exc).__name__}: {str(exc)[:300]})", None
        finally:
            self.busy = False
            self._predict.disabled = False

    def _explain_now(self, run_id: str, text: str) -> None:
        from workbench.explain import explain_predictor

        try:
            self.explanation = {**explain_predictor(self.predictor(run_id), [text])[0], "run_id": run_id}
        except WorkbenchError as exc:
            self.explanation, self.explain_view.error = None, one_line(str(exc))
        except Exception as exc:  # words, never a traceback
            self.explanation = None
            self.explain_view.error = one_line(f"explanation failed ({type(exc).__name__}: {exc})")
        finally:
            self.explaining = False
            self._explain.disabled = False

    # --- control <-> traits ---------------------------------------------------------------------
    def _on_run_control(self, change: dict[str, Any]) -> None:
        if change["new"] in self.runs:
            self.run_id = change["new"]

    def _on_text_control(self, change: dict[str, Any]) -> None:
        value = change["new"]
        self.text = value[:MAX_TEXT_CHARS + 1] if isinstance(value, str) else ""

    def _on_run(self, change: dict[str, Any]) -> None:
        self._run.value = change["new"] or None
        self.view = self._views.get(change["new"], "confusion")
        self.result = None

    def _show_error(self, change: Any = None) -> None:
        self._error_html.value = S.message(self.error)

    def _show_view(self, change: Any = None) -> None:
        """The words that depend on what the chosen run answers."""
        placeholder, test_file = WORDS.get(self.view, WORDS["confusion"])
        self._text.placeholder = placeholder
        self._upload_hint.value = S.message(f"one CSV, TSV, JSONL or Parquet file (up to {MAX_UPLOAD_BYTES >> 20} "
                                            f"MB) {test_file}", "muted")

    def _show_result(self, change: Any = None) -> None:
        self._output.value = result_html(self.result) if self.result else ""
        self._explain.layout.display = "" if self.result else "none"
        self.explanation, self.explain_view.error = None, ""

    def _show_explanation(self, change: Any = None) -> None:
        self.explain_view.explanation = self.explanation

    def _show_evaluation(self, change: Any = None) -> None:
        if self.evaluating:
            self._evaluation_html.value = S.message(f"scoring run {self.run_id} on {Path(self.test_file).name} ...",
                                                    "muted")
        elif self.evaluation_error:
            self._evaluation_html.value = S.message(self.evaluation_error)
        elif self.evaluation:
            self._evaluation_html.value = evaluation_html(self.evaluation, self.view)
        else:
            self._evaluation_html.value = ""


def run_label(record: dict[str, Any]) -> str:
    """A run in the list: its name, id, and its answer's first two figures (accuracy and macro-F1, entity F1 and
    precision, RMSE and MAE: the task row's)."""
    metrics = record.get("metrics") or {}
    answer = metrics.get("answers_with") if isinstance(metrics.get("answers_with"), dict) else metrics
    spec = task_of(record)
    keys = spec.metrics[:2] if spec is not None else ()
    figures = ", ".join(f"{FIGURE_TITLES.get(key, key)} {answer[key]:.3f}" for key in keys
                        if isinstance(answer.get(key), (int, float)))
    return f"{record.get('name') or record['id']} ({record['id']}{', ' + figures if figures else ''})"


def result_html(result: dict[str, Any]) -> str:
    """An answer as the page shows it: the text with its entities marked, the predicted value, or the label
    and a bar per label's score."""
    if isinstance(result.get("entities"), list):
        entities = [e for e in result["entities"] if isinstance(e, dict)]
        found = ", ".join(f"{e.get('type')} {e.get('text')!r} ({float(e.get('score') or 0):.2f})" for e in entities)
        marked = marked_html(str(result.get("text") or ""), entities)
        return (f'<div style="font-size:1.2em; margin:4px 0">{marked}</div>' + S.message(f"{len(entities)} entities" + (f": {found}" if found else ""), "muted"))
    if "value" in result and "label" not in result:
        value = float(result["value"])
        return f'<div style="font-size:1.2em; margin:4px 0">Predicted: <b>{value:.3f}</b></div>'
    scores = dict(sorted((result.get("scores") or {}).items(), key=lambda kv: -kv[1]))
    return (f'<div style="font-size:1.2em; margin:4px 0">Predicted: '
            f"<b>{html.escape(str(result.get('label')))}</b></div>" + S.bars_html(scores, fmt="{:.3f}"))


def one_line(text: str, limit: int = 400) -> str:
    first = (text.strip().splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def evaluation_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Who was scored on the file, with accuracy and macro-F1: the run's answer, the fine-tuned model alone
    (when an ensemble answers), the classical baseline."""
    def figures(f: dict[str, Any]) -> list[str]:
        return [f"{f['accuracy']:.3f}", f"{f['f1_macro']:.3f}"]

    rows = [[f"the run's answer ({result.get('answers_with', 'fine-tuned')})", *figures(result)]]
    if result.get("fine_tuned"):
        rows.append(["the fine-tuned model alone", *figures(result["fine_tuned"])])
    base = result.get("baseline")
    rows.append(["classical baseline", *figures(base)] if base else ["classical baseline", "-", "- (none: trained "
                                                                                              "with baseline off)"])
    return rows


def evaluation_html(result: dict[str, Any], view: str = "confusion") -> str:
    """The scores table, a plain sentence when the baseline wins, and the confusion matrix (rows: true label);
    for a run of the entities view, the entity figures, a row per type and the confusion over types."""
    if view == "entities":
        return entities_evaluation_html(result)
    if view != "confusion":
        figures = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return S.message(f"{result.get('rows')} rows of {Path(str(result.get('file', ''))).name}", "muted") + \
            S.table_html([FIGURE_TITLES.get(k, k) for k in figures], [list(figures.values())])
    head = S.message(f"{result.get('rows')} rows of {Path(str(result.get('file', ''))).name} (text column "
                     f"{result.get('text_column')!r}, label column {result.get('label_column')!r})", "muted")
    table = S.table_html(["", "accuracy", "macro-F1"], evaluation_rows(result))
    base = result.get("baseline") or {}
    behind = [k for k in ("accuracy", "f1_macro") if k in base and result[k] < base[k]]
    note = S.message(f"on this file the classical baseline scores higher on {' and '.join(behind)} than the "
                     "run's answer") if behind else ""
    labels = [str(x) for x in result.get("labels") or []]
    matrix = [[f"true {name}", *row] for name, row in zip(labels, result.get("confusion_matrix") or [])]
    confusion = S.table_html(["", *(f"predicted {n}" for n in labels)], matrix) if matrix else ""
    return head + table + note + S.message("confusion matrix of the run's answer", "muted") + confusion


def entities_evaluation_html(result: dict[str, Any]) -> str:
    """A named-entity run on a file of tagged sentences: entity F1, precision, recall and token accuracy, the
    figures per entity type, and the confusion over types (O: a missed or a spurious entity)."""
    head = S.message(f"{result.get('rows')} sentences of {Path(str(result.get('file', ''))).name} "
                     f"({result.get('scheme', '')} tags)", "muted")
    notes = "".join(S.message(str(n), "muted") for n in result.get("notes") or [])
    keys = [("entity F1", "f1"), ("precision", "precision"), ("recall", "recall"), ("token accuracy", "accuracy")]
    table = S.table_html([t for t, _ in keys], [[result.get(k) for _, k in keys]])
    per = result.get("per_type") or {}
    types = S.table_html(["entity type", "precision", "recall", "F1", "support"],
                         [[k, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
                          for k, v in per.items() if isinstance(v, dict)])
    labels = [str(x) for x in result.get("confusion_labels") or []]
    matrix = [[f"gold {name}", *row] for name, row in zip(labels, result.get("confusion_matrix") or [])]
    confusion = S.table_html(["", *(f"predicted {n}" for n in labels)], matrix) if matrix else ""
    return (head + notes + table + types + S.message("confusion over entity types (O: missed / spurious)", "muted")
            + confusion)
