"""Active learning on a tiny model: suggestions (unlabelled, unique, ordered, seeded, spread over clusters),
labels appended to the dataset file atomically in its own encoding, undo after a reload or a crash, the
learning curve's shape, and the refusals."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import sentiment_rows
from workbench.active import (
    STRATEGIES, append_labels, appended_rows, class_quotas, journal_path, learning_curve, normalise, remove_last,
    sentence_embeddings, suggest)
from workbench.data import load_labelled, read_file
from workbench.errors import WorkbenchError


def _write_csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8", newline: str = "\n") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator=newline)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _raw_config(model_dir: Path, source: Path, epochs: int = 2) -> dict:
    return {"model": str(model_dir), "data": {"source": str(source), "eval_fraction": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": epochs, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32,
                      "warmup_ratio": 0.0, "early_stopping_patience": 0, "threads": 1, "baseline": False},
            "track": {"wandb": "disabled", "tensorboard": False}}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A tiny classification run on 40 labelled rows, and a pool that repeats 10 of them."""
    from workbench.config import Config
    from workbench.loop import train
    from workbench.store import RunStore

    folder = tmp_path_factory.mktemp("active")
    rows = sentiment_rows(120, seed=3)
    dataset = _write_csv(folder / "labelled.csv", rows[:40])
    store = RunStore(folder / "home")
    record = train(Config.from_dict(_raw_config(tiny_model_dir, dataset)), store)
    assert record["status"] == "completed", record.get("error")
    pool_texts = [r["text"] for r in rows[40:]] + [r["text"].upper() for r in rows[:10]] + [rows[50]["text"]]
    pool = _write_csv(folder / "pool.csv", [{"id": str(i), "review": t} for i, t in enumerate(pool_texts)])
    from workbench.predict import load_predictor

    return {"record": record, "home": store.home, "dataset": dataset, "pool": pool, "texts": pool_texts,
            "predictor": load_predictor(record["id"], store.home),
            "labelled": {normalise(r["text"]) for r in rows[:40]}}


def test_suggest_gives_n_unlabelled_unique_rows_most_useful_first(trained):
    rows = suggest(trained["record"]["id"], trained["pool"], 12, trained["home"], strategy="margin-diversity")
    assert len(rows) == 12
    keys = [normalise(r["text"]) for r in rows]
    assert not set(keys) & trained["labelled"], "an already labelled text was suggested"
    assert len(set(keys)) == 12, "a text was suggested twice"
    assert [r["rank"] for r in rows] == list(range(1, 13))
    margins = [r["margin"] for r in rows]
    assert margins == sorted(margins), "suggestions are not ordered by uncertainty"
    assert {r["strategy"] for r in rows} == {"margin-diversity"}
    for r in rows:  # the index is the pool file's data row
        assert trained["texts"][r["index"]] == r["text"]
        assert r["predicted"] == max(r["scores"], key=r["scores"].get)
        assert abs(sum(r["scores"].values()) - 1.0) < 1e-6
    assert len({r["cluster"] for r in rows}) == 12, "two suggestions came from one cluster"


def test_suggest_is_deterministic_by_seed_and_random_differs(trained):
    args, loaded = (trained["record"]["id"], trained["pool"], 8, trained["home"]), trained["predictor"]
    assert suggest(*args, seed=1) == suggest(*args, seed=1, predictor=loaded)
    first = suggest(*args, strategy="random", seed=1, predictor=loaded)
    assert first == suggest(*args, strategy="random", seed=1, predictor=loaded)
    second = suggest(*args, strategy="random", seed=2, predictor=loaded)
    assert [r["index"] for r in first] != [r["index"] for r in second]
    assert all(r["cluster"] is None for r in first)


def test_plain_margin_is_the_smallest_margins_of_the_pool(trained):
    args = (trained["record"]["id"], trained["pool"])
    rows = suggest(*args, 5, trained["home"], strategy="margin", predictor=trained["predictor"])
    every = suggest(*args, 500, trained["home"], strategy="margin", predictor=trained["predictor"])
    assert len(every) == 80  # 91 rows in the pool file: 10 labelled (in upper case) and 1 repeat left out
    assert [r["index"] for r in rows] == [r["index"] for r in every[:5]]
    assert [r["margin"] for r in every] == sorted(r["margin"] for r in every)


class _Scripted:
    """A predictor whose probabilities are given per text (no network: embeddings are its probabilities)."""

    labels = ["neg", "pos"]

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def probabilities(self, texts):
        return np.array([[1 - self.table[t], self.table[t]] for t in texts])


def test_diversity_spreads_picks_over_clusters_where_margin_alone_does_not(trained):
    # three groups: ten texts at p=0.5 (most uncertain), ten at 0.7, ten at 0.9
    table = {f"group {g} text {i}": p + 0.001 * i for g, p in enumerate((0.5, 0.7, 0.9)) for i in range(10)}
    args = (trained["record"]["id"], list(table), 3, trained["home"])
    plain = suggest(*args, strategy="margin", predictor=_Scripted(table))
    spread = suggest(*args, strategy="margin-diversity", predictor=_Scripted(table))
    assert {r["text"].split()[1] for r in plain} == {"0"}
    assert {r["text"].split()[1] for r in spread} == {"0", "1", "2"}
    assert len({r["cluster"] for r in spread}) == 3
    assert [r["text"] for r in spread] == ["group 0 text 0", "group 1 text 0", "group 2 text 0"]


def test_class_quotas_share_equally_and_pass_on_what_a_class_lacks():
    assert class_quotas([100, 100], 50) == [25, 25]
    assert class_quotas([100, 100, 100], 50) == [17, 17, 16]
    assert class_quotas([400, 6], 50) == [44, 6]  # the rare class gives all it has, the rest goes on
    assert class_quotas([0, 30, 3], 20) == [0, 17, 3]
    assert class_quotas([4, 3], 50) == [4, 3]  # fewer texts than picks: every one


def test_balanced_margin_reaches_the_rare_predicted_class_where_margin_does_not(trained):
    # a skewed pool: 200 texts the model takes for neg, unsure (p(pos) 0.30-0.40), 10 it takes for pos, surer
    table = {f"common {i}": 0.30 + 0.0005 * i for i in range(200)}
    table |= {f"rare {i}": 0.80 + 0.01 * i for i in range(10)}
    args = (trained["record"]["id"], list(table), 10, trained["home"])
    plain = suggest(*args, strategy="margin-diversity", predictor=_Scripted(table))
    balanced = suggest(*args, strategy="balanced-margin", predictor=_Scripted(table))
    assert all(r["predicted"] == "neg" for r in plain), "plain uncertainty stays in the common class"
    assert [r["predicted"] for r in balanced].count("pos") == 5 and len(balanced) == 10
    rare = [r["text"] for r in balanced if r["predicted"] == "pos"]
    assert set(rare) <= {f"rare {i}" for i in range(10)} and "rare 0" in rare  # the least sure of them first
    margins = [r["margin"] for r in balanced]
    assert margins == sorted(margins) and [r["rank"] for r in balanced] == list(range(1, 11))
    assert len({r["cluster"] for r in balanced}) == 10 and {r["strategy"] for r in balanced} == {"balanced-margin"}
    assert balanced == suggest(*args, strategy="balanced-margin", predictor=_Scripted(table))  # seeded


def test_balanced_margin_on_the_real_model_gives_unlabelled_unique_rows(trained):
    rows = suggest(trained["record"]["id"], trained["pool"], 12, trained["home"], strategy="balanced-margin",
                   predictor=trained["predictor"])
    keys = [normalise(r["text"]) for r in rows]
    assert len(set(keys)) == 12 and not set(keys) & trained["labelled"]
    counts = [[r["predicted"] for r in rows].count(label) for label in trained["predictor"].labels]
    every = suggest(trained["record"]["id"], trained["pool"], 500, trained["home"], strategy="margin",
                    predictor=trained["predictor"])
    available = [[r["predicted"] for r in every].count(label) for label in trained["predictor"].labels]
    assert counts == class_quotas(available, 12)


class _Flat:
    """The run's predictor with flat probabilities: a head that has learned nothing yet."""

    def __init__(self, real) -> None:
        self.inner, self.labels = real, real.labels

    def probabilities(self, texts):
        return np.full((len(texts), len(self.labels)), 1.0 / len(self.labels))


def test_committee_ranks_by_a_probe_on_the_embeddings_where_the_head_is_flat(trained):
    from sklearn.linear_model import LogisticRegression

    from workbench.active import _labelled_rows

    flat = _Flat(trained["predictor"])
    args = (trained["record"]["id"], trained["pool"], 500, trained["home"])
    rows = suggest(*args, strategy="balanced-committee", predictor=flat)
    assert len(rows) == 80 and {r["strategy"] for r in rows} == {"balanced-committee"}
    assert all(r["scores"] == {"neg": 0.5, "pos": 0.5} for r in rows), "scores stay the model's own"
    # the committee's margin is half the probe's (the flat head adds nothing): refit the probe to check
    texts, labels = _labelled_rows(trained["record"])
    vectors = sentence_embeddings(flat, texts + [r["text"] for r in rows])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(
        unit[: len(texts)], [flat.labels.index(y) for y in labels])
    p = probe.predict_proba(unit[len(texts):])
    np.testing.assert_allclose([r["committee_margin"] for r in rows], np.abs(p[:, 1] - p[:, 0]) / 2, atol=1e-6)
    assert len({round(r["committee_margin"], 6) for r in rows}) > 40, "the probe tells the texts apart"
    plain = suggest(*args[:2], 10, args[3], strategy="balanced-margin", predictor=flat)
    assert "committee_margin" not in plain[0]
    few = suggest(*args[:2], 10, args[3], strategy="balanced-committee", predictor=flat)
    ranked = sorted(rows, key=lambda r: r["committee_margin"])
    assert np.mean([r["committee_margin"] for r in few]) < np.mean([r["committee_margin"] for r in ranked[40:]])


def test_typicality_is_highest_in_a_dense_group_and_lowest_for_an_outlier():
    from workbench.active import typicality

    rng = np.random.default_rng(0)
    dense = np.array([1.0, 0, 0, 0]) + 0.01 * rng.standard_normal((30, 4))
    features = np.vstack([dense, [[0.0, 0.0, 0.0, 1.0]]])
    typical = typicality(features, neighbours=5)
    assert typical.shape == (31,) and typical.max() == 1.0 and (typical > 0).all()
    assert typical[-1] == typical.min() and typical[-1] < 0.1 * typical[:30].min()
    assert typicality(features[:1]).tolist() == [1.0]  # one text: nothing to compare with


def test_balanced_density_passes_over_unsure_outliers_that_margin_picks(trained, monkeypatch):
    # 20 texts in one tight group of embeddings, fairly unsure (p(pos) 0.40); 10 outliers, each alone, unsurer
    import workbench.active as active

    rng = np.random.default_rng(1)
    table = {f"group {i}": 0.40 for i in range(20)} | {f"outlier {i}": 0.49 for i in range(10)}
    vectors = {f"group {i}": np.array([1.0, 0, 0, 0, 0, 0, 0, 0]) + 0.01 * rng.standard_normal(8) for i in range(20)}
    vectors |= {f"outlier {i}": rng.standard_normal(8) for i in range(10)}
    monkeypatch.setattr(active, "sentence_embeddings", lambda predictor, texts, **_: np.stack([vectors[t] for t in texts]))
    args = (trained["record"]["id"], list(table), 4, trained["home"])
    plain = suggest(*args, strategy="balanced-margin", predictor=_Scripted(table))
    dense = suggest(*args, strategy="balanced-density", predictor=_Scripted(table))
    assert all(r["text"].startswith("outlier") for r in plain), "margin alone picks the unsure outliers"
    assert all(r["text"].startswith("group") for r in dense), "density weighting picks typical texts"
    assert {r["strategy"] for r in dense} == {"balanced-density"} and [r["rank"] for r in dense] == [1, 2, 3, 4]
    assert all(0 < r["typicality"] <= 1 for r in dense) and "typicality" not in plain[0]
    assert dense == suggest(*args, strategy="balanced-density", predictor=_Scripted(table))  # deterministic


def test_balanced_density_on_the_real_model_gives_unlabelled_unique_rows_most_useful_first(trained):
    rows = suggest(trained["record"]["id"], trained["pool"], 12, trained["home"], strategy="balanced-density",
                   predictor=trained["predictor"])
    keys = [normalise(r["text"]) for r in rows]
    assert len(set(keys)) == 12 and not set(keys) & trained["labelled"]
    assert all("committee_margin" in r and 0 < r["typicality"] <= 1 for r in rows)
    ranked = [(1 - r["committee_margin"]) * r["typicality"] for r in rows]
    assert ranked == sorted(ranked, reverse=True), "most useful first: (1 - committee margin) x typicality"


def test_sentence_embeddings_are_the_models_mean_hidden_state(trained):
    predictor = trained["predictor"]
    assert hasattr(predictor, "inner"), "the run's calibrated predictor is unwrapped to reach its model"
    texts = trained["texts"][:5]
    features = sentence_embeddings(predictor, texts)
    assert features.shape == (5, 32)  # the tiny model's hidden size
    again = sentence_embeddings(predictor, texts[:2], batch_size=1)
    np.testing.assert_allclose(features[:2], again, atol=1e-5)
    assert np.linalg.matrix_rank(features) > 1


def test_suggest_reads_a_text_file_one_text_per_line(trained, tmp_path):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(["", trained["texts"][0], "  ", trained["texts"][1], trained["texts"][0]]),
                    encoding="utf-8")
    rows = suggest(trained["record"]["id"], pool, 5, trained["home"], strategy="margin")
    assert sorted(r["index"] for r in rows) == [1, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, r"n = 0 suggestions is not allowed: ask for 1 or more"),
    ({"strategy": "smart"}, r"strategy 'smart' is unknown: choose from balanced-density, balanced-margin, balanced-committee, "
                          r"margin-diversity, entropy-diversity"),
])
def test_suggest_refuses_bad_arguments(trained, kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        suggest(trained["record"]["id"], trained["pool"], **{"n": 5, "home": trained["home"], **kwargs})


def test_suggest_refuses_empty_and_fully_labelled_pools(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(WorkbenchError, match=r"the pool '.*empty.txt' holds no texts"):
        suggest(trained["record"]["id"], empty, 5, trained["home"])
    labelled = load_labelled(str(trained["dataset"]))[0][:5]
    with pytest.raises(WorkbenchError, match=r"every text in the pool \(a list of 5 texts\) \(5\) is already labelled"):
        suggest(trained["record"]["id"], labelled, 5, trained["home"])


def test_suggest_refuses_a_regression_run(trained):
    from workbench.store import RunStore

    store = RunStore(trained["home"])
    run_id = store.create_run({**trained["record"]["config"], "task": "text-regression"})
    with pytest.raises(WorkbenchError, match=r"is a text-regression run: suggestions rank texts by a "
                                             r"classifier's class probabilities; pick a text-classification run"):
        suggest(run_id, trained["pool"], 5, trained["home"])
    store.delete(run_id)


# --- appending labels, undo -------------------------------------------------------------------------------

def test_append_labels_keeps_the_encoding_columns_and_line_ending(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [{"id": "1", "text": "café crème", "label": "pos", "note": "x"}],
                      encoding="cp1252", newline="\r\n")
    before = path.read_bytes()
    assert append_labels(path, [{"text": "déjà vu, \"quoted\"", "label": "neg"}]) == 1
    raw = path.read_bytes()
    assert raw.startswith(before)
    assert raw[len(before):] == ',"déjà vu, ""quoted""",neg,\r\n'.encode("cp1252")
    df, encoding = read_file(path)
    assert encoding == "cp1252"
    assert df["text"].tolist() == ["café crème", 'déjà vu, "quoted"']
    assert df["id"].tolist() == ["1", ""]


def test_append_labels_to_jsonl_tsv_and_a_file_without_a_final_newline(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"sentence": "one", "category": "a"}', encoding="utf-8")  # no final newline
    append_labels(jsonl, [{"text": "two ✓", "label": "b"}, {"text": "three", "label": "a"}])
    assert [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()] == [
        {"sentence": "one", "category": "a"}, {"sentence": "two ✓", "category": "b"},
        {"sentence": "three", "category": "a"}]
    assert remove_last(jsonl, 2) == [{"text": "three", "label": "a"}, {"text": "two ✓", "label": "b"}]
    assert jsonl.read_text(encoding="utf-8") == '{"sentence": "one", "category": "a"}'
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\nfirst, with a comma\tx\n", encoding="utf-8")
    append_labels(tsv, [{"text": "second", "label": "y"}])
    assert tsv.read_text(encoding="utf-8") == "text\tlabel\nfirst, with a comma\tx\nsecond\ty\n"


def test_undo_survives_a_reload_and_touches_only_appended_rows(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [{"text": "old", "label": "a"}])
    original = path.read_bytes()
    append_labels(path, [{"text": "new 1", "label": "a"}])
    append_labels(path, [{"text": "new 2", "label": "b"}])
    # a reload: nothing but the files is kept
    assert appended_rows(path) == [{"text": "new 1", "label": "a"}, {"text": "new 2", "label": "b"}]
    assert remove_last(path) == [{"text": "new 2", "label": "b"}]
    assert remove_last(path) == [{"text": "new 1", "label": "a"}]
    assert path.read_bytes() == original
    with pytest.raises(WorkbenchError, match=r"only 0 labelled rows can be undone in 'd.csv', not 1"):
        remove_last(path)


def test_undo_refused_when_the_file_changed_after_the_labels(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [{"text": "old", "label": "a"}])
    append_labels(path, [{"text": "new", "label": "a"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write("hand written,b\n")
    with pytest.raises(WorkbenchError, match=r"changed after the last labelled row \(it is 15 bytes longer\)"):
        remove_last(path)
    assert path.read_text(encoding="utf-8").endswith("new,a\nhand written,b\n")


def test_a_crash_while_writing_leaves_the_file_whole(tmp_path, monkeypatch):
    path = _write_csv(tmp_path / "d.csv", [{"text": "old", "label": "a"}])
    append_labels(path, [{"text": "kept", "label": "a"}])
    before = path.read_bytes()
    (tmp_path / ".d.csv.abc123.tmp").write_bytes(b"text,label\nhalf writ")  # a temp file a crash left behind

    real_replace = os.replace

    def crash(src, dst):  # the journal is written, then the power goes before the data file is replaced
        if Path(dst) == path:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        append_labels(path, [{"text": "lost", "label": "b"}])
    monkeypatch.undo()
    assert path.read_bytes() == before
    texts, labels, _ = load_labelled(str(path))
    assert (texts, labels) == (["old", "kept"], ["a", "a"])
    # the journal was written before the data: its entry for the lost row is found unmatched and dropped
    assert appended_rows(path) == [{"text": "kept", "label": "a"}]
    append_labels(path, [{"text": "after", "label": "b"}])
    assert remove_last(path, 2) == [{"text": "after", "label": "b"}, {"text": "kept", "label": "a"}]
    assert load_labelled(str(path))[0] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.csv.abc123.tmp", journal_path(path).name, "d.csv"]


def test_a_damaged_journal_undoes_nothing_and_keeps_the_data(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [{"text": "old", "label": "a"}])
    append_labels(path, [{"text": "new", "label": "a"}])
    journal_path(path).write_text("{not json", encoding="utf-8")
    with pytest.raises(WorkbenchError, match="only 0 labelled rows can be undone"):
        remove_last(path)
    assert load_labelled(str(path))[0] == ["old", "new"]


@pytest.mark.parametrize("name, content, rows, message", [
    ("d.parquet", None, [{"text": "t", "label": "a"}], r"'d.parquet' is not plain CSV, TSV or JSONL"),
    ("d.csv", "text,label\nold,a\n", [{"text": " ", "label": "a"}], r"a labelled row needs a text and a label"),
    ("d.csv", "text,label\nold,a\n", [{"text": "t", "label": ""}], r"a labelled row needs a text and a label"),
    ("d.json", '[{"text": "old", "label": "a"}]', [{"text": "t", "label": "a"}], r"is one JSON array"),
    ("missing.csv", None, [{"text": "t", "label": "a"}], r"dataset file '.*missing.csv' not found"),
])
def test_append_labels_refusals(tmp_path, name, content, rows, message):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import pandas as pd

        pd.DataFrame({"text": ["old"], "label": ["a"]}).to_parquet(path)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(WorkbenchError, match=message):
        append_labels(path, rows)
    assert (path.read_bytes() if path.exists() else None) == before


def test_a_character_the_files_encoding_cannot_hold_is_refused(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [{"text": "café", "label": "a"}], encoding="cp1252")
    before = path.read_bytes()
    with pytest.raises(WorkbenchError, match=r"written in cp1252, which cannot hold a character of the text "
                                             r"'привет': save the dataset as UTF-8"):
        append_labels(path, [{"text": "привет", "label": "a"}])
    assert path.read_bytes() == before


# --- the learning curve -------------------------------------------------------------------------------

def test_learning_curve_shares_the_start_and_grows_each_strategy(tiny_model_dir, tmp_path):
    from workbench.config import Config

    rows = sentiment_rows(80, seed=5)
    test = _write_csv(tmp_path / "test.csv", rows[:20])
    pool = rows[20:] + rows[:3]  # three test rows in the pool: dropped
    config = Config.from_dict(_raw_config(tiny_model_dir, test, epochs=1))
    heard = []
    curve = learning_curve(config, pool, test, start=12, rounds=2, per_round=6, seed=0, home=tmp_path / "home",
                           workdir=tmp_path / "work", out=tmp_path / "curve.json",
                           on_point=lambda name, point: heard.append((name, point["labels"])))
    assert curve["pool_rows"] == 60 and curve["test_rows"] == 20
    assert set(curve["strategies"]) == {"balanced-density", "random"}
    for name, points in curve["strategies"].items():
        assert [p["labels"] for p in points] == [12, 18, 24]
        assert all(0.0 <= p["f1_macro"] <= 1.0 for p in points)
        assert curve["final"][name] == points[-1]["f1_macro"]
    assert curve["strategies"]["random"][0] == curve["strategies"]["balanced-density"][0]  # one start run
    assert len({p["run"] for points in curve["strategies"].values() for p in points}) == 5
    assert heard == [("balanced-density", 12), ("random", 12), ("balanced-density", 18), ("random", 18),
                     ("balanced-density", 24), ("random", 24)]  # round by round
    assert json.loads((tmp_path / "curve.json").read_text()) == curve
    grown = load_labelled(str(tmp_path / "work" / "balanced-density-24.csv"))[0]
    assert len(set(grown)) == 24 and not set(grown) & {r["text"] for r in rows[:20]}


def test_learning_curve_refuses_a_pool_too_small(tiny_model_dir, tmp_path):
    from workbench.config import Config

    rows = sentiment_rows(30)
    test = _write_csv(tmp_path / "test.csv", rows[:10])
    config = Config.from_dict(_raw_config(tiny_model_dir, test, epochs=1))
    with pytest.raises(WorkbenchError, match=r"the pool has 20 usable labelled rows .* fewer than the 110"):
        learning_curve(config, rows[10:], test, start=50, rounds=2, per_round=30, home=tmp_path / "home")


def test_every_strategy_has_a_title():
    assert all(s.title and s.name == name for name, s in STRATEGIES.items())


# --- the labelling widget (no browser: build, press, click, read traits) --------------------------------

@pytest.fixture
def labelling(trained, tmp_path):
    from widgets.labelling import LabellingWidget

    dataset = tmp_path / "labelled.csv"
    dataset.write_bytes(trained["dataset"].read_bytes())
    widget = LabellingWidget(trained["record"]["id"], trained["pool"], dataset, trained["home"], n=4,
                             background=False)
    return widget, dataset


def test_widget_shows_suggestions_with_a_button_per_class_and_the_strategy(labelling):
    widget, _ = labelling
    assert widget.labels == ["neg", "pos"]
    assert [b.description for b in widget._classes.children] == ["neg (1)", "pos (2)"]
    assert len(widget.suggestions) == 4 and widget.position == 0
    assert "balanced-density" in widget._title.value
    assert widget.current["text"] in widget._text.value or "&" in widget._text.value
    assert widget.key_listener.hint == "keys: 1-2 answer, s skip, u or Backspace undo"
    assert widget._undo.disabled  # nothing appended yet


def test_widget_answers_go_to_the_file_at_once_and_undo_takes_them_back(labelling):
    widget, dataset = labelling
    before = dataset.read_bytes()
    first, second = widget.suggestions[0]["text"], widget.suggestions[1]["text"]
    widget._classes.children[1].click()  # pos
    assert load_labelled(str(dataset))[0][-1] == first and load_labelled(str(dataset))[1][-1] == "pos"
    widget.key_listener._handle_custom_msg({"key": "s"}, [])  # skip the second
    widget.key_listener._handle_custom_msg({"key": "1"}, [])  # neg for the third
    assert (widget.position, widget.answered, widget.appended) == (3, 2, 2)
    assert second not in load_labelled(str(dataset))[0]
    widget.key_listener._handle_custom_msg({"key": "Backspace"}, [])
    assert widget.position == 2 and widget.appended == 1  # back on the text whose label was removed
    widget._undo.click()
    assert widget.position == 0 and dataset.read_bytes() == before
    widget.press("x")  # other keys do nothing
    assert widget.position == 0 and widget.error == ""


def test_widget_undo_after_a_reload_and_errors_inline(labelling, trained):
    from widgets.labelling import LabellingWidget

    widget, dataset = labelling
    widget.press("2")
    again = LabellingWidget(trained["record"]["id"], trained["pool"], dataset, trained["home"], n=4,
                            background=False)
    assert again.appended == 1 and not again._undo.disabled
    assert widget.suggestions[0]["text"] not in [r["text"] for r in again.suggestions]  # labelled: not suggested
    again.undo()
    assert again.appended == 0
    again.undo()
    assert again.error.startswith("only 0 labelled rows can be undone")
    again.answer("maybe")  # a comm message may carry anything
    assert again.error == "label 'maybe' is not one of the run's classes (neg, pos)"
    broken = LabellingWidget("no-such-run", trained["pool"], dataset, trained["home"], background=False)
    assert broken.error.startswith("no run 'no-such-run'")


def test_train_again_config_grows_the_file_and_continues_when_it_can(labelling):
    import dataclasses

    from workbench.config import TrainConfig

    widget, dataset = labelling
    config, continued = widget.next_config()
    assert config.data.source == str(dataset)
    assert continued == ("init_from" in {f.name for f in dataclasses.fields(TrainConfig)})
    if continued:
        assert (config.train.init_from, config.train.replay) == (widget.run_id, 0.0)


def test_widget_plot_reads_a_measured_curve_beside_the_file(labelling):
    from workbench.active import curve_file

    widget, dataset = labelling
    curve = {"strategies": {"margin-diversity": [{"labels": 40, "f1_macro": 0.6}, {"labels": 44, "f1_macro": 0.7}],
                            "random": [{"labels": 40, "f1_macro": 0.6}, {"labels": 44, "f1_macro": 0.65}]}}
    curve_file(dataset).write_text(json.dumps(curve), encoding="utf-8")
    widget.draw_curve()
    mine, suggested, random_ = widget.fig.data
    assert list(suggested.y) == [0.6, 0.7] and list(random_.x) == [40, 44]
    assert suggested.name == "measured: margin-diversity"


def test_widget_in_the_dashboard_follows_a_run_and_picks_files_from_the_uploads(trained, tmp_path):
    import shutil

    import traitlets as T

    from widgets.labelling import LabellingWidget

    store_home = tmp_path / "home"
    shutil.copytree(trained["home"], store_home)
    uploads = store_home / "uploads"
    uploads.mkdir()
    shutil.copy(trained["pool"], uploads / "pool.csv")
    dataset = shutil.copy(trained["dataset"], uploads / "labelled.csv")
    widget = LabellingWidget(None, home=store_home, n=3, background=False, uploads=True)
    leader = T.HasTraits()
    leader.add_traits(run_id=T.Unicode(""))
    T.dlink((leader, "run_id"), (widget, "run_id"))
    pool_choice, dataset_choice = widget._files.children[0].children[:2]
    assert [v for _, v in pool_choice.options] == ["", str(uploads / "labelled.csv"), str(uploads / "pool.csv")] \
        or sorted(v for _, v in pool_choice.options) == ["", str(uploads / "labelled.csv"), str(uploads / "pool.csv")]
    from workbench.store import RunStore

    queued = RunStore(store_home).create_run(trained["record"]["config"])
    leader.run_id = queued
    assert widget.suggestions == [] and f"run {queued} is queued" in widget._info.value
    leader.run_id = trained["record"]["id"]
    assert widget.error == "no pool: choose a file of unlabelled texts"
    pool_choice.value = str(uploads / "pool.csv")
    assert len(widget.suggestions) == 3 and widget.error == ""
    assert widget.dataset_path == trained["dataset"]  # the run's own data file, until another is chosen
    dataset_choice.value = str(dataset)
    widget.press("1")
    assert load_labelled(str(dataset))[0][-1] == widget.suggestions[0]["text"]
