"""A model collapsed onto one class is said so (record, CLI, widget); balanced class weights are available."""

from __future__ import annotations

import pytest
import torch

from workbench.metrics import collapse_note
from workbench.tasks.classification import ClassificationTask, balanced_weights


def test_a_collapsed_matrix_is_named_with_what_to_try():
    note = collapse_note(["neg", "neutral", "pos"], [[0, 0, 10], [0, 0, 26], [0, 1, 63]])
    assert note and "'pos' for 99% of the held-out rows (the true share is 64%)" in note
    assert "train.class_weights: balanced" in note
    assert collapse_note(["a", "b"], [[40, 10], [12, 38]]) is None
    assert collapse_note(["a", "b"], []) is None


def test_balanced_weights_are_scikit_learns():
    w = balanced_weights([0, 0, 0, 1], 3)  # class 2 absent from training: weight 1, never used
    assert w.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1), 1.0])


def test_weighted_loss_is_the_weighted_cross_entropy(tiny_config):
    from workbench.catalog import resolve_model
    from workbench.data import prepare
    from workbench.tasks.classification import collate

    cfg = tiny_config(train={"class_weights": "balanced"})
    task = ClassificationTask()
    split = prepare(cfg.data, cfg.train.seed)
    split.train_labels = [0] * (len(split.train_labels) - 6) + [1] * 6  # imbalanced on purpose
    built = task.build(cfg, resolve_model(cfg.model, cfg.data.source, False), split, None)
    assert built.class_weights is not None and built.class_weights[1] > built.class_weights[0]
    enc = built.encode(split.train_texts[:8], 32)
    batch = collate(built.tokenizer, enc, list(range(8)), [0, 1, 0, 1, 0, 0, 1, 0])
    built.model.eval()
    loss = task.loss(built, built.model, batch)
    logits = built.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], weight=built.class_weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-3)


def test_the_cli_summary_warns_about_a_collapsed_run(capsys):
    from workbench.cli import _print_summary  # noqa: PLC2701 - the summary printer under test

    _print_summary({"id": "r1", "status": "completed", "info": {}, "timings": {},
                    "metrics": {"accuracy": 0.64, "f1_macro": 0.26, "eval_loss": 0.9, "best_step": 4,
                                "collapsed": collapse_note(["neg", "pos"], [[0, 36], [0, 64]])}})
    out = capsys.readouterr().out
    assert "warning: the model predicts 'pos' for 100% of the held-out rows" in out
