"""Data: formats, column detection, cleaning, splitting, and the errors for bad files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from workbench.config import DataConfig
from workbench.data import detect_columns, load_catalog_dataset, prepare, read_file
from workbench.errors import WorkbenchError

from conftest import sentiment_rows


def _write(path, rows, fmt):
    df = pd.DataFrame(rows)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_format_loads_and_splits_stratified(tmp_path, fmt):
    rows = [{"review": r["text"], "sentiment": r["label"], "id": i} for i, r in enumerate(sentiment_rows(40))]
    path = _write(tmp_path / f"d.{fmt}", rows, fmt)
    split = prepare(DataConfig(source=str(path), eval_fraction=0.25), seed=1)
    assert (split.report.text_column, split.report.label_column) == ("review", "sentiment")
    assert split.labels == ["neg", "pos"]
    assert len(split.train_texts) == 30 and len(split.eval_texts) == 10
    assert split.label_counts("eval") == {"neg": 5, "pos": 5}
    assert not set(split.train_texts) & set(split.eval_texts)


def test_split_is_reproducible_and_caps_are_stratified(tiny_csv):
    a = prepare(DataConfig(source=str(tiny_csv), max_train_samples=20, max_eval_samples=8), seed=3)
    b = prepare(DataConfig(source=str(tiny_csv), max_train_samples=20, max_eval_samples=8), seed=3)
    assert a.train_texts == b.train_texts and a.eval_texts == b.eval_texts
    assert a.label_counts("train") == {"neg": 10, "pos": 10} and len(a.eval_texts) == 8


def test_detection_by_shape_when_names_say_nothing(tmp_path):
    rows = [{"a": f"some long sentence number {i} about things", "b": ["x", "y", "z"][i % 3]} for i in range(30)]
    df = pd.DataFrame(rows)
    assert detect_columns(df) == ("a", "b")


def test_blank_rows_and_duplicates_are_dropped_and_reported(tmp_path):
    path = tmp_path / "messy.csv"
    path.write_text("text,label\nhello there,a\nhello there,a\n,b\n   ,a\nfine day,\nbye now,b\nok then,b\n"
                    "good one,a\nsame text,a\nsame text,b\n\n\n")
    split = prepare(DataConfig(source=str(path), eval_fraction=0.4), seed=0)
    r = split.report
    assert r.duplicates_dropped == 1 and r.blank_dropped == 3 and r.conflicting_duplicates == 1
    assert len(split.train_texts) + len(split.eval_texts) == 5


def test_windows_1252_is_decoded_and_said(tmp_path):
    path = tmp_path / "cp.csv"
    rows = "text,label\n" + "".join(f"caf\xe9 cr\xe8me {i},{'ab'[i % 2]}\n" for i in range(20))
    path.write_bytes(rows.encode("cp1252"))
    split = prepare(DataConfig(source=str(path)), seed=0)
    assert split.report.encoding == "cp1252" and any("Windows-1252" in n for n in split.report.notes)
    assert any("café crème" in t for t in split.train_texts + split.eval_texts)


def test_utf16_with_bom_is_read(tmp_path):
    path = tmp_path / "u16.csv"
    path.write_bytes(("text,label\n" + "".join(f"t {i},{'ab'[i % 2]}\n" for i in range(20))).encode("utf-16"))
    df, encoding = read_file(path)
    assert encoding == "utf-16" and list(df.columns) == ["text", "label"]


@pytest.mark.parametrize("name, content, match", [
    ("missing.csv", None, r"data file '.*missing.csv' not found"),
    ("empty.csv", b"", r"is empty"),
    ("blank.csv", b"\n\n  \n", r"is empty"),
    ("data.xlsx", b"PK\x03\x04", r"unknown format: use .csv, .tsv, .jsonl or .parquet"),
    ("bad.jsonl", b'{"text": "a", "label": "x"}\n{oops\n', r"line 2 is not valid JSON"),
    ("bad.parquet", b"not parquet at all", r"could not be read as PARQUET"),
    ("binary.csv", bytes(range(256)) * 4, r"not UTF-8 text"),
])
def test_unreadable_files_say_what_and_how(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WorkbenchError, match=match):
        prepare(DataConfig(source=str(path)), seed=0)


def test_missing_columns_list_the_columns_found(tmp_path):
    path = _write(tmp_path / "d.csv", [{"body": "x y", "topic": "a"}, {"body": "z w", "topic": "b"}] * 5, "csv")
    with pytest.raises(WorkbenchError, match=r"text column 'text' not found: columns found are body, topic"):
        prepare(DataConfig(source=str(path), text_column="text"), seed=0)
    with pytest.raises(WorkbenchError, match=r"label column 'label' not found: columns found are body, topic"):
        prepare(DataConfig(source=str(path), label_column="label"), seed=0)


def test_a_single_class_is_refused(tmp_path):
    path = _write(tmp_path / "one.csv", [{"text": f"t{i}", "label": "only"} for i in range(10)], "csv")
    with pytest.raises(WorkbenchError, match=r"single label \('only'\): classification needs at least two"):
        prepare(DataConfig(source=str(path)), seed=0)


def test_eval_labels_unseen_in_train_are_refused(tmp_path):
    train = _write(tmp_path / "train.csv", sentiment_rows(20), "csv")
    ev = _write(tmp_path / "eval.csv", [{"text": "meh", "label": "neutral"}, {"text": "wow", "label": "pos"}], "csv")
    with pytest.raises(WorkbenchError, match=r"eval labels \['neutral'\] never occur in the training data"):
        prepare(DataConfig(source=str(train), eval_source=str(ev)), seed=0)


def test_unknown_catalog_name_suggests_the_nearest(tmp_path):
    with pytest.raises(WorkbenchError, match=r"dataset 'bbc' is neither a catalog name.*did you mean 'bbc-news'"):
        prepare(DataConfig(source="bbc"), seed=0)


def test_catalog_datasets_load_offline():
    bbc = load_catalog_dataset("bbc-news")
    assert len(bbc) == 2225 and sorted(bbc["label"].unique()) == ["business", "entertainment", "politics",
                                                                  "sports", "tech"]
    rt = load_catalog_dataset("rotten-tomatoes")
    assert set(rt["label"]) == {"fresh", "rotten"} and len(rt) == 12808
    chat = load_catalog_dataset("chatterbot")
    assert {"text", "answer", "label"} <= set(chat.columns) and len(chat) > 500


def test_semicolon_csv_and_quoted_newlines(tmp_path):
    path = tmp_path / "excel.csv"
    body = "".join(f'"line one {i}\nline two; still text";{"ab"[i % 2]}\n' for i in range(20))
    path.write_text("text;label\n" + body)
    split = prepare(DataConfig(source=str(path)), seed=0)
    assert split.labels == ["a", "b"] and all("\n" in t for t in split.train_texts)


def test_nested_json_fields_are_not_mistaken_for_labels(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps({"meta": {"k": i}, "body": f"text {i}", "stars": float(i % 2)}) + "\n"
                            for i in range(20)))
    split = prepare(DataConfig(source=str(path)), seed=0)
    assert (split.report.text_column, split.report.label_column) == ("body", "stars")
    assert split.labels == ["0", "1"]


@pytest.mark.parametrize("cap", [1, 2, 23, 24, 25])
def test_any_cap_up_to_the_split_size_works(tiny_csv, cap):
    split = prepare(DataConfig(source=str(tiny_csv), eval_fraction=0.25, max_eval_samples=cap), seed=0)
    assert len(split.eval_texts) == min(cap, 24)
