"""benchmarks/messy_data.py: the messy real sets of bench_baselines.py, built small (a few seconds, no model).

Each set's training and test files share no text; the non-UTF-8 ones really fail a UTF-8 decode (and the
workbench reads them, saying which encoding it used); the skewed one has its ~10 % class.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import messy_data  # noqa: E402

LIMIT = 400  # rows read from each source


def _build(name: str, tmp_path: Path) -> messy_data.BuiltSet:
    try:
        return messy_data.build_set(name, tmp_path, seed=0, limit=LIMIT)
    except messy_data.SourceMissing as exc:
        pytest.skip(f"source package of {name} not installed ({exc})")


def _keys(built: messy_data.BuiltSet, which: str) -> set[str]:
    texts, _ = messy_data.read_test(built) if which == "test" else _read_train(built)
    return {messy_data._key(t) for t in texts}


def _read_train(built: messy_data.BuiltSet) -> tuple[list[str], list]:
    as_test = messy_data.BuiltSet(**{**built.as_dict(), "test_path": built.train_path})
    return messy_data.read_test(as_test)


@pytest.mark.parametrize("name", messy_data.MESSY_SETS)
def test_train_and_test_files_are_disjoint_and_complete(name: str, tmp_path: Path) -> None:
    built = _build(name, tmp_path)
    train, test = _keys(built, "train"), _keys(built, "test")
    assert len(train) == built.train_rows and len(test) == built.test_rows  # no duplicate inside a file either
    assert not train & test
    assert built.test_rows >= 0.2 * LIMIT
    if built.task == "text-classification":
        assert set(built.test_counts) == set(built.train_counts) and len(built.train_counts) >= 2


@pytest.mark.parametrize("name,encoding", [("tweets-latin1", "latin-1"), ("sms-spam-cp1252", "cp1252")])
def test_non_utf8_files_fail_a_utf8_decode_and_the_workbench_reads_them(name: str, encoding: str,
                                                                       tmp_path: Path) -> None:
    built = _build(name, tmp_path)
    raw = Path(built.train_path).read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    text = raw.decode(encoding)
    assert any(c in text for c in "£ñüé’")  # real accented / currency characters, not mojibake
    from workbench.config import DataConfig
    from workbench.data import prepare

    split = prepare(DataConfig(source=built.train_path, text_column=built.text_column,
                               label_column=built.label_column), 42)
    assert split.report.encoding in ("cp1252", "latin-1")
    assert not any("\ufffd" in t for t in split.train_texts + split.eval_texts)


def test_skewed_set_has_its_ten_percent_class(tmp_path: Path) -> None:
    built = _build("reviews-skewed", tmp_path)
    assert set(built.train_counts) == {"negative", "neutral", "positive"}
    for counts in (built.train_counts, built.test_counts):
        share = counts["neutral"] / sum(counts.values())
        assert 0.07 <= share <= 0.13, counts
    assert Path(built.train_path).read_text(encoding="utf-8").split("\n", 1)[0] == "review\trating"


def test_long_documents_keep_their_line_breaks(tmp_path: Path) -> None:
    built = _build("news-long-jsonl", tmp_path)
    rows = [json.loads(line) for line in Path(built.test_path).read_text(encoding="utf-8").splitlines()]
    assert built.multiline_test_texts == len(rows) > 0
    assert sum(len(r["text"]) for r in rows) / len(rows) > 1000
    assert all("\r\n" in r["text"] for r in rows)


def test_build_is_deterministic(tmp_path: Path) -> None:
    a = _build("reviews-skewed", tmp_path / "a")
    b = _build("reviews-skewed", tmp_path / "b")
    assert Path(a.train_path).read_bytes() == Path(b.train_path).read_bytes()
    assert Path(a.test_path).read_bytes() == Path(b.test_path).read_bytes()
