"""The classical baseline in the UI (issue 19), headless: auto settings in the TrainPanel, the model beside
its baseline while a run trains and at the end (RunSummary, LossCurve, ConfusionMatrix, RunCompare), and
the Try-it tab scoring an uploaded labelled file on a worker thread."""

from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path

import pytest

from workbench import Config, RunStore, TrackConfig, TrainConfig

from conftest import sentiment_rows

LABELS = ["neg", "pos"]
BASELINE = {"method": "TF-IDF (word 1-2 + char 2-5 grams) + logistic regression", "class_weight": "none",
            "accuracy": 0.8, "f1_macro": 0.78, "seconds": 1.25,
            "variants": {"none": {"accuracy": 0.8, "f1_macro": 0.78}, "balanced": {"accuracy": 0.7, "f1_macro": 0.7}}}
DECISIONS = [{"field": "train.epochs", "value": 4, "why": "72 training rows make 9 optimiser steps an epoch"},
             {"field": "train.max_length", "value": 64, "why": "90% of the training texts have at most 41 tokens"}]
TRUNCATION = {"texts_measured": 72, "texts_cut": 3, "share_cut": 0.0417, "max_length": 64, "mode": "head+tail",
              "longest_tokens": 90}


def start_run(store: RunStore, name: str = "run") -> str:
    """A running run whose record holds what a real one holds once its baseline is fitted."""
    run_id = store.create_run(Config(name=name).to_dict(), name)
    store.mark_running(run_id)
    store.set_info(run_id, {"trainable_params": 1000, "total_params": 100000, "trainable_percent": 1.0,
                            "decisions": DECISIONS, "truncation": TRUNCATION, "baseline": BASELINE})
    store.add_point(run_id, "event", 0, {"event": "train_begin", "max_steps": 10, "warmup_steps": 1,
                                         "steps_per_epoch": 5, "resumed_from_step": 0})
    for step in range(1, 6):
        store.add_point(run_id, "train", step, {"loss": 1.0 / step, "learning_rate": 1e-3, "samples_per_second": 9.0,
                                                "epoch": 0, "max_steps": 10})
    store.add_point(run_id, "eval", 5, {"accuracy": 0.7, "f1_macro": 0.65, "eval_loss": 0.6, "labels": LABELS,
                                        "confusion_matrix": [[3, 2], [1, 4]], "per_class": {}, "is_best": True})
    return run_id


def finish_run(store: RunStore, run_id: str, by: str = "fine-tuned") -> None:
    ensemble = {"accuracy": 0.82, "f1_macro": 0.81, "members": ["fine-tuned", "classical"], "weights": [0.5, 0.5],
                "chosen": by == "ensemble"}
    answer = ensemble if by == "ensemble" else {"accuracy": 0.7, "f1_macro": 0.65}
    store.finish(run_id, "completed", metrics={
        "accuracy": 0.7, "f1_macro": 0.65, "best_step": 5, "baseline": BASELINE, "ensemble": ensemble,
        "answers_with": {"by": by, "accuracy": answer["accuracy"], "f1_macro": answer["f1_macro"], "metric": "accuracy",
                         "why": f"{by} scored accuracy {answer['accuracy']:.4f} on the eval split"}})


# --- TrainPanel: auto settings and the new choices ---------------------------------------------------------

def test_train_panel_leaves_epochs_rate_and_length_to_the_run_by_default(tmp_path: Path) -> None:
    from widgets import TrainPanel

    panel = TrainPanel(home=tmp_path / "home", background=False)
    assert (panel.epochs, panel.learning_rate, panel.max_length) == (None, None, None)
    assert panel.to_config() == TrainConfig() and panel.error == ""
    epochs = panel._controls["epochs"]
    assert epochs.auto.value is True and epochs.number.disabled  # the box greyed while auto
    epochs.auto.value = False  # untick: the number shown becomes the setting
    assert panel.epochs == epochs.number.value == 3 and panel.to_config().epochs == 3
    epochs.number.value = 5
    assert panel.to_config().epochs == 5
    epochs.number.value = 0  # explicit values are checked by the config, as before, inline
    assert "train.epochs = 0 is not allowed" in panel.error
    epochs.auto.value = True
    assert panel.epochs is None and panel.error == ""
    panel.max_length_limit = 32  # the model's context: no clash while max length is auto
    assert panel.max_length is None
    panel._controls["max_length"].auto.value = False  # the length shown was brought within the limit
    assert panel.max_length == 32 and panel.to_config().max_length == 32


def test_train_panel_round_trips_the_new_choices(tmp_path: Path) -> None:
    from widgets import TrainPanel

    panel = TrainPanel(home=tmp_path / "home", background=False)
    assert {n: getattr(panel, n) for n in ("class_weights", "best_metric", "baseline", "ensemble", "truncation")} == {
        "class_weights": "auto", "best_metric": "auto", "baseline": True, "ensemble": "auto", "truncation": "head+tail"}
    cfg = TrainConfig(epochs=4, learning_rate=2e-4, max_length=96, class_weights="balanced", best_metric="f1_macro",
                      baseline=False, ensemble="off", truncation="head")
    panel.from_config(cfg, TrackConfig())
    assert panel.to_config() == cfg
    assert panel._controls["epochs"].auto.value is False and panel._controls["epochs"].number.value == 4
    assert panel._controls["class_weights"].value == "balanced" and panel._controls["baseline"].value is False
    panel._controls["truncation"].value = "head+tail"  # the control drives the config
    panel._controls["baseline"].value = True
    assert panel.to_config().truncation == "head+tail" and panel.to_config().baseline is True
    panel.from_config(TrainConfig())  # back to auto everywhere
    assert panel.to_config() == TrainConfig() and panel._controls["learning_rate"].auto.value is True
    assert "f1_macro when the training classes are skewed" in panel._help.value  # the config's own help


def test_dashboard_estimate_assumes_the_longest_auto_length(tmp_path: Path) -> None:
    from workbench.loop.defaults import CPU_MAX_LENGTH

    from widgets import Dashboard

    dash = Dashboard(home=tmp_path / "home", background=False)
    assert dash.train.max_length is None and dash.method.max_length == CPU_MAX_LENGTH
    dash.train.max_length = 48
    assert dash.method.max_length == 48
    assert dash.config().train.epochs is None  # a run started from the page chooses them from its data


# --- the model beside its baseline ---------------------------------------------------------------------------

def test_run_summary_shows_the_baseline_while_training_and_the_answer_at_the_end(tmp_path: Path) -> None:
    from widgets import Dashboard

    store = RunStore(tmp_path / "home")
    run_id = start_run(store)
    dash = Dashboard(home=store.home, background=False)
    summary = dash.summary
    dash.train.run_id = run_id  # what Start (or following a run) sets: the summary follows
    assert summary.run_id == run_id and summary.refresh() is True
    assert summary.baseline["accuracy"] == 0.8 and summary.model["accuracy"] == 0.7 and summary.note == ""
    html = summary._figures.value
    assert "classical baseline" in html and "accuracy 0.800, macro-F1 0.780" in html
    assert "accuracy 0.700, macro-F1 0.650" in html and "while it trains" in html
    assert [d["field"] for d in summary.decisions] == ["train.epochs", "train.max_length"]
    assert "72 training rows" in summary._choices.value and "3 of 72 training texts" in summary._choices.value

    finish_run(store, run_id)
    assert summary.refresh() is False and summary.answers_with["by"] == "fine-tuned"
    assert summary.note.startswith("the classical baseline (TF-IDF + logistic regression")
    assert "answers with: fine-tuned" in summary._answer.value and "scores higher" in summary._answer.value
    assert "0.5 x model + 0.5 x baseline" in summary._figures.value


def test_run_summary_says_nothing_against_a_model_that_wins(tmp_path: Path) -> None:
    from widgets import RunSummary

    store = RunStore(tmp_path / "home")
    run_id = start_run(store)
    finish_run(store, run_id, by="ensemble")
    summary = RunSummary(store=store, run_id=run_id, background=False)
    assert summary.note == "" and summary.answers_with["by"] == "ensemble"
    answers = [row[0] for row in summary.rows() if row[2] == "answers"]
    assert answers == ["ensemble (0.5 x model + 0.5 x baseline probabilities)"]


def test_loss_curve_draws_the_baseline_as_flat_reference_lines(tmp_path: Path) -> None:
    from widgets import LossCurve

    store = RunStore(tmp_path / "home")
    run_id = start_run(store)
    curve = LossCurve(store=store, run_ids=[run_id], background=False)
    *_, acc, best, f1, base_acc, base_f1 = curve.fig.data
    assert list(base_acc.x) == [0, 10] and list(base_acc.y) == [0.8, 0.8] and base_acc.line.dash == "dash"
    assert list(base_f1.y) == [0.78, 0.78] and list(f1.y) == [0.65] and list(acc.y) == [0.7]
    assert "classical baseline accuracy 0.800, macro-F1 0.780" in curve._info.value
    store.add_point(run_id, "train", 12, {"loss": 0.1, "epoch": 2, "max_steps": 12})  # the run went on
    curve.refresh()
    assert list(curve.fig.data[6].x) == [0, 12], "whole arrays replaced"
    state = curve.fig.get_state()["_widget_data"]  # a page opened late (Voila) draws the line too
    assert state[6]["y"] == [0.8, 0.8]


def test_confusion_matrix_and_compare_show_the_baseline(tmp_path: Path) -> None:
    from widgets import ConfusionMatrix, RunCompare

    store = RunStore(tmp_path / "home")
    run_id = start_run(store)
    matrix = ConfusionMatrix(store=store, run_id=run_id, background=False)
    assert "accuracy 0.700, macro-F1 0.650 (classical baseline: accuracy 0.800, macro-F1 0.780)" in matrix._title.value
    finish_run(store, run_id, by="ensemble")
    compare = RunCompare(store=store, background=False)
    table = compare._table.value
    for header in ("baseline acc.", "baseline F1", "answers with"):
        assert f">{header}<" in table
    assert ">0.8<" in table and ">0.78<" in table and ">ensemble (0.8200 / 0.8100)<" in table
    compare.sort_by = "baseline accuracy"
    assert compare.sorted_runs()[0]["id"] == run_id


# --- Try it: score an uploaded labelled file ---------------------------------------------------------------

def _upload(name: str, content: bytes) -> tuple[dict]:
    return ({"name": name, "type": "text/csv", "size": len(content), "content": memoryview(content),
             "last_modified": datetime.datetime.now(datetime.timezone.utc)},)


def _csv_bytes(rows: list[dict[str, str]], names: tuple[str, str] = ("review", "verdict")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(names)
    writer.writerows([[r["text"], r["label"]] for r in rows])
    return out.getvalue().encode()


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_csv, tmp_path_factory):
    """A real tiny run (2-layer BERT) with its classical baseline."""
    from workbench.loop import train

    store = RunStore(tmp_path_factory.mktemp("try-home"))
    config = Config.from_dict({
        "model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    return store, record


def test_playground_scores_an_uploaded_test_file_beside_the_baseline(trained) -> None:
    from widgets import Playground

    store, record = trained
    play = Playground(store=store, background=True)  # the real worker thread: the kernel stays free
    assert play.run_id == record["id"]
    assert "macro-F1" in play._run.options[0][0]
    play._upload.value = _upload("held-out.csv", _csv_bytes(sentiment_rows(20, seed=3)))
    assert play._upload.value == ()  # the bytes are not kept in the widget
    thread_done = _wait(lambda: not play.evaluating)
    assert thread_done and play.evaluation_error == "", play.evaluation_error
    result = play.evaluation
    assert result["rows"] == 20 and (result["text_column"], result["label_column"]) == ("review", "verdict")
    html = play._evaluation_html.value
    assert "the run&#x27;s answer" in html and "classical baseline" in html and "predicted pos" in html
    assert f"{result['accuracy']:.3f}" in html and f"{result['baseline']['f1_macro']:.3f}" in html
    if result["answers_with"] == "ensemble":
        assert "the fine-tuned model alone" in html
    assert (store.home / "uploads" / "held-out.csv").is_file()


@pytest.mark.parametrize("name, content, expected", [
    ("notes.txt", b"text,label\nfine,pos\n", "unsupported type '.txt'"),
    ("empty.csv", b"   ", "is empty"),
    ("other.csv", _csv_bytes([{"text": "fine film", "label": "meh"}, {"text": "good", "label": "pos"}]),
     "are not among the run's labels"),
    ("broken.jsonl", b'{"text": "a", "label": "pos"}\n{not json\n', "broken.jsonl"),
])
def test_playground_bad_files_get_one_line(trained, name, content, expected) -> None:
    from widgets import Playground

    store, _ = trained
    play = Playground(store=store, background=False)
    play._upload.value = _upload(name, content)
    assert expected in play.evaluation_error and "\n" not in play.evaluation_error
    assert "Traceback" not in play._evaluation_html.value and play.evaluation is None and not play.evaluating


def test_a_read_only_dashboard_has_no_test_file_upload(tmp_path: Path) -> None:
    from widgets import Dashboard

    viewer = Dashboard(home=tmp_path / "home", background=False, read_only=True)
    assert viewer.playground._upload is None
    assert viewer.summary in viewer.tabs.children[1].children  # the Watch tab shows the baseline too


def _wait(done, timeout: float = 60.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return False

