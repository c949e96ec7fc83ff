"""DataPanel: a catalog dataset or an uploaded file, its column mapping, a preview and the split settings.

How the data is read follows the chosen task's row (`workbench.task_table`): a label per text (its classes
counted), a number per text (their range and a histogram), or tagged sentences (a task of kind "tokens": CoNLL,
JSONL or Parquet sentences, their entities marked in the preview and counted per type).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import ipywidgets as W
import traitlets as T

from workbench import DataConfig, WorkbenchError
from workbench.catalog import DATASETS, DEFAULT_DATASET
from workbench.store import default_home
from workbench.task_table import DEFAULT_TASK, TASKS, task_spec

from . import _style as S
from ._background import run_job

UPLOAD_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")
# One upload travels as one websocket message: scripts/serve_dashboard.py sets the server's message limit to
# twice this, so a file somewhat over it still arrives and is refused here in words (tornado's default of
# 10 MiB would close the connection instead).
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
# A Parquet file declares its rows and sizes: a small file can expand to gigabytes in the kernel
MAX_UPLOAD_ROWS = 1_000_000
MAX_DECODED_BYTES = 256 * 1024 * 1024  # the table's text and numbers once decoded (dictionaries expanded)
# Per workspace (<home>/uploads): what all uploads together may hold
UPLOAD_QUOTA_BYTES = 500 * 1024 * 1024
MAX_UPLOAD_FILES = 200
PREVIEW_ROWS = 5
PREVIEW_CHARS = 160
MAX_BARS = 30
MODES = ("catalog", "file")
SENTENCES, TABLE = "sentences", "table"  # catalog dataset shapes: tagged sentences, or rows of columns


def shape_for(task: str) -> str:
    """The catalog dataset shape a task reads: tagged sentences for a tag per token, else a table."""
    return SENTENCES if task_spec(task).kind == "tokens" else TABLE


def reads_numbers(task: str) -> bool:
    """A number per text: an encoder task without classes (its label column holds the numbers)."""
    spec = task_spec(task)
    return spec.kind == "encoder" and not spec.classes


def catalog_choices(task: str) -> list[tuple[str, str]]:
    """The catalog datasets of the shape the task reads, as (description, name)."""
    shape = shape_for(task)
    return [(f"{n} - {a.description}", n) for n, a in DATASETS.items() if a.shape == shape]


def safe_filename(name: str) -> str:
    """A file name that cannot leave its directory: last path part only, [A-Za-z0-9._-], no leading dot."""
    base = re.split(r"[\\/]", unicodedata.normalize("NFKC", name))[-1]
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:80] or "upload"
    ext = re.sub(r"[^A-Za-z0-9]+", "", ext).lower()[:10]
    return f"{stem}.{ext}" if ext else stem


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An OS file lock on <folder>/.lock (released if the process dies)."""
    import fcntl

    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_parquet(source: str | Path | bytes, what: str) -> None:
    """Refuse a Parquet file that would not fit the kernel, before reading its table.

    Its metadata gives the row count and the uncompressed size of its pages; dictionary-encoded text can
    still expand far beyond that (one long string repeated on every row), so each row group is then read
    with its text kept as dictionaries (small) and the expanded length is summed from them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workbench.data import expanded_nbytes, is_bytes_type

    def open_file(**options: Any) -> Any:
        return pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source, **options)

    try:
        meta = open_file().metadata
        rows = meta.num_rows
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkbenchError(f"{what} could not be read as Parquet ({first[:200]}): check the format") from None
    limit = f"the limit is {MAX_UPLOAD_ROWS:,} rows and {MAX_DECODED_BYTES >> 20} MB decoded: sample it down first"
    if rows > MAX_UPLOAD_ROWS:
        raise WorkbenchError(f"{what} declares {rows:,} rows; {limit}")
    if declared > MAX_DECODED_BYTES:
        raise WorkbenchError(f"{what} declares {declared / 2**20:,.0f} MB of uncompressed data; {limit}")
    try:
        schema = open_file().schema_arrow
        text = [f.name for f in schema if is_bytes_type(f.type)]
        reader = open_file(read_dictionary=text)
        decoded = 0
        for i in range(meta.num_row_groups):
            for column in reader.read_row_group(i).columns:
                decoded += sum(expanded_nbytes(chunk) for chunk in column.chunks)  # without expanding
            if decoded > MAX_DECODED_BYTES:
                raise WorkbenchError(f"{what} expands to over {decoded / 2**20:,.0f} MB once decoded; {limit}")
    except WorkbenchError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkbenchError(f"{what} could not be read as Parquet ({first[:200]}): check the format") from None


def upload_usage(folder: Path) -> tuple[int, int]:
    """(bytes, files) held by an uploads folder."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")] if folder.is_dir() else []
    return sum(p.stat().st_size for p in files), len(files)


def uploaded_file(files: Any) -> tuple[Any, Any]:
    """(name, content) of the one file a FileUpload holds (any client may send any value: checked)."""
    item = files[0] if isinstance(files, (list, tuple)) and len(files) == 1 else None
    if not isinstance(item, dict):
        raise WorkbenchError("the upload arrived in an unexpected form: upload the file again")
    return item.get("name"), item.get("content")


def save_upload(home: Path, name: str, content: bytes) -> Path:
    """Check an uploaded file (type by extension, size, a Parquet file's declared rows and decoded size,
    the workspace's quota) and save it under <home>/uploads; returns its path."""
    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError("the upload has no file name: upload a .csv, .tsv, .jsonl or .parquet file")
    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise WorkbenchError(f"upload {name[:80]!r} arrived without its content: upload it again")
    data = bytes(content)
    safe = safe_filename(name)
    ext = Path(safe).suffix
    if ext not in UPLOAD_EXTENSIONS:
        raise WorkbenchError(f"upload {name[:80]!r} has an unsupported type {ext or '(none)'!r}: "
                             f"use {', '.join(UPLOAD_EXTENSIONS)}")
    if len(data) > MAX_UPLOAD_BYTES:
        raise WorkbenchError(f"upload {name[:80]!r} is {len(data) / 2**20:.1f} MB, over the "
                             f"{MAX_UPLOAD_BYTES >> 20} MB limit: sample it down first")
    if not data.strip():
        raise WorkbenchError(f"upload {name[:80]!r} is empty: it needs a header row and labelled rows")
    if ext == ".parquet":
        check_parquet(data, f"upload {name[:80]!r}")
    folder = (Path(home) / "uploads").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):  # two pages (two kernels) of one workspace: one quota
        target = (folder / safe).resolve()
        if target.exists() and target.read_bytes() == data:
            return target  # the same file again: nothing new to store
        if target.exists():  # never overwrite another upload of that name
            target = folder / f"{Path(safe).stem}-{hashlib.sha256(data).hexdigest()[:8]}{ext}"
            if target.exists():
                return target
        if target.parent != folder:
            raise WorkbenchError(f"upload name {name[:80]!r} is not allowed: rename the file")
        used, count = upload_usage(folder)
        if count >= MAX_UPLOAD_FILES or used + len(data) > UPLOAD_QUOTA_BYTES:
            raise WorkbenchError(
                f"upload {name[:80]!r} is refused: this workspace's uploads hold {count} files, "
                f"{used / 2**20:.0f} MB of the {UPLOAD_QUOTA_BYTES >> 20} MB / {MAX_UPLOAD_FILES} files allowed; "
                f"delete old uploads in {folder} first")
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(target)
    return target


class DataPanel(W.VBox):
    """Choose the labelled data; `to_config()` gives the `DataConfig`.

    Problems (unreadable file, missing column, a single class) land in `errors` (field -> words) and
    show next to the field. With `background=False` files are read inline (tests, scripts).
    """

    source = T.Unicode(DEFAULT_DATASET, help="catalog name, or the path of a data file")
    text_column = T.Unicode(None, allow_none=True)
    label_column = T.Unicode(None, allow_none=True)
    columns = T.List(T.Unicode(), help="the columns of the loaded table")
    eval_fraction = T.Float(DataConfig.eval_fraction, help="share held out for evaluation (checked by DataConfig)")
    max_train_samples = T.Int(None, allow_none=True)
    max_eval_samples = T.Int(None, allow_none=True)
    task = T.Unicode(DEFAULT_TASK, help="a task of the task table: how the data is read (a label per text, a "
                     "number per text, tagged sentences)")
    label_counts = T.Dict(help="rows per label in the label column (tagged sentences: entities per type)")
    value_range = T.Tuple(allow_none=True, default_value=None, help="a number per text: (min, mean, max) of them")
    num_labels = T.Int(2, help="distinct labels (tagged sentences: the head's tags; at least 2 for the estimate)")
    rows = T.Int(0, help="rows in the loaded table")
    errors = T.Dict(help="field -> message; empty when all is well")
    busy = T.Bool(False)

    def __init__(self, home: str | Path | None = None, background: bool = True, **kwargs: Any) -> None:
        self.home = Path(home).resolve() if home is not None else default_home()
        self.background = background
        self._df: Any = None
        self._detect_error: tuple[str, str] | None = None  # (field, message) from detect_columns
        self._base = DataConfig()  # fields without a control (eval_source) come from the last from_config
        self._load_lock = threading.Lock()
        self._wanted_columns: tuple[str | None, str | None] = (None, None)
        style = S.label_style()

        self._mode = W.ToggleButtons(options=[("Catalog", "catalog"), ("Upload a file", "file")], value="catalog",
                                     description="Data from", style={**style, "button_width": "auto"},
                                     layout=S.full_width())
        self._catalog = W.Dropdown(options=catalog_choices(self.task), value=DEFAULT_DATASET, description="Dataset",
                                   style=style,
                                   layout=S.full_width(max_width="48em"))
        self._upload = W.FileUpload(accept=",".join(UPLOAD_EXTENSIONS), multiple=False,
                                    description="Upload", layout=W.Layout(width="auto"))
        self._file_label = W.HTML("", layout=S.full_width())
        self._upload_hint = W.HTML(S.message(f"one CSV, TSV, JSONL or Parquet file, up to {MAX_UPLOAD_BYTES >> 20} MB "
                                             f"and {MAX_UPLOAD_ROWS:,} rows; one text column and one label column",
                                             "muted"))
        self._upload_box = W.VBox([W.HBox([self._upload, self._file_label], layout=S.wrap_row()),
                                   self._upload_hint], layout=S.full_width())
        self._source_error = S.inline_error()

        # full width of their column: control_layout's flex-basis (16em) would be a height in a VBox
        self._text = W.Dropdown(options=[], description="Text column", style=style, layout=S.full_width())
        self._label = W.Dropdown(options=[], description="Label column", style=style, layout=S.full_width())
        self._text_error, self._label_error = S.inline_error(), S.inline_error()
        self._columns_row = columns_row = W.Box([W.VBox([self._text, self._text_error], layout=S.control_layout()),
                             W.VBox([self._label, self._label_error], layout=S.control_layout())],
                            layout=S.wrap_row())

        self._fraction = W.FloatSlider(value=0.2, min=0.05, max=0.5, step=0.05, description="Eval fraction",
                                       readout_format=".2f", style=style, layout=S.control_layout())
        self._max_train = W.BoundedIntText(value=0, min=0, max=10**9, description="Max train rows",
                                           style=style, layout=S.control_layout())
        self._max_eval = W.BoundedIntText(value=0, min=0, max=10**9, description="Max eval rows",
                                          style=style, layout=S.control_layout())
        self._split_error = S.inline_error()
        split_row = W.Box([self._fraction, self._max_train, self._max_eval], layout=S.wrap_row())
        caps_hint = W.HTML(S.message("0 rows = use all rows", "muted"))

        self._summary = W.HTML("", layout=S.full_width())
        self._preview = W.HTML("", layout=S.full_width())
        self._bars = W.HTML("", layout=S.full_width())
        self._config_error = S.inline_error()
        self._columns_title, self._bars_title = S.section("Columns"), S.section("Label distribution")
        super().__init__(children=[
            self._mode, self._catalog, self._upload_box, self._source_error,
            self._columns_title, columns_row, self._summary, self._preview,
            self._bars_title, self._bars,
            S.section("Split"), split_row, caps_hint, self._split_error, self._config_error,
        ], **{"layout": S.full_width(), **kwargs})

        self._mode.observe(self._on_mode, names="value")
        self._catalog.observe(self._on_catalog, names="value")
        self._upload.observe(self._on_upload, names="value")
        self._text.observe(self._on_text_column, names="value")
        self._label.observe(self._on_label_column, names="value")
        self._fraction.observe(self._on_fraction, names="value")
        self._max_train.observe(self._on_caps, names="value")
        self._max_eval.observe(self._on_caps, names="value")
        self.observe(self._on_source, names="source")
        self.observe(self._on_task, names="task")
        self.observe(self._show_errors, names="errors")
        self.observe(self._on_columns_chosen, names=["text_column", "label_column"])
        self.observe(self._show_split, names=["eval_fraction", "max_train_samples", "max_eval_samples"])
        self._show_mode("catalog")
        self._on_source()

    # --- validation ---------------------------------------------------------------
    @T.validate("task")
    def _valid_task(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] not in TASKS:
            raise T.TraitError(f"task {proposal['value']!r} is unknown: choose from {', '.join(TASKS)}")
        return proposal["value"]

    @T.validate("source")
    def _valid_source(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"].strip()
        if not value or "\x00" in value:
            raise T.TraitError("the data source must be a catalog name or a file path")
        return value

    # --- the uploads directory ----------------------------------------------------------
    @property
    def upload_dir(self) -> Path:
        return self.home / "uploads"

    def upload_usage(self) -> tuple[int, int]:
        """(bytes, files) held by <home>/uploads."""
        return upload_usage(self.upload_dir)

    def save_upload(self, name: str, content: bytes) -> Path:
        """Check an uploaded file and save it under <home>/uploads (`save_upload`); returns its path."""
        return save_upload(self.home, name, content)

    def _on_upload(self, change: dict[str, Any]) -> None:
        files = change["new"]
        if not files:
            return  # cleared
        try:
            path = self.save_upload(*uploaded_file(files))
        except WorkbenchError as exc:
            self._set_error("source", str(exc))
            return
        finally:
            self._upload.value = ()  # free the bytes held by the widget
        self.source = str(path)

    # --- control -> traits ----------------------------------------------------------------
    def _on_mode(self, change: dict[str, Any]) -> None:
        if change["new"] not in MODES:
            return
        self._show_mode(change["new"])
        if change["new"] == "catalog" and self._catalog.value in DATASETS:
            self.source = self._catalog.value

    def _on_catalog(self, change: dict[str, Any]) -> None:
        if change["new"] in DATASETS and self._mode.value == "catalog":  # (new options also reset the value)
            self.source = change["new"]

    def _on_text_column(self, change: dict[str, Any]) -> None:
        if change["new"] in self.columns:
            self.text_column = change["new"]

    def _on_label_column(self, change: dict[str, Any]) -> None:
        if change["new"] in self.columns:
            self.label_column = change["new"]

    def _on_fraction(self, change: dict[str, Any]) -> None:
        try:
            self.eval_fraction = float(change["new"])
        except (T.TraitError, TypeError, ValueError) as exc:
            self._set_error("split", str(exc))

    def _on_caps(self, change: dict[str, Any]) -> None:
        def cap(value: Any) -> int | None:
            return int(value) if isinstance(value, int) and value > 0 else None

        self.max_train_samples = cap(self._max_train.value)
        self.max_eval_samples = cap(self._max_eval.value)

    # --- traits -> view ---------------------------------------------------------------------
    def _show_mode(self, mode: str) -> None:
        self._mode.value = mode
        self._catalog.layout.display = "" if mode == "catalog" else "none"
        self._upload_box.layout.display = "" if mode == "file" else "none"

    def _show_errors(self, change: Any = None) -> None:
        e = self.errors
        self._source_error.value = S.message(e.get("source", ""))
        self._text_error.value = S.message(e.get("text_column", ""))
        self._label_error.value = S.message(e.get("label_column", ""))
        self._split_error.value = S.message(e.get("split", ""))
        self._config_error.value = S.message(e.get("config", ""))

    def _show_split(self, change: Any = None) -> None:
        # widen the slider rather than clamp a config's value (a clamped slider would write it back)
        self._fraction.min = min(self._fraction.min, self.eval_fraction)
        self._fraction.max = max(self._fraction.max, self.eval_fraction)
        self._fraction.value = self.eval_fraction
        self._max_train.value = max(self.max_train_samples or 0, 0)
        self._max_eval.value = max(self.max_eval_samples or 0, 0)
        try:  # DataConfig says whether it accepts the split; the panel has no rule of its own
            dataclasses.replace(self._base, eval_fraction=float(self.eval_fraction),
                                max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples)
            self._set_error("split", "")
        except WorkbenchError as exc:
            self._set_error("split", str(exc))

    def _set_error(self, field: str, text: str) -> None:
        errors = {k: v for k, v in self.errors.items() if k != field}
        if text:
            errors[field] = text
        self.errors = errors

    def _on_task(self, change: Any = None) -> None:
        """Another task reads the data differently: detect the label column again for the same table, or offer
        the catalog datasets of the other shape (tagged sentences, or a table)."""
        sentences = shape_for(self.task) == SENTENCES
        self._df = None  # the table read for the other task is not this one's
        self._columns_title.layout.display = self._columns_row.layout.display = "none" if sentences else ""
        self._bars_title.value = S.section("Entities per type" if sentences else "Label distribution").value
        options = catalog_choices(self.task)
        names = [n for _, n in options]
        if self.source in DATASETS and self.source not in names and names:
            self._catalog.options = options  # the catalog's value becomes the other shape's first dataset
            self._wanted_columns = (None, None)
            self.text_column = self.label_column = None
            self.source = names[0] if DEFAULT_DATASET not in names else DEFAULT_DATASET
            return
        self._catalog.options = options
        self._wanted_columns = (None, None) if sentences else (self.text_column, None)
        self.label_column = None
        self._on_source()

    # --- loading the table -------------------------------------------------------------------
    def _on_source(self, change: Any = None) -> None:
        source = self.source
        if source in DATASETS:
            if source not in [n for _, n in self._catalog.options]:
                self._catalog.options = [(f"{source} - {DATASETS[source].description}", source),
                                         *self._catalog.options]
            self._catalog.value = source
            self._show_mode("catalog")
        else:
            self._show_mode("file")
            self._file_label.value = S.message(f"file: {Path(source).name}", "ok")
        self.busy = True
        self._summary.value = S.message(f"reading {Path(source).name} ...", "muted")
        run_job(lambda: self._load(source), sync=not self.background, name="data-panel-load")

    def _load(self, source: str) -> None:
        from workbench.data import detect_columns, load_table

        with self._load_lock:
            if source != self.source:
                return  # superseded
            wanted = self._wanted_columns
            self._wanted_columns = (None, None)
            errors = {k: v for k, v in self.errors.items() if k not in ("source", "text_column", "label_column")}
            if shape_for(self.task) == SENTENCES:
                self._load_sentences(source, wanted, errors)
                return
            try:
                if source not in DATASETS and Path(source).suffix.lower() in (".parquet", ".pq") \
                        and Path(source).is_file():
                    check_parquet(source, f"data file {Path(source).name!r}")  # before the table is read
                df, _ = load_table(source)
                if df.empty:
                    raise WorkbenchError(f"data source {Path(source).name!r} has no rows: add labelled rows")
                df = df.rename(columns=str)
            except WorkbenchError as exc:
                self._df, self.columns, self.rows = None, [], 0
                self._text.options, self._label.options = [], []
                errors["source"] = str(exc)
                self._summary.value = self._preview.value = self._bars.value = ""
                self.errors, self.busy = errors, False
                return
            except Exception as exc:  # pandas / pyarrow failures on a malformed file
                self._df, self.columns, self.rows = None, [], 0
                errors["source"] = f"{Path(source).name!r} could not be read ({type(exc).__name__}): check the format"
                self.errors, self.busy = errors, False
                return
            if source != self.source:
                return
            self._df, self.rows = df, len(df)
            columns = [str(c) for c in df.columns]
            self.columns = columns
            self._text.options = self._label.options = columns
            self._detect_error = None
            try:
                if reads_numbers(self.task) and wanted[1] is None:
                    wanted = (wanted[0], _number_column(df, wanted[0]))
                text, label = detect_columns(df, *wanted)
            except WorkbenchError as exc:
                field = "label_column" if "label column" in str(exc) else "text_column"
                self._detect_error = (field, str(exc))
                text = wanted[0] if wanted[0] in columns else None
                label = wanted[1] if wanted[1] in columns else None
            self.errors = errors
            self.text_column, self.label_column = text, label
            self._on_columns_chosen()
            self.busy = False

    def _on_columns_chosen(self, change: Any = None) -> None:
        """Column choice changed: sync the dropdowns, check the mapping, redraw preview and bars."""
        df = self._df
        if df is None:
            return
        text, label = self.text_column, self.label_column
        if text in self.columns:
            self._text.value = text
        if label in self.columns:
            self._label.value = label
        errors = {k: v for k, v in self.errors.items() if k not in ("text_column", "label_column")}
        if self._detect_error is not None and getattr(self, self._detect_error[0]) is None:
            errors[self._detect_error[0]] = self._detect_error[1]  # until the user picks that column
        if text is not None and text not in df.columns:
            errors["text_column"] = f"text column {text!r} not found: columns found are {', '.join(self.columns)}"
        if label is not None and label not in df.columns:
            errors["label_column"] = f"label column {label!r} not found: columns found are {', '.join(self.columns)}"
        counts: dict[str, int] = {}
        if label in df.columns and reads_numbers(self.task):
            self._show_numbers(df, text, label, errors)
            return
        self.value_range = None
        if label in df.columns:
            values = df[label].map(lambda v: "" if v is None or v != v else str(v).strip())
            series = values[values != ""].value_counts()
            counts = {str(k): int(v) for k, v in series.items()}
            if text == label:
                errors["label_column"] = "the text and label columns are the same column: choose two different ones"
            elif len(counts) < 2:
                only = f" ({next(iter(counts))!r})" if counts else ""
                errors["label_column"] = (f"label column {label!r} has a single class{only}: classification needs "
                                          "at least two; choose another column or add rows")
        self.label_counts = counts
        self.num_labels = max(len(counts), 2)
        self.errors = errors
        self._summary.value = S.message(
            f"{len(df):,} rows, {len(self.columns)} columns, {len(counts)} labels", "muted")
        self._preview.value = self._preview_html(df, text, label)
        shown = dict(list(counts.items())[:MAX_BARS])
        more = f"<div>... and {len(counts) - MAX_BARS} more labels</div>" if len(counts) > MAX_BARS else ""
        self._bars.value = S.bars_html(shown, total=sum(counts.values())) + more

    def _show_numbers(self, df: Any, text: str | None, label: str, errors: dict[str, str]) -> None:
        """A number per text: the label column's numbers, their range and a histogram."""
        import pandas as pd

        values = pd.to_numeric(df[label], errors="coerce").dropna()
        if text == label:
            errors["label_column"] = "the text and value columns are the same column: choose two different ones"
        elif len(values) < 2 or values.nunique() < 2:
            errors["label_column"] = (f"column {label!r} holds {len(values)} numbers ({values.nunique()} distinct): "
                                      "text regression needs a column of varied numbers")
        self.errors = errors
        self.label_counts, self.num_labels = {}, 2
        if len(values) == 0:
            self.value_range, self._bars.value = None, ""
            return
        self.value_range = (float(values.min()), float(values.mean()), float(values.max()))
        self._summary.value = S.message(
            f"{len(df):,} rows, {len(values):,} numbers in {label!r} from {values.min():.3g} to {values.max():.3g} "
            f"(mean {values.mean():.3g})", "muted")
        self._preview.value = self._preview_html(df, text, label)
        bins = pd.cut(values, bins=min(10, values.nunique()))
        self._bars.value = S.bars_html({str(k): int(v) for k, v in bins.value_counts(sort=False).items()},
                                       total=len(values))

    @staticmethod
    def _preview_html(df: Any, text: str | None, label: str | None) -> str:
        cols = [c for c in (text, label) if c in df.columns] or [str(c) for c in df.columns[:4]]
        rows = []
        for _, row in df.head(PREVIEW_ROWS).iterrows():
            cells = []
            for c in cols:
                value = "" if row[c] is None else str(row[c])
                cells.append(value if len(value) <= PREVIEW_CHARS else value[:PREVIEW_CHARS] + "...")
            rows.append(cells)
        return S.table_html(cols, rows)

    def _load_sentences(self, source: str, wanted: tuple[str | None, str | None], errors: dict[str, str]) -> None:
        """Tagged sentences (a catalog dataset of them, or a CoNLL, JSONL or Parquet file): how many, their
        scheme, the entities per type, and the first sentences with their entities marked."""
        from workbench.entities import entity_tuples, sentence_spans, tag_set, types_of
        from workbench.entities import read_sentences

        from .entities import marked_html

        self._df, self.columns, self.value_range = None, [], None
        self._text.options, self._label.options = [], []
        try:
            path = DATASETS[source].path() if source in DATASETS else source
            read = read_sentences(path, *wanted)
        except WorkbenchError as exc:
            errors["source"] = str(exc)
            self.rows, self.label_counts = 0, {}
            self._summary.value = self._preview.value = self._bars.value = ""
            self.errors, self.busy = errors, False
            return
        except Exception as exc:  # a malformed file the reader did not foresee
            errors["source"] = f"{Path(source).name!r} could not be read ({type(exc).__name__}): check the format"
            self.errors, self.busy = errors, False
            return
        if source != self.source:
            return
        counts: dict[str, int] = {}
        for sentence in read.sentences:
            for kind, *_ in entity_tuples(sentence.tags):
                counts[kind] = counts.get(kind, 0) + 1
        types = types_of([t for s in read.sentences for t in s.tags])
        self.rows, self.label_counts = len(read.sentences), dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        self.num_labels = max(len(tag_set(types, read.scheme)), 2)
        self.text_column, self.label_column = wanted  # JSONL / Parquet: the columns the config names, else found
        self.errors = errors
        tokens = sum(len(s.tokens) for s in read.sentences)
        self._summary.value = S.message(
            f"{len(read.sentences):,} sentences, {tokens:,} tokens, {read.scheme} tags, {len(types)} entity types"
            + "".join(f"; {note}" for note in read.notes), "muted")
        self._preview.value = "".join(
            f'<div style="margin:2px 0">{marked_html(*sentence_spans(s.tokens, s.tags))}</div>'
            for s in read.sentences[:PREVIEW_ROWS])
        shown = dict(list(self.label_counts.items())[:MAX_BARS])
        self._bars.value = S.bars_html(shown, total=sum(counts.values()))
        self.busy = False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a pending file read finished (scripts, notebooks, tests): on the panel's state, however
        slow the machine; `timeout` (seconds) gives up earlier and returns False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.busy and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.02)
        return not self.busy

    # --- config ---------------------------------------------------------------------------------
    def to_config(self) -> DataConfig:
        """The DataConfig for the current choices; a WorkbenchError is shown inline and re-raised."""
        try:
            cfg = dataclasses.replace(
                self._base, source=self.source, text_column=self.text_column, label_column=self.label_column,
                eval_fraction=float(self.eval_fraction), max_train_samples=self.max_train_samples,
                max_eval_samples=self.max_eval_samples)
        except WorkbenchError as exc:
            self._set_error("config", str(exc))
            raise
        self._set_error("config", "")
        return cfg

    def from_config(self, cfg: DataConfig) -> None:
        """Show a DataConfig: its source (read again), columns and split settings; eval_source is kept."""
        self._base = cfg
        self.eval_fraction = cfg.eval_fraction
        self.max_train_samples, self.max_eval_samples = cfg.max_train_samples, cfg.max_eval_samples
        self._wanted_columns = (cfg.text_column, cfg.label_column)
        if cfg.source == self.source:
            self._on_source()  # read again so the wanted columns apply
        else:
            self.source = cfg.source


def _number_column(df: Any, text: str | None) -> str | None:
    """The column a text regression predicts: one named like a score, else the only numeric one."""
    import pandas as pd

    from workbench.data import VALUE_NAMES

    lower = {str(c).lower(): str(c) for c in df.columns if str(c) != text}
    named = next((lower[n] for n in VALUE_NAMES if n in lower), None)
    if named is not None:
        return named
    numeric = [str(c) for c in df.columns if str(c) != text and pd.api.types.is_numeric_dtype(df[c])]
    return numeric[0] if len(numeric) == 1 else None
