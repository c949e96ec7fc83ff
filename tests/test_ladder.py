"""The method ladder: rungs on the same split and seed, the table files, stop and resume, the CLI, the widget."""

from __future__ import annotations

import csv
import json

import pytest

from workbench.callbacks import Callback
from workbench.errors import WorkbenchError
from workbench.ladder import (DEFAULT_LEARNING_RATES, format_table, ladder_dir, load_ladder, request_stop,
                              resume_ladder, run_ladder)

CHEAP = "zero-shot-embedding,head-only,lora"


@pytest.fixture
def one_epoch(tiny_config):
    return lambda **kw: tiny_config(train={"epochs": 1, **kw})


class Events(Callback):
    """Records (run id, event) pairs; can ask the loop to stop at a chosen step of a chosen method."""

    def __init__(self, stop_method: str | None = None, stop_step: int = 0) -> None:
        self.events: list[tuple[str, str]] = []
        self.stop_method, self.stop_step = stop_method, stop_step
        self.method = ""

    def on_train_begin(self, state, config):
        self.method = config["method"]["name"]
        self.events.append((self.method, f"begin@{state.global_step}"))

    def on_step_end(self, state, control, loss, learning_rate, samples_per_second):
        if self.method == self.stop_method and state.global_step == self.stop_step:
            control.request_stop("stop requested")  # what Ctrl-C / SIGTERM does through the trainer's handler

    def on_train_end(self, state, status, metrics):
        self.events.append((self.method, status))


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_csv, tmp_path_factory):
    """One completed three-rung ladder, shared by the tests that only read it."""
    from workbench.config import Config
    from workbench.store import RunStore

    config = Config.from_dict({
        "model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
        "train": {"epochs": 1, "batch_size": 8, "max_length": 32, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})
    store, events = RunStore(tmp_path_factory.mktemp("ladder-home")), Events()
    return run_ladder(config, CHEAP, home=store.home, callbacks=[events]), store, events


def test_a_ladder_runs_each_rung_on_the_same_split_and_writes_its_table(finished):
    ladder, store, events = finished
    assert ladder["status"] == "completed" and ladder["error"] is None
    assert [e for e in events.events if e[1] == "completed"] == [(m, "completed") for m in CHEAP.split(",")]
    rows = ladder["rows"]
    assert [r["method"] for r in rows] == CHEAP.split(",") and all(r["status"] == "completed" for r in rows)
    records = [store.get(r["run_id"]) for r in rows]
    assert [r["name"] for r in records] == [f"{ladder['id']}/{m}" for m in CHEAP.split(",")]
    assert len({json.dumps(r["info"]["train_label_counts"]) for r in records}) == 1, "one split for every rung"
    assert {r["config"]["train"]["seed"] for r in records} == {42}
    assert [r["learning_rate"] for r in rows] == [None, DEFAULT_LEARNING_RATES["head-only"],
                                                  DEFAULT_LEARNING_RATES["lora"]]
    zero, head, lora = rows
    assert zero["trainable_params"] == 0 and 0 < head["trainable_params"] < lora["trainable_params"]
    assert all(r["accuracy"] is not None and r["wall_seconds"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    directory = ladder_dir(ladder["id"], store.home)
    saved = json.loads((directory / "ladder.json").read_text())
    assert saved["rows"] == rows and saved["status"] == "completed"
    table = list(csv.DictReader((directory / "ladder.csv").open()))
    assert [t["method"] for t in table][:3] == CHEAP.split(",") and float(table[1]["accuracy"]) == head["accuracy"]
    text = format_table(rows)
    assert text.splitlines()[0].split()[:5] == ["method", "model", "status", "accuracy", "macro-F1"]
    assert "zero-shot-embedding" in text and "head-only" in text


def test_the_table_has_the_classical_baseline_and_the_ensemble_of_the_best_rung(finished):
    """Under the rungs: the classical baseline every rung fitted on the shared split (0 trainable parameters,
    its fitting time), and the best trained rung's probabilities averaged with the baseline's at the share
    that run chose on its eval split (the same weighting the run answers with)."""
    import numpy as np

    ladder, store, _ = finished
    classical, ensemble = ladder["references"]
    assert (classical["method"], ensemble["method"]) == ("classical", "ensemble")
    head = store.get(ladder["rows"][1]["run_id"])  # the first trained rung gives the baseline
    base = head["metrics"]["baseline"]
    assert (classical["accuracy"], classical["f1_macro"]) == (base["accuracy"], base["f1_macro"])
    assert classical["trainable_params"] == 0 and classical["wall_seconds"] == base["seconds"]
    assert classical["run_id"] == head["id"] and classical["status"] == "completed"
    trained = [store.get(r["run_id"]) for r in ladder["rows"][1:]]
    best = max(trained, key=lambda rec: rec["metrics"]["accuracy"])
    saved = json.loads(open(best["metrics"]["predictions_file"]).read())
    probs = np.asarray(json.loads((store.run_dir(best["id"]) / "classical" / "eval_probabilities.json")
                                  .read_text())["probabilities"])
    y = [saved["labels"].index(r["true"]) for r in saved["rows"]]
    share, rest = best["metrics"]["ensemble"]["weights"]
    assert share in (0.75, 0.5, 0.25) and share + rest == pytest.approx(1.0)
    mean = share * np.asarray([r["scores"] for r in saved["rows"]]) + rest * probs
    assert ensemble["accuracy"] == pytest.approx(float(np.mean(mean.argmax(axis=1) == y)))
    assert ensemble["note"].startswith(f"{share:g} x {best['config']['method']['name']} + {rest:g} x classical; ")
    assert ensemble["run_id"] == best["id"] and ensemble["model"] == f"{best['config']['method']['name']} + classical"
    beats = ensemble["accuracy"] > max(best["metrics"]["accuracy"], classical["accuracy"])
    assert ("beats both members" if beats else "does not beat") in ensemble["note"]
    table = list(csv.DictReader((ladder_dir(ladder["id"], store.home) / "ladder.csv").open()))
    assert [t["method"] for t in table] == [*CHEAP.split(","), "classical", "ensemble"]
    text = format_table(ladder["rows"] + ladder["references"])
    assert text.splitlines()[4].startswith("classical") and text.splitlines()[-1].startswith("ensemble: ")


def test_a_stopped_ladder_resumes_where_it_stopped(one_epoch, store):
    first = Events(stop_method="head-only", stop_step=3)
    ladder = run_ladder(one_epoch(), CHEAP, home=store.home, callbacks=[first])
    assert ladder["status"] == "stopped"
    assert [r["status"] for r in ladder["rows"]] == ["completed", "stopped", "pending"]
    done = store.get(ladder["rows"][0]["run_id"])

    again = Events()
    resumed = resume_ladder(ladder["id"][:10], home=store.home, callbacks=[again])
    assert resumed["status"] == "completed" and [r["status"] for r in resumed["rows"]] == ["completed"] * 3
    assert again.events == [("head-only", "begin@3"), ("head-only", "completed"), ("lora", "begin@0"),
                            ("lora", "completed")], "the completed rung is skipped, the stopped one resumes"
    assert store.get(done["id"])["ended_at"] == done["ended_at"]
    assert resumed["rows"][1]["run_id"] == ladder["rows"][1]["run_id"], "the stopped rung keeps its run"
    with pytest.raises(WorkbenchError, match=r"ladder .* is completed: nothing to resume"):
        resume_ladder(ladder["id"], home=store.home)


def test_request_stop_ends_the_ladder_before_the_next_rung(one_epoch, store):
    class StopAfterFirst(Callback):
        def on_train_end(self, state, status, metrics):
            request_stop("latest", store.home)  # what the widget's Stop does, from any process

    ladder = run_ladder(one_epoch(), "zero-shot-embedding,head-only", home=store.home, callbacks=[StopAfterFirst()])
    assert ladder["status"] == "stopped" and [r["status"] for r in ladder["rows"]] == ["completed", "pending"]
    assert not (ladder_dir(ladder["id"], store.home) / "STOP").exists()
    assert load_ladder("latest", store.home)["status"] == "stopped"


@pytest.mark.parametrize("methods, kwargs, message", [
    ("lora,lorra", {}, r"method 'lorra' is unknown: did you mean 'lora'\? choose from full, head-only"),
    ("lora,lora", {}, r"method 'lora' is listed twice: a ladder runs each method once"),
    (" , ", {}, r"a ladder needs at least one method"),
    ("lora", {"learning_rates": {"full": 1e-5}}, r"learning_rates names 'full', which is not a rung of this ladder"),
    ("lora", {"callbacks": [Callback()], "isolate": True}, r"callbacks run in this process: use isolate=False"),
    ("zero-shot-prompt", {"models": {"zero-shot-prompt": "/no/such/model"}},
     r"ladder rung zero-shot-prompt: model directory '/no/such/model' not found"),
])
def test_bad_ladders_are_refused_before_any_run(one_epoch, store, methods, kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        run_ladder(one_epoch(), methods, home=store.home, **kwargs)
    assert store.list() == []


def test_cli_ladder_in_process_prints_the_table_and_lists_ladders(one_epoch, tmp_path, capsys):
    from workbench.cli import main

    path = tmp_path / "config.yaml"
    one_epoch().save(path)
    home = str(tmp_path / "home")
    code = main(["--home", home, "ladder", str(path), "--methods", "zero-shot-embedding,head-only", "--in-process",
                 "--lr", "head-only=3e-3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "accuracy" in out and "head-only" in out and "ladder.csv" in out
    assert "\nclassical " in out and "\nclassical: fitted on run" in out  # the baseline's row and its note
    ladder = load_ladder("latest", home)
    assert ladder["rungs"][1]["learning_rate"] == 3e-3 and ladder["isolate"] is False
    assert main(["--home", home, "ladder", "--list"]) == 0
    assert ladder["id"] in capsys.readouterr().out


def test_default_methods_follow_the_model_kind(one_epoch, tmp_path):
    """A causal LM has no head to train alone: its default ladder starts from the prompt baseline instead."""
    from transformers import LlamaConfig

    from workbench.ladder import CAUSAL_LM_METHODS, DEFAULT_METHODS, default_methods

    assert default_methods(one_epoch(), tmp_path) == DEFAULT_METHODS
    llm = tmp_path / "tiny-llm"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(llm)  # config.json only
    config = one_epoch()
    config.model = str(llm)
    assert default_methods(config, tmp_path) == CAUSAL_LM_METHODS
    assert "head-only" not in CAUSAL_LM_METHODS and CAUSAL_LM_METHODS[0] == "zero-shot-prompt"


def test_a_learning_rate_in_the_file_goes_to_the_files_method_only(one_epoch):
    """bbc-lora.yaml's 5e-4 suits LoRA; given to every rung it wrecked full fine-tuning and starved prompt
    tuning (session 2's ladder). --set train.learning_rate still means every rung."""
    from workbench.cli import ladder_rates

    config = one_epoch(learning_rate=5e-4)  # method lora
    methods = ["zero-shot-embedding", "lora", "full", "prompt-tuning"]
    assert ladder_rates(config, methods, rate_in_file=True, overrides=[]) == {"lora": 5e-4}
    assert ladder_rates(config, methods, rate_in_file=False, overrides=[]) == {}
    assert ladder_rates(config, ["full"], rate_in_file=True, overrides=[]) == {}
    every = ladder_rates(config, methods, rate_in_file=True, overrides=["data.max_train_samples=8",
                                                                        "train.learning_rate = 5e-4"])
    assert every == {"lora": 5e-4, "full": 5e-4, "prompt-tuning": 5e-4}


@pytest.mark.parametrize("argv, message", [
    (["ladder"], "error: ladder needs a config file: workbench ladder CONFIG"),
    (["ladder", "--resume", "nope"], "error: no ladder 'nope' in"),
    (["ladder", "CFG", "--lr", "lora"], "error: 'lora' must look like METHOD=VALUE"),
    (["ladder", "CFG", "--lr", "lora=fast"], "error: 'lora=fast': 'fast' is not a number"),
])
def test_cli_ladder_bad_input_is_one_line(one_epoch, tmp_path, capsys, argv, message):
    from workbench.cli import main

    path = tmp_path / "config.yaml"
    one_epoch().save(path)
    argv = [str(path) if a == "CFG" else a for a in argv]
    assert main(["--home", str(tmp_path / "home"), *argv, "--methods", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


# --- the widget --------------------------------------------------------------------------------------

def test_ladder_plot_labels_never_pile_up():
    from widgets.ladder import label_shifts, point_labels, text_positions

    rows = [{"method": "head-only", "trainable_params": 10}, {"method": "lora", "trainable_params": 50},
            {"method": "qlora", "trainable_params": 50}, {"method": "full", "trainable_params": 900}]
    assert point_labels(rows) == ["head-only", "lora / qlora", "", "full"]  # same count: one shared label
    assert label_shifts([0.59, 0.58]) == [0, -14]  # rotten-tomatoes' two baselines: the lower steps down
    assert label_shifts([0.34, 0.83]) == [0, 0]
    assert label_shifts([0.50, 0.52, 0.51]) == [-28, 0, -14]  # each below the one above it
    # bbc-news: prompt-tuning 157k, head-only 150k, ia3 164k cluster; lora 482k and full 22.7M stand alone
    assert text_positions([157_445, 149_765, 163_589, 481_541, 22_715_141]) == [
        "bottom center", "top center", "middle right", "top center", "top center"]


def test_method_ladder_widget_shows_a_finished_ladder(finished):
    from widgets import MethodLadder

    ladder, store, _ = finished
    panel = MethodLadder(home=store.home, background=False)
    try:
        assert panel.ladder_id == ladder["id"], "the newest ladder is shown"
        assert panel.refresh() is False and panel.status == "completed"
        assert [r["method"] for r in panel.rows] == CHEAP.split(",")
        assert "head-only" in panel._table.value and "zero-shot-embedding" in panel._table.value
        assert [r["method"] for r in panel.references] == ["classical", "ensemble"]
        assert ">classical<" in panel._table.value and ">ensemble<" in panel._table.value
        classical, ensemble = panel.references
        trace = panel.fig.data[0]
        assert list(trace.y) == [panel.rows[1]["accuracy"], panel.rows[2]["accuracy"], ensemble["accuracy"]]
        best = ensemble["model"].split(" + ")[0]  # the ensemble sits at its rung's trainable count: one label
        assert sorted(trace.text) == sorted(["", f"{best} / ensemble", {"lora": "head-only", "head-only": "lora"}[best]])
        assert panel.fig.layout.xaxis.type == "log"
        # zero-shot and the classical baseline train nothing: dashed lines, not points
        assert [shape.y0 for shape in panel.fig.layout.shapes] == [panel.rows[0]["accuracy"], classical["accuracy"]]
        assert "peak" in trace.customdata[0] and "wall" in trace.customdata[0]
    finally:
        panel.close()


def test_method_ladder_widget_start_launches_a_process_and_stop_asks_it(one_epoch, store, monkeypatch):
    from widgets import MethodLadder
    from workbench import ladder as core

    launched = []
    monkeypatch.setattr(core, "launch_ladder", lambda lid, home=None: launched.append(lid) or "process")
    panel = MethodLadder(config=one_epoch(), home=store.home, background=False)
    try:
        panel._pick.value = ("lora", "zero-shot-embedding")
        assert panel.methods == ["zero-shot-embedding", "lora"], "ladder order: zero-shot first"
        with pytest.raises(Exception, match="method 'nope' is unknown"):
            panel.methods = ["nope"]
        panel.start()
        assert launched == [panel.ladder_id] and panel.status == "queued" and panel.error == ""
        assert [r["status"] for r in panel.rows] == ["pending", "pending"]
        panel.stop()
        assert panel.status == "stopping" and (ladder_dir(panel.ladder_id, store.home) / "STOP").exists()
        panel.start()
        assert "already going" in panel.error
    finally:
        panel.close()


def test_method_ladder_widget_shows_a_bad_config_inline(tiny_config, store):
    from widgets import MethodLadder

    bad = tiny_config(data={"source": str(store.home / "missing.csv")})
    panel = MethodLadder(config=bad, home=store.home, background=False)
    try:
        panel.start()
        assert panel.status == "idle" and "missing.csv' not found" in panel.error and panel.ladder_id == ""
        panel.methods = []
        panel.start()
        assert panel.error == "choose at least one method"
    finally:
        panel.close()


@pytest.mark.integration
def test_sigterm_stops_an_isolated_ladder_and_its_rung_cooperatively(tiny_config, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from workbench.store import RunStore

    root = Path(__file__).resolve().parent.parent
    path, home = tmp_path / "config.yaml", tmp_path / "home"
    tiny_config(train={"epochs": 200}).save(path)  # long enough to be mid-rung when the signal comes
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "--home", str(home), "ladder", str(path),
                             "--methods", "head-only,lora"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = RunStore(home).list() if (home / "runs.sqlite").exists() else []
            if runs and RunStore(home).points(runs[0]["id"], kind="train"):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the first rung never started training")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    ladder = load_ladder("latest", home)
    assert ladder["status"] == "stopped" and [r["status"] for r in ladder["rows"]] == ["stopped", "pending"]
    assert f"resume with: workbench ladder --resume {ladder['id']}" in out
    assert ladder["peak_memory"].startswith("per rung")
