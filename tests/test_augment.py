"""More rows from the rows a run has: augmentation (data.augment) and self-training (data.unlabeled_source +
data.pseudo_label_from): what each operation does, determinism, the record's counts, and the refusals."""

from __future__ import annotations

import random

import pytest

from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.loop.augment import augment_rows, embedding_neighbours, word_embeddings

from conftest import minilm_dir, sentiment_rows

TEXTS = ["the film was a quiet delight from start to end", "a dull slow story with no heart at all",
         "bright clever and warm", "nothing works here"]


def test_each_word_operation_does_what_it_says():
    near = {"film": "movie", "dull": "boring", "story": "tale"}
    for op, check in [
        ("swap", lambda old, new: sorted(old.split()) == sorted(new.split()) and old != new),
        ("delete", lambda old, new: set(new.split()) < set(old.split())),
        ("synonym", lambda old, new: any(w in new.split() for w in ("movie", "boring", "tale"))),
        ("insert", lambda old, new: len(new.split()) == len(old.split()) + 1),
    ]:
        texts, targets, report = augment_rows(TEXTS[:2], ["pos", "neg"], [op], 1.0, seed=3, neighbours=near)
        assert report["added"] == len(texts) == len(targets) > 0, op
        for new, target in zip(texts, targets):
            old = TEXTS[["pos", "neg"].index(target)]
            assert check(old, new), (op, old, new)


def test_augmentation_is_seeded_counts_rows_and_skips_rows_it_left_unchanged():
    a = augment_rows(TEXTS, [1.0, 2.0, 3.0, 4.0], ["swap", "delete"], 1.5, seed=7)
    b = augment_rows(TEXTS, [1.0, 2.0, 3.0, 4.0], ["swap", "delete"], 1.5, seed=7)
    assert a == b
    assert 4 <= a[2]["added"] <= 8 and sum(a[2]["by_operation"].values()) == a[2]["added"]
    assert all(e["augmented"] != e["original"] for e in a[2]["examples"])
    texts, _, report = augment_rows(["one"], ["x"], ["swap", "delete"], 3.0, seed=0)
    assert texts == [] and report["added"] == 0, "a one-word text cannot be swapped or shortened"


def test_back_translation_goes_through_the_translator_there_and_back():
    calls = []

    def translate(texts):
        calls.append(list(texts))
        return [t.replace("film", "picture") for t in texts]

    texts, targets, report = augment_rows(TEXTS[:1], ["pos"], ["back-translation"], 1.0, seed=0,
                                          translate=translate)
    assert calls == [TEXTS[:1]] and texts == [TEXTS[0].replace("film", "picture")] and targets == ["pos"]


def test_synonyms_come_from_the_models_own_word_embeddings():
    from workbench.catalog import ModelSource

    tokenizer, table = word_embeddings(ModelSource("minilm-l6", str(minilm_dir()), "catalog"))
    near = embedding_neighbours(tokenizer, table, {"film", "terrible", "Happy", "zzqx"})
    assert set(near) == {"film", "terrible", "Happy"} and near["Happy"][0].isupper()
    assert all(near[w].lower() != w.lower() and near[w].isalpha() for w in near)
    assert near["film"] in {"films", "movie", "cinema", "filmmaker", "filming", "filmed"}


def test_a_run_with_augmentation_trains_on_more_rows_and_says_so(tiny_config, store):
    from workbench.loop import train

    plain = train(tiny_config(train={"epochs": 1}), store=store)
    grown = train(tiny_config(train={"epochs": 1}, data={"augment": ["synonym", "swap", "delete"],
                                                         "augment_factor": 1.0}), store=store)
    report = grown["info"]["augmentation"]
    assert grown["status"] == "completed" and report["added"] > 0
    assert report["rows_before"] == plain["info"]["train_rows"]
    assert grown["info"]["train_rows"] == plain["info"]["train_rows"] + report["added"]
    assert grown["info"]["eval_rows"] == plain["info"]["eval_rows"], "the eval split is never augmented"
    assert report["examples"] and set(report["by_operation"]) == {"synonym", "swap", "delete"}


def test_self_training_adds_confident_pseudo_labels_counted_apart(tiny_config, store, tmp_path):
    from workbench.loop import train

    teacher = train(tiny_config(), store=store)
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(r["text"] + " again" for r in sentiment_rows(40, seed=11)), encoding="utf-8")
    student = train(tiny_config(train={"epochs": 1}, data={"unlabeled_source": str(pool),
                                                           "pseudo_label_from": teacher["id"],
                                                           "pseudo_label_threshold": 0.6}), store=store)
    report = student["info"]["self_training"]
    assert student["status"] == "completed" and report["run"] == teacher["id"] and report["pool"] == 40
    assert 0 < report["pseudo_labelled"] <= 40 and sum(report["per_class"].values()) == report["pseudo_labelled"]
    assert student["info"]["train_rows"] == report["gold_rows"] + report["pseudo_labelled"]


@pytest.mark.parametrize("raw, says", [
    ({"data": {"augment": ["back-translation"]}}, r"\[to, back\]"),
    ({"data": {"augment": ["swap"], "augment_factor": 0}}, "above 0"),
    ({"data": {"unlabeled_source": "pool.txt"}}, "pseudo_label_from"),
    ({"task": "token-classification", "data": {"source": "wnut-16", "augment": ["swap"]}}, "augmentation makes rows"),
])
def test_impossible_settings_are_refused_with_the_fix(raw, says):
    with pytest.raises(WorkbenchError, match=says):
        Config.from_dict(raw)
