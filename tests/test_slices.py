"""Slices: a seeded gap is flagged, a set without one is not; word-count buckets, terms, columns, regression."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.slices import slice_report, word_count_buckets
from workbench.evaluate import terms_from

LABELS = ["neg", "pos"]


def _rows(n: int, seed: int, gap_in: str | None, gap: float = 0.3, noise: float = 0.1):
    """Texts of 3-40 words, a `source` column of a/b/c, answers wrong for `noise` of the rows and, in the slice
    `gap_in`, for `gap` more."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(["word"] * int(k)) for k in rng.integers(3, 40, n)]
    source = np.asarray(["a", "b", "c"])[np.arange(n) % 3]
    y = rng.integers(0, 2, n)
    wrong = rng.random(n) < noise
    if gap_in is not None:
        wrong |= (source == gap_in) & (rng.random(n) < gap)
    return texts, y, np.where(wrong, 1 - y, y), list(source)


def test_a_seeded_gap_is_flagged_and_named():
    texts, y, pred, source = _rows(600, 0, "b")
    report = slice_report(texts, y, pred, LABELS, columns={"source": source})
    assert [(s["group"], s["value"]) for s in report["flagged"]] == [("source", "b")]
    b = report["flagged"][0]
    assert b["rows"] == 200 and b["gap"] < -0.05 and b["interval"][1] < report["overall"]["accuracy"]
    assert "Wilson" in report["rule"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_gap_no_flag(seed):
    texts, y, pred, source = _rows(600, seed, None)
    report = slice_report(texts, y, pred, LABELS, columns={"source": source}, terms=["word"])
    assert report["flagged"] == [] and len(report["slices"]) == 3 + 4 + 1


def test_small_slices_are_listed_never_flagged():
    texts, y, pred, source = _rows(60, 0, "b", gap=0.9)
    report = slice_report(texts, y, pred, LABELS, columns={"source": source}, min_rows=21)
    b = next(s for s in report["slices"] if s["value"] == "b")
    assert b["rows"] == 20 and b["gap"] < -0.3 and not b["flagged"]
    assert slice_report(texts, y, pred, LABELS, columns={"source": source}, min_rows=20)["flagged"]


def test_length_buckets_are_quantiles_named_by_their_word_counts():
    texts = [" ".join(["w"] * k) for k in range(1, 101)]
    names, ordered = word_count_buckets(texts)
    assert ordered == ["1-25 words", "26-50 words", "51-75 words", "76-100 words"]
    assert [names.count(n) for n in ordered] == [25, 25, 25, 25]
    assert word_count_buckets(["a b", "c d"]) == (["2 words", "2 words"], ["2 words"])


def test_terms_match_whole_words_any_case(tmp_path):
    texts = ["A GREAT film", "greatly overrated", "great", "dull"]
    report = slice_report(texts, [1, 0, 1, 0], [1, 1, 1, 0], LABELS, terms=["great", "absent"],
                          length_buckets=False)
    rows = {(s["group"], s["value"]): s["rows"] for s in report["slices"]}
    assert rows == {("great", "contains"): 2, ("great", "without"): 2, ("absent", "without"): 4}
    assert report["notes"] == ["term 'absent' occurs in no text"]
    path = tmp_path / "terms.txt"
    path.write_text("great\n\nslow burn\n")
    assert terms_from(str(path)) == ["great", "slow burn"] and terms_from("a, b ,") == ["a", "b"]


def test_missing_column_values_are_one_slice_and_names_work_as_labels():
    report = slice_report(["a", "b", "c"], ["pos", "neg", "pos"], ["pos", "pos", "pos"], LABELS,
                          columns={"genre": ["drama", None, ""]}, length_buckets=False, min_rows=1)
    values = {s["value"]: s["rows"] for s in report["slices"]}
    assert values == {"(missing)": 2, "drama": 1} and report["overall"]["accuracy"] == pytest.approx(2 / 3)


def test_regression_slices_flag_a_worse_rmse():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.normal(size=n)
    source = np.asarray(["a", "b", "c"])[np.arange(n) % 3]
    pred = y + rng.normal(scale=np.where(source == "c", 1.0, 0.2))
    report = slice_report(["x y"] * n, y, pred, None, columns={"source": list(source)}, length_buckets=False)
    assert report["kind"] == "regression" and [s["value"] for s in report["flagged"]] == ["c"]
    assert report["flagged"][0]["rmse"] > report["overall"]["rmse"]


def test_mismatched_lengths_say_what_to_pass():
    with pytest.raises(WorkbenchError, match="one true and one predicted answer per text"):
        slice_report(["a", "b"], [0], [0, 1], LABELS)
    with pytest.raises(WorkbenchError, match="slice column 'g' has 1 values for 2 texts"):
        slice_report(["a", "b"], [0, 1], [0, 1], LABELS, columns={"g": ["x"]})


def test_many_slices_without_a_gap_rarely_flag_any():
    """The Bonferroni-adjusted interval: 10 slices of ~100 rows and no real gap, 100 seeded reports."""
    rng = np.random.default_rng(1)
    flagged = 0
    for _ in range(100):
        y = rng.integers(0, 2, 1000)
        pred = np.where(rng.random(1000) < 0.2, 1 - y, y)
        report = slice_report(["a b"] * 1000, y, pred, LABELS, columns={"c": list(rng.integers(0, 10, 1000))},
                              length_buckets=False)
        flagged += bool(report["flagged"])
        assert report["confidence"] == pytest.approx(1 - 0.05 / 10)
    assert flagged <= 5
