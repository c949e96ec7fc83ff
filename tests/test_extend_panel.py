"""ExtendRunPanel: a finished tiny run extended on a new file from the panel (its own process), the forgetting
figures read from the new run's record, and every bad input answered inline."""

from __future__ import annotations

import csv
import datetime
import os

import pytest

from conftest import sentiment_rows


def _csv(path, rows, fields=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A completed tiny classification run (trained in this process) and a new file with the same classes."""
    from workbench.config import Config
    from workbench.loop import train
    from workbench.store import RunStore

    root = tmp_path_factory.mktemp("extend")
    store = RunStore(root / "home")
    old = _csv(root / "old.csv", sentiment_rows(96, seed=0))
    config = Config.from_dict({
        "model": str(tiny_model_dir), "data": {"source": str(old), "eval_fraction": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1, "baseline": False},
        "track": {"wandb": "disabled", "tensorboard": False}})
    first = train(config, store=store)
    assert first["status"] == "completed"
    new = _csv(root / "new.csv", sentiment_rows(48, seed=7))
    return store, first, new, root


def _panel(store, run_id=""):
    from widgets import ExtendRunPanel

    return ExtendRunPanel(store=store, run_id=run_id, background=False)


def test_extend_runs_in_its_own_process_and_shows_what_was_forgotten(finished, monkeypatch):
    import importlib

    launching = importlib.import_module("workbench.launch")  # the package exports a function of that name
    store, first, new, _ = finished
    launched = []
    real_launch = launching.launch

    def spy(*args, **kwargs):
        launched.append(real_launch(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(launching, "launch", spy)
    panel = _panel(store, first["id"])
    assert f"continue run {first['id']}" in panel._title.value and panel.error == ""
    assert panel.replay == pytest.approx(0.2)  # the config's default
    panel.data_file, panel.replay = str(new), 0.5
    config = panel.to_config()
    assert (config.train.init_from, config.train.replay) == (first["id"], 0.5)
    assert config.data.source == str(new) and config.data.eval_source is None
    assert (config.data.text_column, config.data.label_column) == ("text", "label")  # the columns the run read

    panel._button.click()
    assert panel.error == "" and panel.extension_id and panel.extension_id != first["id"]
    assert panel.wait(timeout=240) == "completed", panel.error
    record = store.get(panel.extension_id)
    # launched as its own process (workbench.launch, as Start does): a reload of the page does not stop it
    assert [h.id for h in launched] == [panel.extension_id] and launched[0]._process.pid != os.getpid()
    assert "completed" in (store.run_dir(panel.extension_id) / "log.txt").read_text()
    assert record["config"]["train"]["init_from"] == first["id"] and record["config"]["train"]["replay"] == 0.5
    forgetting = record["metrics"]["forgetting"]
    assert panel.forgetting == forgetting and forgetting["run"] == first["id"]
    assert forgetting["before"]["accuracy"] == pytest.approx(first["metrics"]["accuracy"], abs=1e-6)
    assert panel.new_figures["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert panel.continued["replayed_rows"] == round(0.5 * panel.continued["new_rows"])
    before, after = forgetting["before"]["accuracy"], forgetting["after"]["accuracy"]
    assert f"accuracy on run {first['id']}&#x27;s eval split: {before:.3f} -&gt; {after:.3f} ({after - before:+.3f})" \
        in panel._result.value
    assert f"{record['metrics']['accuracy']:.3f}" in panel._result.value and "new data" in panel._result.value

    again = _panel(store, first["id"])  # a reload: the extension is found in the store and shown again
    assert again.extension_id == panel.extension_id and again.status == "completed"
    assert again._result.value == panel._result.value

    from widgets import RunSummary

    shown = RunSummary(store=store, background=False, run_id=panel.extension_id)  # the new run's own view
    assert f"forgetting: accuracy on run {first['id']}" in shown._answer.value
    assert shown.forgetting == forgetting and shown.task == "text-classification"


def test_bad_input_is_an_inline_line_and_registers_no_run(finished, tmp_path):
    store, first, new, _ = finished
    runs = len(store.list())
    panel = _panel(store)
    panel._button.click()
    assert panel.error.startswith("no run chosen")
    assert "no run chosen" in panel._error_html.value

    panel.run_id = first["id"]
    panel._button.click()
    assert panel.error.startswith("no new data")
    panel.data_file = str(tmp_path / "gone.csv")
    panel._button.click()
    assert "not found" in panel.error
    panel.data_file = str(tmp_path / "notes.txt")
    panel._button.click()
    assert "is not a data file" in panel.error

    panel.data_file = str(_csv(tmp_path / "other.csv", [{"review": r["text"], "sentiment": r["label"]}
                                                         for r in sentiment_rows(32)], ("review", "sentiment")))
    panel._button.click()
    assert panel.error.startswith("other.csv has columns review, sentiment, not 'text' and 'label'"), panel.error
    assert not panel.checking and not panel._button.disabled

    three = _csv(tmp_path / "three.csv", [*sentiment_rows(40), *({"text": f"so so {i}", "label": "meh"}
                                                                  for i in range(12))])
    panel.data_file = str(three)
    panel._button.click()
    assert "same classes" in panel.error and "\n" not in panel.error
    assert len(store.list()) == runs  # every refusal came before a run was registered


def test_unfinished_and_uncovered_runs_are_refused(finished):
    store, first, new, _ = finished
    queued = store.create_run(first["config"])
    panel = _panel(store, queued)
    assert f"run {queued} is queued" in panel._title.value
    panel.data_file = str(new)
    panel._button.click()
    assert panel.error == f"run {queued} is queued: only a completed run can be extended"

    chat = store.create_run({**first["config"], "task": "chat"})
    store.finish(chat, "completed")
    panel.run_id = chat
    panel._button.click()
    assert panel.error.startswith(f"run {chat} is a chat run: continual learning covers text classification and "
                                  "text regression runs")
    assert panel.extension_id == "" and panel._result.value == ""


def _upload_item(name, content):
    """What ipywidgets 8 FileUpload.value holds for one file."""
    return {"name": name, "type": "text/csv", "size": len(content), "content": memoryview(content),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


def test_an_upload_is_checked_and_becomes_the_new_data(finished, monkeypatch):
    import widgets.data_panel

    store, first, new, _ = finished
    panel = _panel(store, first["id"])
    panel._upload.value = (_upload_item("notes.txt", b"text,label\nfine,pos\n"),)
    assert "unsupported type '.txt'" in panel.error and panel.data_file == ""
    monkeypatch.setattr(widgets.data_panel, "MAX_UPLOAD_BYTES", 100)
    panel._upload.value = (_upload_item("big.csv", new.read_bytes()),)
    assert "over the 0 MB limit" in panel.error and panel.data_file == "" and panel._upload.value == ()
    monkeypatch.undo()
    panel._upload.value = (_upload_item("more data.csv", new.read_bytes()),)
    assert panel.error == "" and panel.data_file == str(store.home / "uploads" / "more_data.csv")
    assert panel.data_file in panel._file.options
    assert panel.to_config().data.source == panel.data_file


def test_the_run_summary_can_carry_the_panel_and_it_follows_the_shown_run(finished):
    from widgets import ExtendRunPanel, RunSummary

    store, first, _, _ = finished
    plain = RunSummary(store=store, background=False)
    assert plain.extend is None  # a read-only page builds none
    summary = RunSummary(store=store, background=False, extend=True)
    assert isinstance(summary.extend, ExtendRunPanel) and summary.extend in summary.children
    summary.run_id = first["id"]
    assert summary.extend.run_id == first["id"] and f"continue run {first['id']}" in summary.extend._title.value
    assert "Extend the run" in summary.children[-2].value

    queued = store.create_run(first["config"])
    summary.run_id = queued
    assert f"run {queued} is queued" in summary.extend._title.value
    store.finish(queued, "completed")  # the run the page shows completes: it can be extended now
    summary.refresh()
    assert f"continue run {queued} from its weights" in summary.extend._title.value


def test_the_dashboard_shows_extend_run_beside_the_shown_run_but_not_read_only(finished):
    from widgets import Dashboard, ExtendRunPanel

    store, first, _, _ = finished
    dash = Dashboard(home=store.home, background=False)
    assert isinstance(dash.summary.extend, ExtendRunPanel)
    dash.train.run_id = first["id"]  # the Train tab shows a finished run: it can be extended from there
    assert dash.summary.extend.run_id == first["id"]
    assert f"continue run {first['id']}" in dash.summary.extend._title.value
    viewer = Dashboard(home=store.home, background=False, read_only=True)
    assert viewer.summary.extend is None  # a read-only page launches nothing
