"""Labelled text in, a clean stratified train/eval split out.

Sources are catalog names or files (CSV, TSV, JSONL, Parquet). Columns are
detected when the config leaves them out. Cleaning is reported, never silent:
blank rows and exact duplicates are dropped and counted in `DataReport`.
"""

from __future__ import annotations

import bz2
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .catalog import DATASETS, unknown_dataset
from .config import DataConfig
from .errors import WorkbenchError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
TEXT_NAMES = ("text", "sentence", "review", "content", "body", "document", "message", "utterance",
              "comment", "tweet", "question", "input")
LABEL_NAMES = ("label", "labels", "category", "class", "target", "sentiment", "intent", "topic", "y")
MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass
class DataReport:
    """What loading and cleaning did, for the user to read."""

    source: str
    text_column: str
    label_column: str
    rows_read: int = 0
    blank_dropped: int = 0
    duplicates_dropped: int = 0
    conflicting_duplicates: int = 0
    encoding: str = "utf-8"
    notes: list[str] = field(default_factory=list)


@dataclass
class Split:
    """The prepared data: texts and integer labels, with label names in index order."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    labels: list[str]
    report: DataReport

    def label_counts(self, which: str = "train") -> dict[str, int]:
        ys = self.train_labels if which == "train" else self.eval_labels
        return {name: ys.count(i) for i, name in enumerate(self.labels)}


# --- reading -----------------------------------------------------------------

def _decode(raw: bytes, where: str) -> tuple[str, str]:
    for encoding in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return raw.decode(encoding), encoding.replace("-sig", "")
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        pass
    raise WorkbenchError(f"{where} is not UTF-8 text (nor Windows-1252): re-save it as UTF-8")


def read_file(path: str | Path) -> tuple[pd.DataFrame, str]:
    """Read a CSV/TSV/JSONL/Parquet file into a DataFrame; returns it and the encoding used."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WorkbenchError(f"data file {str(path)!r} not found: check the path (relative to {Path.cwd()})")
    if not p.is_file():
        raise WorkbenchError(f"data source {str(path)!r} is a directory: give one CSV, TSV, JSONL or Parquet file")
    suffixes = [s.lower() for s in p.suffixes]
    compressed = suffixes[-1:] == [".bz2"]
    fmt = FORMATS.get(suffixes[-2] if compressed and len(suffixes) > 1 else (suffixes[-1] if suffixes else ""))
    if fmt is None:
        raise WorkbenchError(
            f"data file {p.name!r} has an unknown format: use .csv, .tsv, .jsonl or .parquet (or .csv.bz2)"
        )
    size = p.stat().st_size
    if size == 0:
        raise WorkbenchError(f"data file {p.name!r} is empty: it needs a header row and labelled rows")
    if size > MAX_FILE_BYTES:
        raise WorkbenchError(f"data file {p.name!r} is {size >> 20} MiB, over the {MAX_FILE_BYTES >> 20} MiB limit: "
                             "sample it down first")
    try:
        if fmt == "parquet":
            return pd.read_parquet(p), "binary"
        raw = p.read_bytes()
        if compressed:
            raw = bz2.decompress(raw)
        text, encoding = _decode(raw, f"data file {p.name!r}")
        if not text.strip():
            raise WorkbenchError(f"data file {p.name!r} is empty: it needs a header row and labelled rows")
        if fmt == "jsonl":
            return _read_json_lines(text, p.name), encoding
        sep = "\t" if fmt == "tsv" else _csv_delimiter(text)
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                           skip_blank_lines=True), encoding
    except WorkbenchError:
        raise
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkbenchError(f"data file {p.name!r} could not be read as {fmt.upper()} ({first}): "
                             "check the format and the delimiter") from None


def _csv_delimiter(text: str) -> str:
    """',' unless the header row clearly uses ';', tab or '|' (spreadsheets in many locales write ';')."""
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[","] else ","


def _read_json_lines(text: str, name: str) -> pd.DataFrame:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of records is accepted as well
        try:
            return pd.DataFrame(json.loads(stripped))
        except (json.JSONDecodeError, ValueError) as exc:
            raise WorkbenchError(f"data file {name!r} is not valid JSON ({exc}): one object per line") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"data file {name!r} line {lineno} is not valid JSON ({exc.msg}): "
                                 "write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise WorkbenchError(f"data file {name!r} line {lineno} is not a JSON object: write one object per line")
        records.append(obj)
    return pd.DataFrame(records)


def load_catalog_dataset(name: str) -> pd.DataFrame:
    """A catalog dataset as a DataFrame with `text` and `label` columns."""
    asset = DATASETS[name]
    root = asset.path()
    if name == "bbc-news":
        rows = [
            {"text": f.read_text(encoding="utf-8", errors="ignore"), "label": folder.name}
            for folder in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(folder.glob("*.txt"))
        ]
        return pd.DataFrame(rows)
    if name == "rotten-tomatoes":
        df = pd.read_csv(root, dtype=str, keep_default_na=False)
        df = df[df["category"].isin(["fresh", "rotten"])]
        return pd.DataFrame({"text": df["text"].to_numpy(), "label": df["category"].to_numpy()})
    if name == "chatterbot":
        return pd.DataFrame(load_chatterbot_pairs())
    raise unknown_dataset(name)


def load_chatterbot_pairs() -> list[dict[str, str]]:
    """Question/answer pairs from the ChatterBot corpus, with the topic as label."""
    import yaml

    pairs = []
    for f in sorted(DATASETS["chatterbot"].path().glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8", errors="ignore")) or {}
        for conv in doc.get("conversations") or []:
            for q, a in zip(conv, conv[1:]):
                if isinstance(q, str) and isinstance(a, str):
                    pairs.append({"text": q, "answer": a, "label": f.stem})
    return pairs


def load_table(source: str) -> tuple[pd.DataFrame, str]:
    if source in DATASETS:
        return load_catalog_dataset(source), "utf-8"
    p = Path(source).expanduser()
    if not p.exists() and not any(source.lower().endswith(ext) for ext in (*FORMATS, ".bz2")):
        raise unknown_dataset(source)
    return read_file(p)


# --- columns -----------------------------------------------------------------

def detect_columns(df: pd.DataFrame, text_column: str | None = None,
                   label_column: str | None = None) -> tuple[str, str]:
    """Pick the text and label columns: by name first, then by shape."""
    columns = [str(c) for c in df.columns]
    df = df.rename(columns=str)
    found = ", ".join(columns) or "none"
    for given, what in ((text_column, "text"), (label_column, "label")):
        if given is not None and given not in columns:
            raise WorkbenchError(f"{what} column {given!r} not found: columns found are {found} "
                                 f"(set data.{what}_column)")
    lower = {c.lower(): c for c in columns}
    text = text_column or next((lower[n] for n in TEXT_NAMES if n in lower), None)
    if text is None:
        stringy = [c for c in columns if c != label_column and (df[c].dtype == object or pd.api.types.is_string_dtype(df[c]))]
        lengths = {c: df[c].astype(str).str.len().mean() for c in stringy}
        text = max(lengths, key=lengths.get) if lengths else None
    if text is None:
        raise WorkbenchError(f"no text column detected: columns found are {found} (set data.text_column)")
    label = label_column or next((lower[n] for n in LABEL_NAMES if n in lower and lower[n] != text), None)
    if label is None:
        n = max(len(df), 1)
        distinct = {c: _distinct(df[c]) for c in columns if c != text}
        candidates = [c for c, k in distinct.items() if 2 <= k <= min(100, max(2, n // 2))]
        label = min(candidates, key=distinct.get) if candidates else None
    if label is None:
        raise WorkbenchError(f"no label column detected: columns found are {found} (set data.label_column)")
    return text, label


def _distinct(column: pd.Series) -> int:
    """Distinct values; a column of lists or dicts (nested JSON) cannot be a label: 0."""
    try:
        return int(column.nunique())
    except TypeError:
        return 0


def _clean(df: pd.DataFrame, text: str, label: str, report: DataReport) -> pd.DataFrame:
    out = pd.DataFrame({"text": df[text].map(_as_text), "label": df[label].map(_as_label)})
    report.rows_read += len(out)
    blank = (out["text"].str.strip() == "") | (out["label"] == "")
    report.blank_dropped += int(blank.sum())
    out = out[~blank]
    dup = out.duplicated(subset=["text", "label"])
    report.duplicates_dropped += int(dup.sum())
    out = out[~dup]
    conflicts = out.duplicated(subset=["text"], keep="first")
    if conflicts.any():
        report.conflicting_duplicates += int(conflicts.sum())
        report.notes.append(f"{int(conflicts.sum())} texts appear with two different labels; kept the first")
        out = out[~conflicts]
    return out.reset_index(drop=True)


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value)


def _as_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# --- the split -----------------------------------------------------------------

def prepare(cfg: DataConfig, seed: int) -> Split:
    """Load, clean, validate and split the data the config names."""
    from sklearn.model_selection import train_test_split

    df, encoding = load_table(cfg.source)
    if df.empty:
        raise WorkbenchError(f"data source {cfg.source!r} has no rows: add labelled rows")
    text_col, label_col = detect_columns(df, cfg.text_column, cfg.label_column)
    report = DataReport(cfg.source, text_col, label_col, encoding=encoding)
    if encoding == "cp1252":
        report.notes.append("file was not UTF-8; decoded it as Windows-1252")
    table = _clean(df, text_col, label_col, report)
    _check_classes(table, cfg.source)

    if cfg.eval_source:
        eval_df, eval_encoding = load_table(cfg.eval_source)
        e_text, e_label = detect_columns(eval_df, cfg.text_column or text_col, cfg.label_column or label_col)
        eval_table = _clean(eval_df, e_text, e_label, DataReport(cfg.eval_source, e_text, e_label))
        unseen = sorted(set(eval_table["label"]) - set(table["label"]))
        if unseen:
            raise WorkbenchError(f"eval labels {unseen[:5]} never occur in the training data: "
                                 "add training examples for them or drop them from the eval file")
        if eval_table.empty:
            raise WorkbenchError(f"eval file {cfg.eval_source!r} has no labelled rows")
        train_table = table
    else:
        counts = table["label"].value_counts()
        rare = sorted(counts[counts < 2].index.tolist())
        if rare:
            raise WorkbenchError(f"labels {rare[:5]} have a single example, so they cannot appear in both train "
                                 "and eval: add examples or remove those rows")
        n_eval = max(int(round(len(table) * cfg.eval_fraction)), len(counts))
        if n_eval >= len(table):
            raise WorkbenchError(f"only {len(table)} usable rows for {len(counts)} labels: too few to hold out an "
                                 "eval set; add rows or lower data.eval_fraction")
        train_table, eval_table = train_test_split(table, test_size=n_eval, stratify=table["label"],
                                                   random_state=seed)
    train_table = _cap(train_table, cfg.max_train_samples, seed)
    eval_table = _cap(eval_table, cfg.max_eval_samples, seed)
    labels = sorted(set(train_table["label"]), key=_label_sort_key)
    if len(labels) < 2:
        raise WorkbenchError(f"the training rows have a single label ({labels[0]!r}): classification needs "
                             "at least two classes")
    index = {name: i for i, name in enumerate(labels)}
    missing = sorted(set(eval_table["label"]) - set(index))
    if missing:
        raise WorkbenchError(f"eval labels {missing[:5]} never occur in the training rows: raise "
                             "data.max_train_samples or add examples")
    return Split(
        train_texts=train_table["text"].tolist(),
        train_labels=[index[y] for y in train_table["label"]],
        eval_texts=eval_table["text"].tolist(),
        eval_labels=[index[y] for y in eval_table["label"]],
        labels=labels,
        report=report,
    )


def _check_classes(table: pd.DataFrame, source: str) -> None:
    if table.empty:
        raise WorkbenchError(f"data source {source!r} has no rows with both text and a label")
    classes = table["label"].unique()
    if len(classes) < 2:
        raise WorkbenchError(f"data source {source!r} has a single label ({classes[0]!r}): classification "
                             "needs at least two classes")


def _cap(table: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """Take a stratified sample of `cap` rows (all rows when cap is None or larger)."""
    if cap is None or cap >= len(table):
        return table
    from sklearn.model_selection import train_test_split

    counts = table["label"].value_counts()
    # a stratified split needs at least one row per class on both sides
    if cap < len(counts) or len(table) - cap < len(counts) or (counts < 2).any():
        return table.sample(n=cap, random_state=seed)
    sample, _ = train_test_split(table, train_size=cap, stratify=table["label"], random_state=seed)
    return sample


def _label_sort_key(label: str) -> tuple[int, Any]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)
