"""Epochs and early-stopping patience chosen for a small training set: enough passes to reach the task's target
steps (2 to MAX_EPOCHS), and early stopping that waits out the warmup those passes imply."""

from __future__ import annotations

import math

import pytest

from workbench.config import Config
from workbench.loop import train
from workbench.loop.defaults import MAX_EPOCHS, MIN_EPOCHS, choose_before_build, evaluations_in_warmup


def _choose(rows: int, **train_fields):
    config = Config.from_dict({"train": {"batch_size": 16, **train_fields}})
    chosen, decisions = choose_before_build(config, rows, 1, None, 0)
    return chosen.train, {d["field"]: d for d in decisions}


def test_the_cap_is_forty_epochs():
    assert (MIN_EPOCHS, MAX_EPOCHS) == (2, 40)


@pytest.mark.parametrize("rows, epochs, patience", [
    (80, 40, 5),       # 5 steps an epoch: 200 steps; warmup 20 steps, evaluations at 5, 10 and 15 before it
    (200, 24, 4),      # 13 steps an epoch: 312 steps; warmup 32, evaluations at 13 and 26
    (8, 40, 5),        # 1 step an epoch: the cap; warmup 4 steps, evaluations at 1, 2 and 3
    (1000, 5, 2),      # 63 steps an epoch: 315 steps; the first evaluation (63) comes after the warmup (32)
    (100_000, 2, 2),   # the floor
])
def test_epochs_reach_the_target_steps_and_patience_waits_out_the_warmup(rows, epochs, patience):
    train_config, decisions = _choose(rows)
    assert (train_config.epochs, train_config.early_stopping_patience) == (epochs, patience)
    per_epoch = math.ceil(rows / 16)
    assert f"{epochs} epochs give {epochs * per_epoch} steps (the target: about 300 steps" in decisions["train.epochs"]["why"]
    if patience == 2:
        assert "train.early_stopping_patience" not in decisions
    else:
        why = decisions["train.early_stopping_patience"]["why"]
        assert f"spans {patience - 2} evaluations before the peak rate" in why and "waits 2 evaluations" in why


def test_evaluations_in_warmup_counts_those_before_the_peak():
    assert evaluations_in_warmup(0.1, 200, 5) == 3     # warmup ends at step 20: evaluations at 5, 10, 15
    assert evaluations_in_warmup(0.1, 200, 2) == 9     # train.eval_every 2
    assert evaluations_in_warmup(0.1, 315, 63) == 0
    assert evaluations_in_warmup(0.0, 200, 5) == 0


def test_patience_follows_eval_every():
    train_config, _ = _choose(80, eval_every=2)
    assert (train_config.epochs, train_config.early_stopping_patience) == (40, 11)


@pytest.mark.parametrize("fields, patience", [
    ({"epochs": 40}, 2),                          # epochs set: the user's schedule, patience untouched
    ({"early_stopping_patience": 0}, 0),          # early stopping off stays off
    ({"early_stopping_patience": 3}, 6),          # a set patience counts from the end of the warmup
    ({"warmup_ratio": 0.0}, 2),                   # no warmup, nothing to wait out
])
def test_patience_is_lengthened_only_for_chosen_epochs_and_live_early_stopping(fields, patience):
    train_config, decisions = _choose(80, **fields)
    assert train_config.early_stopping_patience == patience
    assert ("train.early_stopping_patience" in decisions) == (patience != fields.get("early_stopping_patience", 2))


def test_a_small_run_with_epochs_left_out_trains_past_its_warmup(tiny_config, store):
    # 96 rows, 72 for training at batch 8: 9 steps an epoch, 34 epochs, 306 steps, warmup 31 steps
    cfg = tiny_config(train={"epochs": None, "warmup_ratio": 0.1, "early_stopping_patience": 2})
    record = train(cfg, store=store)
    assert record["status"] == "completed", record["error"]
    fields = {d["field"]: d["value"] for d in record["info"]["decisions"]}
    assert (fields["train.epochs"], fields["train.early_stopping_patience"]) == (34, 5)
    stored = Config.from_dict(record["config"])  # resume and the record read the chosen values
    assert (stored.train.epochs, stored.train.early_stopping_patience) == (34, 5)
    warmup = math.ceil(0.1 * 34 * 9)
    assert warmup <= record["timings"]["steps"] <= 34 * 9  # never stopped while the rate was still rising
