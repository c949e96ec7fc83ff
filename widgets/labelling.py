"""LabellingWidget: label the texts a run suggests, one click (or key) each, straight into the dataset file.

The widget asks `workbench.active.suggest` for the pool texts the run is least sure of (spread over clusters
of similar texts; the strategy is named above the text), shows them one at a time with one button per class,
"skip" and "undo", and appends every answer to the dataset file at once (`append_labels`: atomic, the file's
own encoding and columns), so a reload or a crash loses nothing. Undo removes the last row labelling
appended (`remove_last`, from the journal beside the file: it works after a reload too).

Keys (`KeyListener`, an anywidget: ipywidgets has no key events): 1..9 answer with the n-th class, s skips,
u or Backspace undoes. They are heard while the widget is on screen, and never while the cursor is in a text
box, so typing elsewhere is left alone.

"Train again" launches a new run (its own process: a reload does not stop it) with the run's config on the
grown file. When the config has `train.init_from` (continual learning), the new run starts from the shown
run's weights, with no replay (the grown file holds the old rows); otherwise it trains from the base model.
When it completes, its suggestions follow.

The dataset file is `dataset_path`, else the run's own data file (data.source) when it is CSV, TSV or JSONL.
With `uploads=True` (the dashboard), the pool and the dataset are chosen from the workspace's uploads
(<home>/uploads); `run_id` can follow another widget's (`traitlets.dlink`), and suggestions wait until that
run has completed. The plot shows the runs trained on this file (labels against
their macro-F1, each on its own eval split) and, when a learning curve was measured for the file
(`workbench.active.learning_curve(..., out=curve_file(dataset))`), the suggested and random curves.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets as W
import plotly.graph_objects as go
import traitlets as T

from workbench.active import STRATEGIES, append_labels, appended_rows, curve_file, remove_last, suggest
from workbench.config import Config, TrainConfig
from workbench.errors import WorkbenchError
from workbench.store import FINAL_STATUSES, RunStore

from . import _style as S
from ._background import Poller, run_job
from ._figure import LiveFigure

KEYS_JS = """\
// Keys for the labelling widget: 1..9, s, u, Backspace, sent to Python while the widget is on screen.
export default {
  render({ model, el }) {
    el.textContent = model.get("hint");
    el.style.color = "var(--jp-ui-font-color2, #757575)";
    el.style.fontSize = "smaller";
    const typing = (t) => t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName));
    const onKey = (event) => {
      if (!model.get("enabled") || typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;
      if (!el.isConnected || el.offsetParent === null) return;  // a hidden tab, a closed view
      const key = event.key;
      if (/^[1-9]$/.test(key) || ["s", "u", "Backspace"].includes(key)) {
        event.preventDefault();
        model.send({ key });
      }
    };
    document.addEventListener("keydown", onKey);
    model.on("change:hint", () => { el.textContent = model.get("hint"); });
    return () => document.removeEventListener("keydown", onKey);
  },
};
"""
ACTIONS = {"s": "skip", "u": "undo", "Backspace": "undo"}
RUN_COLOR, SUGGESTED_COLOR, RANDOM_COLOR = "#1f77b4", "#2ca02c", "#7f7f7f"
POOL_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt")
DATASET_EXTENSIONS = (".csv", ".tsv", ".jsonl")
RUN_DATA = "(the run's data file)"


class KeyListener(anywidget.AnyWidget):
    """Sends the keys 1..9, s, u and Backspace pressed while it is on screen (as {"key": ...} messages)."""

    _esm = KEYS_JS
    enabled = T.Bool(True, help="keys are sent").tag(sync=True)
    hint = T.Unicode("", help="the line it shows").tag(sync=True)


class LabellingWidget(W.VBox):
    """Label `run`'s suggested texts from `pool` into `dataset_path`, then train again."""

    run_id = T.Unicode("", help="the run whose suggestions are shown")
    strategy = T.Enum(list(STRATEGIES), default_value="balanced-density", help="how texts are picked")
    pool_file = T.Unicode("", help="the file of unlabelled texts ('' : the list given, or none)")
    dataset_file = T.Unicode("", help="the file answers are appended to ('' : the run's data file)")
    labels = T.List(T.Unicode(), help="the run's classes, one button each")
    suggestions = T.List(T.Dict(), help="the suggested rows (workbench.active.suggest), most useful first")
    position = T.Int(0, help="the suggestion shown (== len(suggestions): done)")
    answered = T.Int(0, help="labels given in this widget")
    appended = T.Int(0, help="rows labelling appended to the file that undo can remove")
    training_run = T.Unicode("", help="the run `Train again` started, while it trains")
    busy = T.Unicode("", help="what is being computed ('' when idle)")
    error = T.Unicode("")

    def __init__(self, run: str | None = "latest", pool: str | Path | list[str] = (), dataset_path: str | Path = "",
                 home: str | Path | None = None, n: int = 20, strategy: str = "balanced-density",
                 text_column: str | None = None, label_column: str | None = None, background: bool = True,
                 store: RunStore | None = None, uploads: bool = False, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self._pool_texts = None if isinstance(pool, (str, Path)) else [str(t) for t in pool]
        self.n, self.text_column, self.label_column, self.background = n, text_column, label_column, background
        self._run_data: Path | None = None  # the shown run's own data file, when labels can be appended to it
        self._poller: Poller | None = None
        self._title = W.HTML(layout=S.full_width())
        self._text = W.HTML(layout=S.full_width(padding="8px", border=S.BORDER))
        self._info = W.HTML(layout=S.full_width())
        self._classes = W.Box(layout=S.wrap_row())
        self._skip = W.Button(description="skip", tooltip="skip this text (s)", layout=W.Layout(width="auto"))
        self._undo = W.Button(description="undo", icon="undo", tooltip="remove the last label (u, Backspace)",
                              layout=W.Layout(width="auto"))
        self._more = W.Button(description="Suggest more", icon="lightbulb-o", layout=W.Layout(width="auto"))
        self._train = W.Button(description="Train again", icon="play", button_style="primary",
                               layout=W.Layout(width="auto"))
        self.key_listener = KeyListener()
        self._counter = W.HTML()
        self._error_html = S.inline_error()
        self.fig = _curve_figure()
        self._files = self._file_choosers() if uploads else None
        super().__init__(children=[
            *([self._files] if self._files is not None else []), self._title, self._text, self._info, self._classes,
            W.Box([self._skip, self._undo, self._more, self._train, self._counter], layout=S.wrap_row()),
            self.key_listener, self._error_html, self.fig], **{"layout": S.full_width(), **kwargs})
        self._wire()
        self.strategy = strategy
        self.pool_file = str(pool) if isinstance(pool, (str, Path)) else ""
        self.dataset_file = str(Path(dataset_path).expanduser()) if dataset_path else ""
        if self._files is not None:
            self.list_files()
        if run is None:
            return
        try:
            self.run_id = self.store.resolve(run)
        except WorkbenchError as exc:
            self.error = str(exc).splitlines()[0]
        self._count_appended()
        self.draw_curve()

    # --- wiring -------------------------------------------------------------------------------------
    def _wire(self) -> None:
        self._skip.on_click(lambda _: self.skip())
        self._undo.on_click(lambda _: self.undo())
        self._more.on_click(lambda _: self.refresh_suggestions())
        self._train.on_click(lambda _: self.train_again())
        self.key_listener.on_msg(lambda _, content, buffers: self.press(str((content or {}).get("key", ""))))
        self.observe(self._on_run, names="run_id")
        self.observe(lambda c: self.refresh(), names=["pool_file", "dataset_file"])
        self.observe(lambda c: self._draw(), names=["suggestions", "position", "labels", "busy", "answered",
                                                     "appended", "training_run"])
        self.observe(lambda c: setattr(self._error_html, "value", S.message(self.error)), names="error")
        W.dlink((self, "busy"), (self.key_listener, "enabled"), transform=lambda busy: not busy)

    # --- public -------------------------------------------------------------------------------------
    def press(self, key: str) -> None:
        """A key: 1..9 answers with that class, s skips, u or Backspace undoes; others are ignored."""
        if key.isdigit() and 1 <= int(key) <= len(self.labels):
            self.answer(self.labels[int(key) - 1])
        elif ACTIONS.get(key) == "skip":
            self.skip()
        elif ACTIONS.get(key) == "undo":
            self.undo()

    def answer(self, label: str) -> None:
        """Append the shown text with `label` to the dataset file (at once, atomically) and show the next."""
        row = self.current
        if row is None or self.busy:
            return
        if label not in self.labels:  # a comm message may carry anything
            self.error = f"label {label!r} is not one of the run's classes ({', '.join(self.labels)})"
            return
        if self.dataset_path is None:
            self.error = "no dataset file: give dataset_path, the CSV/TSV/JSONL file the labels are added to"
            return
        try:
            append_labels(self.dataset_path, [{"text": row["text"], "label": label}], self.text_column,
                          self.label_column)
        except (WorkbenchError, OSError) as exc:
            self.error = self._file_error(exc)
            return
        self.error = ""
        self.answered += 1
        self._count_appended()
        self.position += 1

    def _file_error(self, exc: Exception) -> str:
        """One inline line for a refused or failed write to the dataset file."""
        if isinstance(exc, WorkbenchError):
            return str(exc).splitlines()[0]
        return f"could not write {self.dataset_path.name} ({type(exc).__name__}: {exc})".splitlines()[0]

    def skip(self) -> None:
        """Show the next suggestion without labelling this one."""
        if self.current is not None and not self.busy:
            self.error = ""
            self.position += 1

    def undo(self) -> None:
        """Remove the last row labelling appended to the file; show its text again when it is in this batch."""
        if self.dataset_path is None or self.busy:
            return
        try:
            removed = remove_last(self.dataset_path, 1)[0]
        except (WorkbenchError, OSError) as exc:
            self.error = self._file_error(exc)
            return
        self.error = ""
        self.answered = max(0, self.answered - 1)
        self._count_appended()
        back = [i for i, r in enumerate(self.suggestions[: self.position]) if r["text"] == removed["text"]]
        if back:
            self.position = back[-1]

    @property
    def dataset_path(self) -> Path | None:
        """The file answers go to: `dataset_file`, else the run's own data file (CSV, TSV, JSONL)."""
        return Path(self.dataset_file) if self.dataset_file else self._run_data

    @property
    def pool(self) -> str | list[str] | None:
        """The unlabelled texts: the pool file, else the list given, else None."""
        return self.pool_file or self._pool_texts

    @property
    def current(self) -> dict[str, Any] | None:
        """The suggestion shown, or None when there is none left."""
        return self.suggestions[self.position] if 0 <= self.position < len(self.suggestions) else None

    def refresh_suggestions(self) -> None:
        """Ask the run for a new batch (texts labelled meanwhile are left out), on a worker thread."""
        if not self.run_id or self.busy:
            return
        if not self.pool:
            self.suggestions, self.error = [], "no pool: choose a file of unlabelled texts"
            return
        self.busy, self.error = "finding the texts most useful to label ...", ""
        run_job(lambda: self._suggest_now(self.run_id), sync=not self.background, name="labelling-suggest")

    def train_again(self) -> None:
        """Start a new run with the shown run's config on the grown dataset file (its own process)."""
        if self.training_run:
            self.error = f"run {self.training_run} is training: wait for it to finish"
            return
        if self.busy:
            return
        if not self.run_id or self.dataset_path is None:
            self.error = "no run or no dataset file to train on"
            return
        try:
            config, continued = self.next_config()
            from workbench.launch import launch

            handle = launch(config, self.store.home)
        except WorkbenchError as exc:
            self.error = str(exc).splitlines()[0]
            return
        except Exception as exc:  # words, never a traceback
            self.error = f"could not start the run ({type(exc).__name__}: {exc})".splitlines()[0]
            return
        self.error = ""
        self.training_run = handle.id
        start = (f"from run {self.run_id}'s weights" if continued
                 else "from the base model (this version has no train.init_from)")
        self._info.value = S.message(f"run {handle.id} started on {self.dataset_path.name}, {start}", "ok")
        self._poller = Poller(self._poll_training, 2.0, name="labelling-train")
        if self.background:
            self._poller.start()

    def list_files(self) -> list[str]:
        """The workspace's uploads (newest first), offered as the pool and the dataset."""
        folder = self.store.home / "uploads"
        files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in POOL_EXTENSIONS),
                       key=lambda p: -p.stat().st_mtime) if folder.is_dir() else []
        if self._files is not None:
            pool, dataset = self._files.children[0].children[:2]
            pool.options = [("(choose a pool file)", "")] + [(p.name, str(p)) for p in files]
            dataset.options = [(RUN_DATA, "")] + [(p.name, str(p)) for p in files
                                                   if p.suffix.lower() in DATASET_EXTENSIONS]
        return [str(p) for p in files]

    def next_config(self) -> tuple[Config, bool]:
        """The config "Train again" launches, and whether it starts from the shown run's weights."""
        record = self.store.get(self.run_id)
        raw = json.loads(json.dumps(record["config"]))
        raw.setdefault("data", {})["source"] = str(self.dataset_path)
        if self.text_column:
            raw["data"]["text_column"] = self.text_column
        if self.label_column:
            raw["data"]["label_column"] = self.label_column
        raw["name"] = f"{(record.get('name') or 'labelled')}"[:60]
        continued = "init_from" in {f.name for f in dataclasses.fields(TrainConfig)}
        train = raw.setdefault("train", {})
        for key in ("init_from", "replay"):
            train.pop(key, None)
        if continued:
            train.update({"init_from": record["id"], "replay": 0.0})  # the grown file holds the old rows
        return Config.from_dict(raw), continued

    def draw_curve(self) -> None:
        """Redraw the runs trained on the dataset file and the measured learning curve (whole arrays)."""
        runs = self._file_runs()
        curve = _read_curve(self.dataset_path)
        mine, suggested, random_ = self.fig.data
        with self.fig.batch_update():
            mine.x, mine.y = [r[0] for r in runs], [r[1] for r in runs]
            mine.customdata = [r[2] for r in runs]
            strategies = (curve or {}).get("strategies", {})
            smart = next((name for name in strategies if name != "random"), None)
            suggested.x = [p["labels"] for p in strategies.get(smart, [])]
            suggested.y = [p["f1_macro"] for p in strategies.get(smart, [])]
            suggested.name = f"measured: {smart}" if smart else "measured: suggestions"
            random_.x = [p["labels"] for p in strategies.get("random", [])]
            random_.y = [p["f1_macro"] for p in strategies.get("random", [])]

    # --- workers --------------------------------------------------------------------------------------
    def _suggest_now(self, run_id: str) -> None:
        try:
            from workbench.data import load_labelled

            exclude = load_labelled(str(self.dataset_path), self.text_column, self.label_column)[0] \
                if self.dataset_path is not None and self.dataset_path.is_file() else []
            rows = suggest(run_id, self.pool, self.n, self.store.home, strategy=self.strategy, exclude=exclude)
        except WorkbenchError as exc:
            rows, self.error = [], str(exc).splitlines()[0]
        except Exception as exc:  # words, never a traceback
            rows, self.error = [], f"could not suggest texts ({type(exc).__name__}: {exc})".splitlines()[0]
        if run_id == self.run_id:
            self.position, self.suggestions = 0, rows
        self.busy = ""

    def _poll_training(self) -> bool:
        """One look at the run `Train again` started; False when it has ended (the poller stops)."""
        run_id = self.training_run
        if not run_id:
            return False
        try:
            record = self.store.get(run_id)
        except WorkbenchError as exc:
            self.error, self.training_run = str(exc).splitlines()[0], ""
            return False
        if record["status"] not in FINAL_STATUSES:
            return True
        self.training_run = ""
        if record["status"] == "completed":
            self._info.value = S.message(f"run {run_id} completed: its suggestions follow", "ok")
            self.run_id = run_id
        else:
            self.error = f"run {run_id} ended {record['status']}: {(record.get('error') or '').splitlines()[:1]}"
        self.draw_curve()
        return False

    # --- reading and drawing --------------------------------------------------------------------------
    def _on_run(self, change: Any = None) -> None:
        self.position, self.suggestions = 0, []
        self.refresh()

    def refresh(self) -> None:
        """Re-read the run (its classes; suggestions once it has completed), the undo count and the plot."""
        record = None
        if self.run_id:
            try:
                record = self.store.get(self.run_id)
            except WorkbenchError as exc:
                self.error = str(exc).splitlines()[0]
        if record is not None:
            source = str(((record.get("config") or {}).get("data") or {}).get("source") or "")
            self._run_data = Path(source).expanduser() if source.lower().endswith(DATASET_EXTENSIONS) else None
            labels = [str(x) for x in ((record.get("info") or {}).get("labels")
                                       or (record.get("metrics") or {}).get("labels") or [])]
            if labels != self.labels or not self._classes.children:
                self.labels = labels
                self._classes.children = [self._class_button(i, name) for i, name in enumerate(labels)]
        self._count_appended()
        self.draw_curve()
        if record is None:
            return
        if record["status"] != "completed":
            self.position, self.suggestions = 0, []
            self._info.value = S.message(f"run {self.run_id} is {record['status']}: suggestions come from a "
                                         "completed classification run", "muted")
            return
        self.refresh_suggestions()

    def _file_choosers(self) -> W.VBox:
        pool = W.Dropdown(options=[], description="Pool", style=S.label_style(), layout=S.control_layout(),
                          tooltip="unlabelled texts: a table with a text column, or one text per line")
        dataset = W.Dropdown(options=[], description="Add labels to", style=S.label_style(),
                             layout=S.control_layout())
        refresh = W.Button(description="", icon="refresh", tooltip="list the uploaded files again",
                           layout=W.Layout(width="auto"))
        refresh.on_click(lambda _: self.list_files())
        W.dlink((pool, "value"), (self, "pool_file"), transform=lambda v: v or "")
        W.dlink((dataset, "value"), (self, "dataset_file"), transform=lambda v: v or "")
        return W.VBox([W.Box([pool, dataset, refresh], layout=S.wrap_row())], layout=S.full_width())

    def _class_button(self, i: int, name: str) -> W.Button:
        key = f" ({i + 1})" if i < 9 else ""
        button = W.Button(description=f"{name}{key}", tooltip=f"label the text {name!r}",
                          layout=W.Layout(width="auto"))
        button.on_click(lambda _: self.answer(name))
        return button

    def _count_appended(self) -> None:
        try:
            self.appended = len(appended_rows(self.dataset_path)) if self.dataset_path is not None else 0
        except OSError:
            self.appended = 0

    def _draw(self) -> None:
        spec = STRATEGIES[self.strategy]
        self._title.value = S.message(f"run {self.run_id or '-'}: suggested by {spec.name} ({spec.title})", "muted")
        row = self.current
        if self.busy:
            self._text.value = S.message(self.busy, "muted")
        elif row is None:
            self._text.value = S.message("no suggestion to label: press Suggest more, or Train again on the grown "
                                         "file" if self.suggestions else "no suggestions yet", "muted")
        else:
            self._text.value = f'<div style="white-space:pre-wrap">{html.escape(row["text"])}</div>'
        if row is not None and not self.busy:
            self._info.value = S.message(f"the run says {row['predicted']} (margin {row['margin']:.2f} between the "
                                         f"top two classes; pool row {row['index']})", "muted")
        waiting = bool(self.busy) or row is None
        for button in (*self._classes.children, self._skip):
            button.disabled = waiting
        self._undo.disabled = bool(self.busy) or self.appended == 0
        self._train.disabled = bool(self.training_run)
        self._more.disabled = bool(self.busy)
        shown = min(self.position + 1, len(self.suggestions))
        self._counter.value = S.message(f"{shown} of {len(self.suggestions)} · {self.answered} labelled here · "
                                        f"{self.appended} can be undone", "muted")
        self.key_listener.hint = (f"keys: 1-{min(len(self.labels), 9)} answer, s skip, u or Backspace undo"
                          if self.labels else "")

    def _file_runs(self) -> list[tuple[int, float, str]]:
        """(training rows, macro-F1, run id) of the completed runs trained on the dataset file, by size."""
        if self.dataset_path is None:
            return []
        target = str(self.dataset_path.resolve())
        out = []
        for record in self.store.list():
            source = ((record.get("config") or {}).get("data") or {}).get("source") or ""
            metrics, info = record.get("metrics") or {}, record.get("info") or {}
            if record["status"] != "completed" or "f1_macro" not in metrics or not source:
                continue
            if str(Path(source).expanduser().resolve()) == target:
                out.append((int(info.get("train_rows") or 0), float(metrics["f1_macro"]), record["id"]))
        return sorted(out)


def _read_curve(dataset_path: Path | None) -> dict[str, Any] | None:
    if dataset_path is None:
        return None
    path = curve_file(dataset_path)
    try:
        curve = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return curve if isinstance(curve, dict) else None


def _curve_figure() -> LiveFigure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="runs on this file (own eval split)",
                             marker={"color": RUN_COLOR}, customdata=[],
                             hovertemplate="%{x} rows: macro-F1 %{y:.3f}<br>run %{customdata}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="measured: suggestions",
                             line={"color": SUGGESTED_COLOR}))
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="measured: random",
                             line={"color": RANDOM_COLOR, "dash": "dot"}))
    fig.update_layout(**S.figure_layout(height=300, margin={"l": 50, "r": 10, "t": 30, "b": 40}),
                      xaxis_title="labels", yaxis_title="macro-F1")
    return LiveFigure(fig)
