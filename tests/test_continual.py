"""Continual learning (train.init_from + train.replay): a run starts from a completed run's weights, mixes in
a share of its training rows, and records how the previous run's eval split scores before and after."""

from __future__ import annotations

import csv
import json

import pytest

from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.run_paths import RunPaths

from conftest import sentiment_rows


def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def first_and_second(tmp_path_factory, tiny_model_dir):
    from workbench.config import Config
    from workbench.store import RunStore

    root = tmp_path_factory.mktemp("continual")
    store = RunStore(root / "home")
    old = _csv(root / "old.csv", sentiment_rows(96, seed=0))
    new = _csv(root / "new.csv", sentiment_rows(64, seed=7))

    def config(source, **train_extra):
        return Config.from_dict({
            "model": str(tiny_model_dir), "data": {"source": str(source), "eval_fraction": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                      "early_stopping_patience": 0, "threads": 1, **train_extra},
            "track": {"wandb": "disabled", "tensorboard": False}})

    first = train(config(old), store=store)
    second = train(config(new, init_from="latest", replay=0.5), store=store)
    return store, first, second, config, new


def test_the_continued_run_starts_from_the_previous_weights_and_replays_its_rows(first_and_second):
    store, first, second, _, _ = first_and_second
    assert first["status"] == "completed" and second["status"] == "completed"
    assert second["config"]["train"]["init_from"] == first["id"], "'latest' is stored as the run it named"
    continued = second["info"]["continued"]
    assert continued["from"] == first["id"] and continued["replay"] == 0.5
    assert continued["replayed_rows"] == round(0.5 * continued["new_rows"]) and continued["replayed_rows"] > 0
    assert second["info"]["train_rows"] == continued["new_rows"] + continued["replayed_rows"]


def test_the_record_says_how_the_previous_eval_split_scored_before_and_after(first_and_second):
    _, first, second, _, _ = first_and_second
    forgetting = second["metrics"]["forgetting"]
    assert forgetting["run"] == first["id"]
    # before = the weights it started from, on the previous run's own eval rows: the previous run's best figure
    assert forgetting["before"]["accuracy"] == pytest.approx(first["metrics"]["accuracy"], abs=1e-6)
    assert forgetting["change"]["accuracy"] == pytest.approx(
        forgetting["after"]["accuracy"] - forgetting["before"]["accuracy"], abs=1e-6)


def test_a_continuation_that_does_not_match_the_previous_run_is_refused(first_and_second, tmp_path):
    store, first, _, config, new = first_and_second
    from workbench.loop import preflight

    wrong_method = config(new, init_from=first["id"])
    wrong_method.method.name = "full"
    with pytest.raises(WorkbenchError, match="set method.name: lora"):
        preflight(wrong_method, store.home)  # before a run is registered (the CLI's check)
    failed = train(wrong_method, store=store)
    assert failed["status"] == "failed" and "set method.name: lora" in failed["error"]
    three = _csv(tmp_path / "three.csv", [*sentiment_rows(40), *({"text": f"so so {i}", "label": "meh"}
                                                                  for i in range(12))])
    with pytest.raises(WorkbenchError, match="same classes"):
        preflight(config(three, init_from=first["id"]), store.home)


def test_cli_train_from_a_run_continues_it_on_new_data(first_and_second, capsys):
    from workbench.cli import main

    store, first, _, _, new = first_and_second
    code = main(["--home", str(store.home), "train", "--from", first["id"], "--set", f"data.source={new}",
                 "--set", "train.epochs=1", "--json"])
    out = capsys.readouterr().out
    record = json.loads(out[out.index("{"):])
    assert code == 0 and record["status"] == "completed"
    assert record["config"]["train"]["init_from"] == first["id"] and record["config"]["data"]["source"] == str(new)
    assert set(record["metrics"]["forgetting"]["after"]) >= {"accuracy", "f1_macro"}
    code = main(["--home", str(store.home), "train", "--from", "no-such-run"])
    assert code == 2 and "no-such-run" in capsys.readouterr().err
