"""The widgets read the task table: the task chooser's options, which viewer and playground a run gets, and the
views of a named-entity run (F1 per type, the type confusion, the worst sentences, entities marked in a text).

No browser: build, set traits, assert on traits, HTML and figure state. Runs are written by hand in a temporary
store with the points a task's evaluation leaves there (`EvalResult.summary()` plus its mistakes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

import traitlets as T  # noqa: E402

from workbench import Config, RunStore  # noqa: E402
from workbench.task_table import DEFAULT_TASK, TASKS, tasks_where  # noqa: E402

NER = tasks_where(view="entities")[0]  # the named-entity task, by its row
TYPES = ["LOC", "PER"]
SENTENCE = "李明在北京工作。"  # 李明 PER, 北京 LOC


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "home")


def task_run(store: RunStore, task: str, trained: bool = True, name: str | None = None) -> str:
    """A finished run of `task` with (optionally) a trained-model file and no points."""
    cfg = Config(task=task, name=name or task).to_dict()
    run_id = store.create_run(cfg, name or task)
    store.mark_running(run_id)
    if trained:
        model = store.run_dir(run_id) / "model"
        model.mkdir(parents=True)
        (model / "trainable.safetensors").write_bytes(b"")
    return run_id


def span(kind: str, start: int, end: int, text: str = SENTENCE) -> dict[str, Any]:
    return {"type": kind, "start": start, "end": end, "text": text[start:end]}


def ner_point(step: int, f1_per: float, f1_loc: float, best: bool) -> dict[str, Any]:
    """What the store keeps per evaluation of a named-entity run (EvalResult.summary() and its mistakes)."""
    return {
        "step": step, "epoch": step / 10, "eval_loss": 1.0 / step, "f1": (f1_per + f1_loc) / 2, "precision": 0.7,
        "recall": 0.6, "accuracy": 0.9, "is_best": best, "labels": TYPES,
        "per_type": {"LOC": {"precision": 0.8, "recall": 0.7, "f1": f1_loc, "support": 5},
                     "PER": {"precision": 0.6, "recall": 0.5, "f1": f1_per, "support": 4}},
        "confusion_labels": [*TYPES, "O"],
        "confusion_matrix": [[3, 1, 1], [0, 2, 2], [1, 0, 0]],
        "mistakes": [{"index": 0, "text": SENTENCE, "gold": [span("PER", 0, 2), span("LOC", 3, 5)],
                      "predicted": [span("LOC", 3, 5)]}],
    }


def ner_run(store: RunStore, steps: tuple[int, ...] = (10, 20), finish: bool = True) -> str:
    """A named-entity run with an evaluation at each step and every eval sentence in eval/step-N.json."""
    run_id = task_run(store, NER, name="ner")
    for i, step in enumerate(steps):
        store.add_point(run_id, "train", step, {"loss": 1.0 / step, "epoch": 0, "max_steps": steps[-1]})
        store.add_point(run_id, "eval", step, ner_point(step, 0.3 + 0.2 * i, 0.5 + 0.1 * i, best=i == len(steps) - 1))
        rows = [{"index": 0, "text": SENTENCE, "tokens": list(SENTENCE), "gold_spans": [span("PER", 0, 2),
                                                                                          span("LOC", 3, 5)],
                 "predicted_spans": [span("LOC", 3, 5)]},
                {"index": 1, "text": "Anna lives in Oslo", "tokens": ["Anna", "lives", "in", "Oslo"],
                 "gold_spans": [span("PER", 0, 4, "Anna lives in Oslo")],
                 "predicted_spans": [span("LOC", 0, 4, "Anna lives in Oslo"),
                                     span("LOC", 14, 18, "Anna lives in Oslo")]}]
        eval_dir = store.run_dir(run_id) / "eval"
        eval_dir.mkdir(exist_ok=True)
        (eval_dir / f"step-{step}.json").write_text(json.dumps({"step": step, "labels": TYPES, "rows": rows}),
                                                    encoding="utf-8")
    if finish:
        best = ner_point(steps[-1], 0.3 + 0.2 * (len(steps) - 1), 0.5 + 0.1 * (len(steps) - 1), True)
        store.finish(run_id, "completed", metrics={k: best[k] for k in ("f1", "precision", "recall", "accuracy")}
                     | {"best_step": steps[-1]})
    return run_id


# --- the task chooser ----------------------------------------------------------------------------------

def test_the_chooser_offers_the_table_rows_in_dashboard_with_their_full_titles_and_needs() -> None:
    from widgets import TaskChooser

    chooser = TaskChooser()
    offered = tasks_where(in_dashboard=True)
    assert chooser.options == offered and NER in offered
    assert [name for _, name in chooser._buttons.options] == list(offered)
    assert [title for title, _ in chooser._buttons.options] == [TASKS[n].title for n in offered]  # in full
    assert chooser._buttons.tooltips == tuple(TASKS[n].needs for n in offered)
    assert chooser.value == DEFAULT_TASK and TASKS[DEFAULT_TASK].needs in chooser._needs.value
    chooser._buttons.value = NER  # a click
    assert chooser.value == NER and TASKS[NER].needs in chooser._needs.value
    for name in tasks_where(in_dashboard=False):
        with pytest.raises(T.TraitError, match="not set up on this page"):
            chooser.value = name
    # nothing in a column (a flex-basis would be a blank height there) and buttons as wide as their words
    assert chooser.layout.flex is None and chooser._buttons.style.button_width == "auto"


def test_a_new_row_of_the_table_is_offered_with_no_change_to_the_widgets(monkeypatch: pytest.MonkeyPatch) -> None:
    from widgets import TaskChooser

    row = dataclasses.replace(TASKS[DEFAULT_TASK], name="x-sentiment", title="Sentiment with a long full name",
                              needs="a text column and a verdict column")
    monkeypatch.setitem(TASKS, row.name, row)
    chooser = TaskChooser()
    assert ("Sentiment with a long full name", "x-sentiment") in chooser._buttons.options
    chooser.value = "x-sentiment"
    assert "a verdict column" in chooser._needs.value


def test_the_dashboard_sets_up_a_named_entity_run_from_the_chooser(tmp_path: Path) -> None:
    from widgets import Dashboard

    conll = tmp_path / "people.conll"
    conll.write_text("Anna B-PER\nlives O\nin O\nOslo B-LOC\n\nBob B-PER\nSmith I-PER\nvisited O\nRome B-LOC\n\n"
                     "Oslo B-LOC\nis O\ncold O\n\nEva B-PER\nsang O\n\n", encoding="utf-8")
    dash = Dashboard(home=tmp_path / "home", background=False)
    try:
        assert dash.task.options == tasks_where(in_dashboard=True)
        dash.task.value = NER
        assert dash.data.task == NER
        assert [n for _, n in dash.data._catalog.options] == [
            n for n, a in __import__("workbench.catalog", fromlist=["DATASETS"]).DATASETS.items()
            if a.shape == "sentences"]
        dash.data.source = str(conll)
        assert dash.data.errors == {}, dash.data.errors
        assert dash.data.rows == 4 and dash.data.label_counts == {"PER": 3, "LOC": 3}
        assert "4 sentences" in dash.data._summary.value and "<mark" in dash.data._preview.value
        assert dash.data.num_labels == 5  # B- and I- of two types, and O
        config = dash.config()
        assert config.task == NER and config.data.source == str(conll)
        dash.from_config(config)
        assert dash.task.value == NER
        generation = tasks_where(kind="generation")[0]
        with pytest.raises(Exception, match=f"this page sets up .* runs: a task: {generation} run"):
            dash.from_config(Config(task=generation))
        dash.task.value = DEFAULT_TASK  # back to a table of texts: the table datasets again
        assert all(a != "wnut-16" for _, a in dash.data._catalog.options)
    finally:
        dash.close()


# --- which view a run gets --------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_each_run_gets_the_view_and_playground_of_its_task_row(store: RunStore, task: str) -> None:
    from widgets import ChatPlayground, ConfusionMatrix, EntitiesView, Playground, RegressionView
    from widgets.chat_playground import CONVERSATION_TASKS

    run_id = task_run(store, task)
    store.finish(run_id, "completed", metrics={})
    cm = ConfusionMatrix(store=store, background=False, run_id=run_id)
    try:
        view = TASKS[task].view
        assert cm.view == view
        kinds = {"regression": RegressionView, "entities": EntitiesView}
        if view in kinds:
            assert len(cm.children) == 1 and isinstance(cm.children[0], kinds[view])
            assert cm.children[0].run_id == run_id
        else:
            assert cm.children == cm._classification_view and cm.error == ""
        assert cm.refresh() is False  # a finished run: nothing to follow
    finally:
        cm.close()
    play, chat = Playground(store=store, background=False), ChatPlayground(store=store, background=False)
    assert (run_id in play.runs) == (not TASKS[task].generates)
    assert (run_id in chat.runs) == (task in CONVERSATION_TASKS)
    if run_id in play.runs:
        assert play.view == view


def test_nothing_crashes_on_a_run_of_each_task_in_the_dashboard(tmp_path: Path) -> None:
    from widgets import Dashboard

    home = tmp_path / "home"
    store = RunStore(home)
    ids = {task: ner_run(store) if task == NER else task_run(store, task) for task in TASKS}
    for task, run_id in ids.items():
        if task != NER:
            store.add_point(run_id, "train", 1, {"loss": 0.5, "epoch": 0, "max_steps": 1})
            store.finish(run_id, "completed", metrics={})
    dash = Dashboard(home=home, background=False)
    try:
        for task, run_id in ids.items():
            dash.train.run_id = run_id  # what the page shows follows the Train panel (dashboard.wire)
            dash.confusion.refresh()
            dash.curve.refresh()
            dash.summary.refresh()
            assert dash.confusion.run_id == run_id and dash.curve.run_ids == [run_id], task
            assert dash.confusion.error == "" and dash.summary.error == "", task
            assert dash.curve.statuses == {run_id: "completed"}, task
        dash.playground.refresh_runs()
        assert set(dash.playground.runs) == {ids[t] for t in TASKS if not TASKS[t].generates}
        dash.deploy.refresh_runs()
        for task, run_id in ids.items():
            dash.deploy.run_id = run_id
            assert dash.deploy.task == task
    finally:
        dash.close()


# --- the entities view --------------------------------------------------------------------------------------

def test_the_entities_view_draws_f1_per_type_the_type_confusion_and_the_worst_sentences(store: RunStore) -> None:
    from widgets import ConfusionMatrix

    run_id = ner_run(store)
    cm = ConfusionMatrix(store=store, background=False, run_id=run_id)
    try:
        view = cm.entities
        assert view is not None and cm.children == (view,)
        assert view.steps == [10, 20] and view.best_step == 20 and view.types == TYPES
        # live F1: a line for all entities and one per type, over every evaluation
        lines = {t.name: (list(t.x), list(t.y)) for t in view.f1_fig.data}
        assert lines["PER"] == ([10, 20], pytest.approx([0.3, 0.5]))
        assert lines["LOC"] == ([10, 20], pytest.approx([0.5, 0.6]))
        assert lines["all entities (micro F1)"][1] == pytest.approx([0.4, 0.55])
        # a page opened (or reloaded) later starts from the whole history
        state = view.f1_fig.get_state()["_widget_data"]
        assert [list(t["x"]) for t in state] == [[10, 20]] * 3
        # the type confusion, through the classifier's heatmap
        heat = view.fig.get_state()["_widget_data"][0]
        assert list(heat["x"]) == list(heat["y"]) == [*TYPES, "O"]
        assert [list(r) for r in heat["z"]] == [[3, 1, 1], [0, 2, 2], [1, 0, 0]]
        assert view.labels == [*TYPES, "O"] and view.matrix == [[3, 1, 1], [0, 2, 2], [1, 0, 0]]
        table = view._per_type.value
        assert "entity type" in table and all(t in table for t in TYPES) and "0.5" in table
        assert view.figures["f1"] == pytest.approx(0.55) and "entity F1 0.550" in view._title.value
        assert "(best)" in view._title.value
        # the worst sentences: gold and predicted entities marked (Chinese text shown as it is)
        assert view.worst and view.worst[0]["text"] == SENTENCE
        worst = view._worst.value
        assert worst.count("<mark") == 3 and 'data-type="PER"' in worst and "北京" in worst and "李明" in worst
        # a cell: the sentences behind it
        missed = view.select_cell("PER", "O")
        assert [r["index"] for r in missed] == [0] and "missed" in view._cell.value
        assert [r["index"] for r in view.select_cell("PER", "LOC")] == [1]
        assert [r["index"] for r in view.select_cell("O", "LOC")] == [1]  # Oslo: predicted, not gold
        assert view.select_cell("MISC", "O") == [] and "no cell" in view.error
        # an earlier evaluation, and the row-normalised matrix
        view.step = 10
        assert view.figures["f1"] == pytest.approx(0.4)
        view.normalize = True
        assert view.fig.data[0].z[0][0] == pytest.approx(3 / 5)
    finally:
        cm.close()


def test_the_entities_view_follows_a_live_run(store: RunStore) -> None:
    from widgets import EntitiesView

    run_id = ner_run(store, steps=(10,), finish=False)
    view = EntitiesView(store=store, background=False, run_id=run_id)
    try:
        assert view.steps == [10] and view.refresh() is True  # still running
        store.add_point(run_id, "eval", 20, ner_point(20, 0.9, 0.8, True))
        view.refresh()
        assert view.steps == [20] or view.steps == [10, 20]
        assert [list(t.x) for t in view.f1_fig.data][0] == [10, 20]
        assert view.figures["f1"] == pytest.approx(0.85)
        store.add_point(run_id, "eval", 30, {**ner_point(30, 0.9, 0.9, False), "labels": ["LOC", "PER", "ORG"],
                                             "per_type": {**ner_point(30, 0.9, 0.9, False)["per_type"],
                                                          "ORG": {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                                                  "support": 1}}})
        view.refresh()  # a type seen for the first time gets its own line
        assert [t.name for t in view.f1_fig.data][1:] == ["LOC", "PER", "ORG"]
        assert list(view.f1_fig.data[3].y) == [None, None, 1.0]
    finally:
        view.close()


def test_the_loss_curve_draws_entity_f1_for_a_named_entity_run(store: RunStore) -> None:
    from widgets import LossCurve

    run_id = ner_run(store)
    curve = LossCurve(store=store, run_ids=[run_id], background=False)
    try:
        raw, smooth, ev, first, best, second, *_ = curve.fig.data
        assert first.name == "entity F1" and list(first.y) == pytest.approx([0.4, 0.55])
        assert second.name == "token accuracy" and list(second.y) == pytest.approx([0.9, 0.9])
        assert list(best.x) == [20] and list(best.y) == pytest.approx([0.55])
        assert curve.fig.layout.yaxis2.title.text == "entity F1 / token accuracy"
    finally:
        curve.close()


def test_the_run_summary_shows_entity_figures(store: RunStore) -> None:
    from widgets import RunSummary

    summary = RunSummary(store=store, background=False, run_id=ner_run(store))
    assert "entity F1 0.550" in summary._figures.value and "no classical baseline" in summary._figures.value


# --- the playground: entities marked in the typed text --------------------------------------------------------

class FakeTagger:
    """What a named-entity run's predictor returns (tasks/token_classification.EntityPredictor.predict)."""

    task, run_id = NER, ""

    def predict(self, texts: str | list[str], batch_size: int = 32) -> list[dict[str, Any]]:
        texts = [texts] if isinstance(texts, str) else texts
        out = []
        for text in texts:
            found = [{**span(kind, m.start(), m.end(), text), "score": 0.9}
                     for kind, word in (("PER", "李明"), ("LOC", "北京"), ("PER", "<Bob>"))
                     for m in re.finditer(re.escape(word), text)]
            out.append({"text": text, "entities": sorted(found, key=lambda e: e["start"]), "tokens": list(text),
                        "tags": ["O"] * len(text)})
        return out


def test_the_playground_marks_the_entities_of_a_named_entity_run(store: RunStore) -> None:
    from widgets import Playground

    run_id = ner_run(store)
    play = Playground(store=store, background=False)
    assert play.run_id == run_id and play.view == "entities"
    assert "named entities" in play._text.placeholder and "BIO tag" in play._upload_hint.value
    assert "entity F1 0.550" in play._run.options[0][0]
    play._predictors[run_id] = FakeTagger()  # the loaded predictor, cached
    play.predict(SENTENCE + " <Bob> & co")
    assert play.error == "" and [e["type"] for e in play.result["entities"]] == ["PER", "LOC", "PER"]
    out = play._output.value
    assert out.count("<mark") == 3 and 'data-type="LOC"' in out
    assert ">李明<" in out and ">北京<" in out and "在" in out and "工作。" in out  # Chinese text as it is
    assert "&lt;Bob&gt;" in out and "&amp; co" in out and "<Bob>" not in out  # every piece escaped


def test_marked_html_keeps_the_text_and_skips_bad_spans() -> None:
    from widgets.entities import marked_html, type_color

    text = "北京 & <Oslo>"
    html_ = marked_html(text, [span("LOC", 0, 2, text), span("LOC", 1, 3, text), span("LOC", 5, 11, text),
                               span("X", 20, 30, text)])
    assert html_.count("<mark") == 2 and "&amp;" in html_ and "&lt;Oslo&gt;" in html_
    assert re.sub(r"<[^>]+>|LOC", "", html_).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">") == text
    assert type_color("PER") == type_color("PER") and type_color("PER").startswith("#")


def test_deploy_examples_use_the_task_row_route() -> None:
    from widgets.deploy import examples

    for task, spec in TASKS.items():
        assert spec.route in examples(task, "http://h", "/k")["curl"]
    assert "Obama" in examples(NER, "http://h", "/k")["curl"]
