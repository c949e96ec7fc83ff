"""Early stopping on a classifier: evaluations where the model answers every eval row with one class (still on
its first plateau) do not count toward patience; once it tells classes apart, patience counts as usual."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import sentiment_rows
from workbench.loop import train


def _eval_file(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": t, "label": ("neg", "pos")[i % 2]} for i, t in enumerate(texts))
    return path


def _stopped(store, record) -> bool:
    return "early_stop" in [p["event"] for p in store.points(record["id"], kind="event")]


def _run(tiny_config, store, eval_source: Path):
    # a rate too small to move the model: no evaluation improves on the first, so patience 1 stops a run at
    # the second evaluation unless those evaluations do not count; transformers' random head (a head fitted
    # as a probe on the training texts tells near-identical texts apart at its decision boundary)
    config = tiny_config(data={"eval_source": str(eval_source)},
                         train={"learning_rate": 1e-9, "eval_every": 2, "early_stopping_patience": 1, "epochs": 2,
                                "baseline": False, "ensemble": "off", "head_init": "random"})
    record = train(config, store=store)
    assert record["status"] == "completed", record.get("error")
    return record, [p["step"] for p in store.points(record["id"], kind="eval")]


def test_one_answer_for_every_eval_row_does_not_use_up_patience(tiny_config, store, tmp_path):
    # one review, as four texts that differ in a trailing mark only, labelled neg and pos in turn: the model
    # answers every row with one class, as a classifier on its first plateau does
    texts = ["the same review" + mark for mark in ("", ".", "!", "?")]
    record, steps = _run(tiny_config, store, _eval_file(tmp_path / "eval.csv", texts))
    assert not _stopped(store, record)
    assert steps == list(range(2, 25, 2))  # 72 training rows, batch 8, 2 epochs: every step trained
    assert {p["f1_macro"] for p in store.points(record["id"], kind="eval")} == {1 / 3}  # one class answered


def test_patience_still_stops_a_model_that_tells_classes_apart(tiny_config, store):
    # a rate that learns the tiny sentiment set: once the model answers both classes and stops improving,
    # one evaluation without improvement ends the run
    record = train(tiny_config(train={"learning_rate": 5e-3, "eval_every": 2, "early_stopping_patience": 1,
                                      "epochs": 6, "baseline": False, "ensemble": "off"}), store=store)
    evals = store.points(record["id"], kind="eval")
    assert record["status"] == "completed" and _stopped(store, record), [e["f1_macro"] for e in evals]
    assert evals[-1]["step"] < 54 and max(e["f1_macro"] for e in evals) > 0.5  # 9 steps an epoch, stopped early


def test_a_model_that_tells_classes_apart_beats_a_constant_answer_whatever_the_figure():
    from workbench.loop.checkpoints import Progress
    from workbench.loop.trainer import is_improvement

    first = Progress()
    assert is_improvement(first, 0.36, learned=False, greater_is_better=True)  # the first evaluation is the best
    constant = Progress(best_metric=0.567, best_step=8, best_learned=False)  # accuracy of answering the majority
    assert is_improvement(constant, 0.533, learned=True, greater_is_better=True)
    assert is_improvement(constant, 0.6, learned=False, greater_is_better=True)  # two constants: the figure
    told = Progress(best_metric=0.533, best_step=24, best_learned=True)
    assert not is_improvement(told, 0.9, learned=False, greater_is_better=True)
    assert not is_improvement(told, 0.533, learned=True, greater_is_better=True)  # strictly better only
    assert is_improvement(Progress(best_metric=0.7, best_learned=True), 0.6, learned=True, greater_is_better=False)
    older = {k: v for k, v in vars(Progress()).items() if k != "best_learned"}  # a checkpoint from before the field
    assert Progress(**older).best_learned
