"""ExtendRunPanel: continue a finished run on new data (continual learning) and show what it forgot.

The panel follows one run in the store (`run_id`, the run the Train & watch tab shows). For a completed run
of a task that continual learning covers (the task table's encoder tasks: classification and regression),
it offers a new data file (a path, one of the workspace's uploads, or an upload checked as the Data panel
checks it: type, size, quota), a replay share (`train.replay`, its default from the config) and "Extend run".

Extend builds the config with `to_config()`: the run's own config with `data.source` = the new file, the
columns the run read, `train.init_from` = the run and `train.replay` = the slider; the new data's eval split
is cut from the new file (`data.eval_source` is cleared). A worker thread checks the new file's columns and
runs `preflight`, then `workbench.launch.launch` starts the run in its own process, as the Train button
does: a reload or a kernel restart neither stops nor loses it. After a reload the panel finds the newest run
that extends the shown one and follows it again.

When that run ends, its record gives the figures: `metrics.forgetting` (the old run's eval split scored with
the weights it started from and with the new best weights: "accuracy 0.875 -> 0.844 (-0.031)") and the new
run's own figures on the new data's eval split. Bad input (no finished run, an unsupported task, a missing
file, other columns, other classes) is one inline line, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import ipywidgets as W
import traitlets as T

from workbench import Config, TrainConfig, WorkbenchError
from workbench.store import FINAL_STATUSES, RunStore
from workbench.task_table import DEFAULT_TASK, TASKS, task_spec, tasks_where

from . import _style as S
from ._background import Poller, run_job
from .data_panel import MAX_UPLOAD_BYTES, UPLOAD_EXTENSIONS, save_upload, uploaded_file

POLL_S = 1.0
REPLAY_MAX = 2.0  # the slider's end: twice as many old rows as new ones (the config allows more, from code)
_REPLAY_HELP = next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == "replay")


def extensions_of(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    """The runs started from `run_id`'s weights (config train.init_from), newest first."""
    return [r for r in store.list()
            if ((r.get("config") or {}).get("train") or {}).get("init_from") == run_id]


def figure_names(task: str, *figures: dict[str, Any] | None) -> list[str]:
    """The figures to show, in the task's order (its headline first), that any of `figures` holds."""
    held = [k for f in figures if f for k, v in f.items() if _number(v)]
    order = TASKS[task].metrics if task in TASKS else tuple(dict.fromkeys(held))  # a record of an unknown task
    return [k for k in order if k in held]


def forgetting_text(forgetting: dict[str, Any] | None, task: str) -> str:
    """"accuracy on run X's eval split: 0.875 -> 0.844 (-0.031)": the headline figure before and after."""
    if not forgetting:
        return ""
    before, after = forgetting.get("before") or {}, forgetting.get("after") or {}
    names = [k for k in figure_names(task, before) if _number(after.get(k))]
    if not names:
        return ""
    k = names[0]
    return (f"{k} on run {forgetting.get('run')}'s eval split: {before[k]:.3f} -> {after[k]:.3f} "
            f"({after[k] - before[k]:+.3f})")


def result_rows(forgetting: dict[str, Any] | None, new: dict[str, Any] | None, task: str) -> list[list[str]]:
    """The result table: the old eval split before, after and the change; the new data's eval split."""
    before = (forgetting or {}).get("before") or {}
    after = (forgetting or {}).get("after") or {}
    names = figure_names(task, before, after, new)
    rows = []
    if forgetting:
        old = forgetting.get("run", "")
        rows.append([f"run {old}'s eval split, before (its weights)", *(_cell(before, k) for k in names)])
        rows.append([f"run {old}'s eval split, after", *(_cell(after, k) for k in names)])
        rows.append(["change", *(f"{after[k] - before[k]:+.3f}" if _number(before.get(k)) and _number(after.get(k))
                                 else "" for k in names)])
    if new:
        rows.append(["the new data's eval split, after", *(_cell(new, k) for k in names)])
    return [["", *names], *rows] if rows else []


def _cell(figures: dict[str, Any], key: str) -> str:
    return f"{figures[key]:.3f}" if _number(figures.get(key)) else ""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


class ExtendRunPanel(W.VBox):
    """Extend `run_id` (a completed run) on the new data in `data_file`, replaying `replay` x its rows."""

    run_id = T.Unicode("", help="the finished run to extend (the run the dashboard shows)")
    run_status = T.Unicode("", help="that run's status as a viewer follows it (a change checks the run again)")
    data_file = T.Unicode("", help="the new data: a CSV, TSV, JSONL or Parquet path")
    replay = T.Float(TrainConfig.replay, help=_REPLAY_HELP)
    extension_id = T.Unicode("", help="the run Extend started, or the newest run that extends run_id")
    status = T.Unicode("", help="that run's status ('' : none)")
    checking = T.Bool(False, help="the new data is being checked before the run starts")
    step = T.Int(0)
    max_steps = T.Int(0)
    forgetting = T.Dict(allow_none=True, default_value=None,
                        help="that run's metrics.forgetting: the old eval split before and after")
    new_figures = T.Dict(allow_none=True, default_value=None, help="that run's figures on the new data's eval split")
    continued = T.Dict(allow_none=True, default_value=None, help="that run's info.continued: rows replayed and new")
    error = T.Unicode("")

    def __init__(self, home: str | Path | None = None, run_id: str = "", background: bool = True,
                 store: RunStore | None = None, **kwargs: Any) -> None:
        self.store = store or RunStore(home)
        self.background = background
        self._seq = 0
        self._poller = Poller(self._tick, POLL_S, name="extend-run-poll")
        self._title = W.HTML("", layout=S.full_width())
        self._file = W.Combobox(placeholder="a path, or pick an upload", description="New data",
                                ensure_option=False, style=S.label_style(), layout=S.control_layout())
        self._upload = W.FileUpload(accept=",".join(UPLOAD_EXTENSIONS), multiple=False, description="Upload",
                                    layout=W.Layout(width="auto"))
        self._replay = W.FloatSlider(min=0.0, max=REPLAY_MAX, step=0.05, description="Replay", readout_format=".2f",
                                     style=S.label_style(), layout=S.control_layout(), tooltip=_REPLAY_HELP)
        self._button = W.Button(description="Extend run", icon="forward", button_style="primary",
                                layout=W.Layout(width="auto"))
        self._hint = W.HTML(S.message(
            f"the same columns and classes as the run's data; one CSV, TSV, JSONL or Parquet file, up to "
            f"{MAX_UPLOAD_BYTES >> 20} MB. Replay: {_REPLAY_HELP}", "muted"), layout=S.full_width())
        self._bar = W.IntProgress(value=0, min=0, max=1, layout=S.full_width())
        self._progress = W.HTML("", layout=S.full_width())
        self._result = W.HTML("", layout=S.full_width())
        self._error_html = S.inline_error()
        super().__init__(children=[
            self._title, W.Box([self._file, self._upload, self._replay, self._button], layout=S.wrap_row()),
            self._hint, self._bar, self._progress, self._result, self._error_html],
            **{"layout": S.full_width(), **kwargs})
        self._wire()
        self.list_files()
        self._on_run()
        self._show()
        if run_id:
            self.run_id = run_id

    def _wire(self) -> None:
        W.link((self, "data_file"), (self._file, "value"))
        W.link((self, "replay"), (self._replay, "value"))
        self._upload.observe(self._on_upload, names="value")
        self._button.on_click(lambda _: self.extend())
        self.observe(self._on_run, names=["run_id", "run_status"])
        self.observe(lambda c: setattr(self._error_html, "value", S.message(self.error)), names="error")
        self.observe(self._show, names=["run_id", "extension_id", "status", "checking", "step", "max_steps",
                                        "forgetting", "new_figures", "continued"])

    # --- the config -----------------------------------------------------------------------------------
    def to_config(self) -> Config:
        """The run's config continued on `data_file`: init_from = the run, replay = the slider (WorkbenchError
        names what is missing: a finished run, a covered task, the file)."""
        record = self._extendable()
        path = self._new_data()
        raw = json.loads(json.dumps(record["config"]))
        data = raw.setdefault("data", {})
        info = record.get("info") or {}
        for column in task_spec(raw.get("task") or DEFAULT_TASK).columns:  # the columns the run read
            data[column] = data.get(column) or info.get(column)
        data.update({"source": str(path), "eval_source": None})
        raw.setdefault("train", {}).update({"init_from": record["id"], "replay": float(self.replay)})
        raw["name"] = f"{record.get('name') or record['id']} + {path.stem}"[:60]
        return Config.from_dict(raw)

    def _extendable(self) -> dict[str, Any]:
        """The shown run's record, when it is a completed run of a task continual learning covers."""
        if not self.run_id:
            raise WorkbenchError("no run chosen: train a run (or choose one) and extend it once it has completed")
        record = self.store.get(self.run_id)
        if record["status"] != "completed":
            raise WorkbenchError(f"run {self.run_id} is {record['status']}: only a completed run can be extended")
        task = (record.get("config") or {}).get("task") or DEFAULT_TASK
        covered = tasks_where(kind="encoder")
        if task not in covered:
            raise WorkbenchError(f"run {self.run_id} is a {task_spec(task).title.lower()} run: continual learning "
                                 f"covers {' and '.join(task_spec(t).title.lower() for t in covered)} runs; "
                                 "start a new run on the new data instead")
        return record

    def _new_data(self) -> Path:
        text = self.data_file.strip() if isinstance(self.data_file, str) else ""
        if not text or "\x00" in text:
            raise WorkbenchError("no new data: give the path of a CSV, TSV, JSONL or Parquet file, or upload one")
        path = Path(text).expanduser()
        if path.suffix.lower() not in UPLOAD_EXTENSIONS:
            raise WorkbenchError(f"{path.name[:80]!r} is not a data file: use {', '.join(UPLOAD_EXTENSIONS)}")
        if not path.is_file():
            raise WorkbenchError(f"new data {text[:200]!r} not found: check the path, or upload the file")
        return path.resolve()

    # --- control ---------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.checking or (bool(self.extension_id) and self.status not in FINAL_STATUSES)

    def extend(self) -> None:
        """Check the input, then (on a worker thread) the new file and preflight, and launch the run."""
        if self.active:
            self.error = f"run {self.extension_id or self.run_id} is still going: wait for it to finish"
            return
        try:
            config = self.to_config()
        except WorkbenchError as exc:
            self.error = str(exc).splitlines()[0]
            return
        self.error, self.checking = "", True
        self._button.disabled = True
        run_job(lambda: self._check_and_launch(config), sync=not self.background, name="extend-run-start")

    def _check_and_launch(self, config: Config) -> None:
        from workbench.launch import launch
        from workbench.loop import preflight

        handle = None
        try:
            check_columns(config, config.train.init_from)
            preflight(config, self.store.home)
            handle = launch(config, self.store.home)
        except WorkbenchError as exc:
            self.error = str(exc).splitlines()[0]
        except Exception as exc:  # words, never a traceback
            self.error = f"could not start the run ({type(exc).__name__}: {exc})".splitlines()[0][:400]
        if handle is not None:
            self.follow(handle.id)  # before `checking` ends: the button never reads idle in between
        self.checking = False
        self._button.disabled = self.active

    def follow(self, run_id: str) -> None:
        """Show the run `run_id` (an extension): its progress now, then follow it while it goes on."""
        self._seq = 0
        self.step = self.max_steps = 0
        self.forgetting = self.new_figures = self.continued = None
        self.extension_id = run_id
        if self.refresh() and self.background:
            self._poller.start()

    def refresh(self) -> bool:
        """Read the extension run's progress (and, once it has ended, its figures); True while it goes on."""
        run_id = self.extension_id
        if not run_id:
            return False
        try:
            record = self.store.get(run_id)
            points = self.store.points(run_id, after_seq=self._seq)
        except Exception as exc:  # a deleted run, a busy database: say so, keep the page
            self.error = f"lost track of run {run_id} ({type(exc).__name__}: {exc})".splitlines()[0]
            return False
        for p in points:
            self._seq = max(self._seq, p["seq"])
            if p["kind"] == "event" and p.get("event") == "train_begin":
                self.max_steps = int(p.get("max_steps") or self.max_steps)
            elif p["kind"] == "train":
                self.step = int(p["step"])
                self.max_steps = int(p.get("max_steps") or self.max_steps)
        self._absorb(record)
        going = record["status"] not in FINAL_STATUSES
        self._button.disabled = going
        return going

    def _absorb(self, record: dict[str, Any]) -> None:
        metrics, info = record.get("metrics") or {}, record.get("info") or {}
        task = (record.get("config") or {}).get("task") or DEFAULT_TASK
        found = metrics.get("forgetting")
        self.forgetting = found if isinstance(found, dict) else None
        names = task_spec(task).metrics
        self.new_figures = {k: metrics[k] for k in names if _number(metrics.get(k))} or None
        self.continued = info.get("continued") if isinstance(info.get("continued"), dict) else None
        if record["status"] == "failed":
            self.error = f"run {record['id']} failed: {(record.get('error') or 'see its log.txt').splitlines()[0]}"
        self.status = record["status"]

    def _tick(self) -> bool:
        try:
            return self.refresh()
        except Exception as exc:  # keep the page alive
            self.error = f"stopped following the run ({type(exc).__name__}: {exc})".splitlines()[0]
            return False

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> str:
        """Block until the extension run ends (scripts, tests); returns its status ('' : none started)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            going = self.refresh() if not self.background else self.active
            if not going and not self.checking:
                return self.status
            time.sleep(poll)
        return self.status

    # --- files -----------------------------------------------------------------------------------------
    def list_files(self) -> list[str]:
        """The workspace's uploads that can be new data (newest first), offered in the file box."""
        folder = self.store.home / "uploads"
        files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in UPLOAD_EXTENSIONS),
                       key=lambda p: -p.stat().st_mtime) if folder.is_dir() else []
        self._file.options = [str(p) for p in files]
        return self._file.options

    def _on_upload(self, change: dict[str, Any]) -> None:
        files = change["new"]
        if not files:
            return  # cleared
        try:
            path = save_upload(self.store.home, *uploaded_file(files))  # type, size and quota, as the Data panel
        except WorkbenchError as exc:
            self.error = str(exc).splitlines()[0]
            return
        finally:
            self._upload.value = ()  # free the bytes held by the widget
        self.error = ""
        self.list_files()
        self.data_file = str(path)

    # --- view ------------------------------------------------------------------------------------------
    def _on_run(self, change: Any = None) -> None:
        """A run is shown: say whether it can be extended, and follow its newest extension."""
        self._poller.stop()
        self.error, self.status, self.extension_id = "", "", ""
        self.forgetting = self.new_figures = self.continued = None
        self.step = self.max_steps = 0
        self._button.disabled = False
        self._title.value = S.message("no run chosen: a completed run can be extended on new data", "muted")
        if not self.run_id:
            return
        try:
            self._extendable()
            newest = extensions_of(self.store, self.run_id)
        except WorkbenchError as exc:
            self._title.value = S.message(str(exc).splitlines()[0], "muted")
            return
        self._title.value = S.message(f"continue run {self.run_id} from its weights on new data", "muted")
        if newest:
            self.follow(newest[0]["id"])

    def _show(self, change: Any = None) -> None:
        self._bar.max = max(self.max_steps, 1)
        self._bar.value = min(self.step, self._bar.max)
        self._bar.bar_style = {"completed": "success", "failed": "danger", "stopped": "warning"}.get(self.status, "")
        parts = ["checking the new data ..." if self.checking else "",
                 f"run {self.extension_id}" if self.extension_id else "", self.status]
        if self.max_steps:
            parts.append(f"step {self.step}/{self.max_steps}")
        if self.continued:
            parts.append(f"{self.continued.get('new_rows')} new training rows + {self.continued.get('replayed_rows')} "
                         f"of run {self.continued.get('from')}'s replayed (replay {self.continued.get('replay')})")
        self._progress.value = S.message(" | ".join(p for p in parts if p), "muted")
        self._result.value = self._result_html()

    def _result_html(self) -> str:
        if self.status != "completed" or not self.extension_id:
            return ""
        task = self._task_of(self.extension_id)
        rows = result_rows(self.forgetting, self.new_figures, task)
        headline = forgetting_text(self.forgetting, task)
        if not rows:
            return S.message(f"run {self.extension_id} completed without figures: see its log.txt", "muted")
        head = S.message(f"forgetting: {headline}" if headline else
                         "no forgetting figures: the run did not score the old eval split", "ok")
        return head + S.table_html(rows[0], rows[1:])

    def _task_of(self, run_id: str) -> str:
        try:
            return (self.store.get(run_id).get("config") or {}).get("task") or DEFAULT_TASK
        except WorkbenchError:
            return DEFAULT_TASK

    def close(self) -> None:
        self._poller.stop()
        super().close()


def check_columns(config: Config, run_id: str) -> None:
    """The new file holds the columns the run read (a WorkbenchError naming both sets, and the fix)."""
    from workbench.data import load_table

    wanted = {f: getattr(config.data, f) for f in config.task_spec.columns if getattr(config.data, f)}
    if not wanted:
        return
    columns = [str(c) for c in load_table(config.data.source)[0].columns]
    missing = [f"{v!r}" for v in wanted.values() if v not in columns]
    if missing:
        raise WorkbenchError(f"{Path(config.data.source).name} has columns {', '.join(columns) or 'none'}, not "
                             f"{' and '.join(missing)} as run {run_id}'s data: rename the new file's columns to "
                             "match, or extend the run with a file that has them")
