"""Robustness: each perturbation changes what it names and nothing else, the same way for a seed; flip rates and
out-of-domain confidence on predictor stubs; evaluate --robustness on a tiny trained run writes its reports."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.robustness import (PERTURBATIONS, NAMES, changed_names, changed_numbers, extra_punctuation,
                                  no_punctuation, robustness_report, swapped_words, title_case, typos, whitespace,
                                  word_salad)

TEXT = ("Tom Hanks is wonderful in this two hour film, but the plot (written by Nolan in 2010) drags. "
        "Sadly the ending costs it 3 stars.")


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_each_perturbation_changes_the_text_the_same_way_for_a_seed(name):
    apply = PERTURBATIONS[name].apply
    out = apply(TEXT, 0)
    assert out != TEXT
    assert apply(TEXT, 0) == out  # deterministic by seed
    if name not in ("upper case", "lower case", "title case", "no punctuation"):  # these have no randomness
        assert len({apply(TEXT, seed) for seed in range(6)}) > 1  # the seed matters


def test_typos_touch_a_tenth_of_the_long_words_and_keep_their_ends():
    words = [f"word{chr(97 + i)}ending" for i in range(20)]
    text = " ".join(words)
    out = typos(text, 3).split()
    changed = [(a, b) for a, b in zip(words, out) if a != b]
    assert len(out) == 20 and len(changed) == 2
    for before, after in changed:
        assert after[0] == before[0] and after[-1] == before[-1]
        assert sorted(after) == sorted(before) or len(after) == len(before) - 1
    assert typos("a an the", 0) == "a an the"  # no word longer than 3 letters


def test_case_punctuation_and_whitespace_keep_the_words():
    assert title_case("don't stop (by nolan)") == "Don't Stop (By Nolan)"
    assert no_punctuation("Well, it's great... really!") == "Well its great really"
    assert re.sub(r"[!,.?;\- ]", "", extra_punctuation(TEXT, 1)) == re.sub(r"[!,.?;\- ]", "", TEXT)
    spaced = whitespace(TEXT, 2)
    assert spaced.split() == TEXT.split() and ("\t" in spaced.strip() or "\n" in spaced.strip() or "  " in spaced)


def test_swapped_words_keep_the_words_and_move_each_once():
    words = [f"w{i}" for i in range(30)]
    out = swapped_words(" ".join(words), 5).split()
    assert sorted(out) == sorted(words) and out != words
    moved = [i for i, (a, b) in enumerate(zip(words, out)) if a != b]
    assert len(moved) == 6 and all(abs(words.index(out[i]) - i) == 1 for i in moved)
    assert swapped_words("alone", 0) == "alone"


def test_numbers_and_names_are_replaced_and_the_rest_kept():
    out = changed_numbers(TEXT, 0)
    old, new = re.findall(r"\d+", TEXT), re.findall(r"\d+", out)
    assert [len(x) for x in old] == [len(x) for x in new] and all(a != b for a, b in zip(old, new))
    assert re.sub(r"\d", "", out) == re.sub(r"\d", "", TEXT)
    assert changed_numbers("no digits here", 0) == "no digits here"
    named = changed_names(TEXT, 0)
    assert named.startswith("Tom ") and "Sadly" in named  # a sentence's first word stays
    assert "Hanks" not in named and "Nolan" not in named
    assert sum(n in named for n in NAMES) >= 1
    assert changed_names("The film. Great stuff.", 0) == "The film. Great stuff."


def test_word_salad_keeps_the_vocabulary_and_the_lengths():
    texts = ["a good film indeed", "truly awful acting", "fine"]
    salad = word_salad(texts, 0)
    assert [len(t.split()) for t in salad] == [4, 3, 1]
    assert sorted(" ".join(salad).split()) == sorted(" ".join(texts).split())


class KeywordStub:
    """Says "pos" when the text holds "good" (any case), else "neg"; confidence 0.9; "?" texts get 0.5."""

    labels = ["neg", "pos"]

    def probabilities(self, texts):
        out = []
        for t in texts:
            p = 0.5 if "?" in t else (0.9 if "good" in t.lower() else 0.1)
            out.append([1 - p, p])
        return np.asarray(out)


def test_flip_rate_counts_answers_that_change_among_changed_texts():
    texts = [f"a good film number {i}" for i in range(10)] + [f"a dull film number {i}" for i in range(10)]
    labels = ["pos"] * 10 + ["neg"] * 10
    report = robustness_report(KeywordStub(), texts, labels, ["neg", "pos"], seed=0, ood_texts=["why?", "how?"])
    assert report["clean"]["accuracy"] == 1.0
    rows = {r["name"]: r for r in report["perturbations"]}
    assert rows["upper case"]["flip_rate"] == 0.0 and rows["upper case"]["changed"] == 20
    # typos hit one of {good, film, number} in each text; "good" broken flips a positive text
    typo = rows["typos"]
    broken = sum("good" not in t.lower() for t in [typos(x, 0) for x in texts[:10]])
    assert typo["flips"] == broken and typo["flip_rate"] == pytest.approx(broken / 20)
    assert typo["accuracy"] == pytest.approx(1 - broken / 20)
    assert len(typo["examples"]) == min(broken, 3) and all(e["perturbed_answer"] == "neg" for e in typo["examples"])
    assert rows["changed names"]["changed"] == 0 and rows["changed names"]["flip_rate"] is None
    ood = report["ood"]
    assert ood["source"] == "given" and ood["sets"][0]["mean_confidence"] == pytest.approx(0.5)
    assert ood["sets"][0]["shift"] == pytest.approx(0.5 - 0.9) and ood["sets"][0]["auroc"] == 1.0


def test_builtin_out_of_domain_sets_and_regression_figures():
    texts = [f"a good film number {i}" for i in range(30)]
    report = robustness_report(KeywordStub(), texts, ["pos"] * 30, ["neg", "pos"], seed=1)
    names = [s["name"] for s in report["ood"]["sets"]]
    assert report["ood"]["source"] == "built-in" and names[0] == "word salad"
    assert "chatterbot questions" in names or report["ood"]["notes"]

    class Length:
        def predict(self, texts):
            return [{"value": float(len(t.split()))} for t in texts]

    reg = robustness_report(Length(), ["one two three", "four five"], [3.0, 2.0], None)
    rows = {r["name"]: r for r in reg["perturbations"]}
    assert reg["clean"]["rmse"] == 0.0 and rows["upper case"]["mean_abs_change"] == 0.0
    assert rows["whitespace"]["rmse"] == 0.0


def test_bad_inputs_say_what_to_pass():
    with pytest.raises(WorkbenchError, match="one true label per text"):
        robustness_report(KeywordStub(), ["a"], [], ["neg", "pos"])
    with pytest.raises(WorkbenchError, match="'meh' is not among the run's labels"):
        robustness_report(KeywordStub(), ["a"], ["meh"], ["neg", "pos"])


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_evaluate_with_robustness_writes_the_reports(tiny_config, store, tmp_path):
    from conftest import sentiment_rows
    from workbench.evaluate import evaluate_file, trust_lines
    from workbench.loop import train
    from workbench.run_paths import RunPaths

    record = train(tiny_config(), store=store)
    rows = [{**r, "source": "web" if i % 3 else "mail"} for i, r in enumerate(sentiment_rows(40, seed=4))]
    test_file = _write_csv(tmp_path / "test.csv", rows)
    ood = tmp_path / "ood.txt"
    ood.write_text("what time is it?\nwrite to ann@example.org\n")
    result = evaluate_file(record["id"], test_file, store.home, robustness=True, slice_columns=["source"],
                           slice_terms="great,awful", ood=ood)
    paths = RunPaths.of(record)
    written = json.loads(paths.robustness.read_text())
    assert written["run"] == record["id"] and {p["name"] for p in written["perturbations"]} == set(PERTURBATIONS)
    assert written["ood"]["sets"][0]["rows"] == 2 and written["ood"]["file"] == str(ood)
    assert written["ood"]["sets"][0]["examples"] == ["what time is it?", "write to [EMAIL]"]
    slices = json.loads(paths.slices.read_text())
    assert {(s["kind"], s["value"]) for s in slices["slices"]} >= {("column", "web"), ("column", "mail"),
                                                                   ("term", "contains")}
    lengths = [s for s in slices["slices"] if s["kind"] == "length"]
    assert sum(s["rows"] for s in lengths) == 40 and all(re.fullmatch(r"\d+(-\d+)? words", s["value"]) for s in lengths)
    assert result["robustness"]["perturbations"] == written["perturbations"]
    assert 0.0 <= result["ece"] <= 1.0
    text = "\n".join(trust_lines(result))
    assert "typos" in text and "slices (40 rows" in text
    assert not list(paths.trust.glob("*.tmp"))


def test_a_missing_slice_column_names_the_columns_there(tiny_config, store, tmp_path):
    from conftest import sentiment_rows
    from workbench.evaluate import evaluate_file
    from workbench.loop import train

    record = train(tiny_config(train={"baseline": False}), store=store)
    test_file = _write_csv(tmp_path / "t.csv", sentiment_rows(10, seed=2))
    with pytest.raises(WorkbenchError, match=r"slice column 'genre' not found .* columns found are text, label"):
        evaluate_file(record["id"], test_file, store.home, slice_columns=["genre"])


# --- the view ----------------------------------------------------------------------------------------------

def test_trust_view_draws_the_reports_and_names_flagged_slices(store):
    from workbench.config import Config
    from workbench.run_paths import RunPaths
    from workbench.slices import slice_report
    from workbench.tasks.classification import write_json
    from widgets.trust import TrustView

    run_id = store.create_run(Config().to_dict())
    paths = RunPaths(store.run_dir(run_id))
    texts = [f"a good film number {i}" for i in range(10)] + [f"a dull film number {i}" for i in range(10)]
    rob = robustness_report(KeywordStub(), texts, ["pos"] * 10 + ["neg"] * 10, ["neg", "pos"], ood_texts=["why?"])
    write_json(paths.robustness, {"run": run_id, "file": "/x/test.csv", **rob})
    n = 200
    source = ["a", "b"] * (n // 2)
    y = [i % 2 for i in range(n)]
    pred = [1 - t if (s == "b" and i % 4 < 3) else t for i, (t, s) in enumerate(zip(y, source))]
    write_json(paths.slices, slice_report(["x y"] * n, y, pred, ["neg", "pos"], columns={"source": source}))

    view = TrustView(store=store, background=False)
    assert view.robustness is None and "no run chosen" in view._title.value
    view.run_id = run_id
    assert view.robustness["perturbations"] == json.loads(paths.robustness.read_text())["perturbations"]
    first, second, bars, overall = view.fig.data
    assert list(first.x) == list(PERTURBATIONS) and second.y[list(PERTURBATIONS).index("upper case")] == 0.0
    assert list(bars.x)[0] == "source: b" and bars.marker.color[0] == "#d62728"
    assert "Weaker than the overall: source = b" in view.summary and "flips the most answers" in view.summary
    assert "typos" in view._table.value and "why?" not in view._table.value
    view.check("/nowhere/test.csv")
    assert view.error and not view.running and "Traceback" not in view.error
    read_only = TrustView(store=store, background=False, read_only=True, run_id=run_id)
    read_only.check("/x.csv")
    assert "read-only" in read_only.error and read_only.slices is not None
