"""Token attributions (workbench/explain.py) on tiny models: one per word with its offsets, Integrated
Gradients' completeness, occlusion where no gradients reach, regression and named entities, the faithfulness
report, bad input; and the widgets that show them (explain_view, Try it, the mistakes list)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.explain import explain, explain_predictor, faithfulness

GOOD = ("great", "wonderful", "superb")
BAD = ("awful", "terrible", "dreadful")


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: Path):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from workbench.tasks.classification import Predictor

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    return Predictor(model, AutoTokenizer.from_pretrained(tiny_model_dir), ["neg", "pos"], 32)


class KeywordModel:
    """A classifier with no network, only `.probabilities`: pos when good words outnumber bad ones."""

    labels = ["neg", "pos"]

    def probabilities(self, texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            words = text.lower().split()
            score = sum(w.strip(",.!") in GOOD for w in words) - sum(w.strip(",.!") in BAD for w in words)
            pos = 1.0 / (1.0 + math.exp(-2.0 * score))
            out.append([1.0 - pos, pos])
        return np.asarray(out)


def test_one_attribution_per_word_with_offsets_into_the_text(classifier):
    text = "The film was great, really!"
    [answer] = explain_predictor(classifier, text)
    assert [t["token"] for t in answer["tokens"]] == ["The", "film", "was", "great", ",", "really", "!"]
    for token in answer["tokens"]:
        assert text[token["start"]: token["end"]] == token["token"]
        assert set(token["by_class"]) == {"neg", "pos"} and isinstance(token["attribution"], float)
        assert token["attribution"] == token["by_class"][answer["label"]]
        assert token["by_class"]["neg"] == pytest.approx(-token["by_class"]["pos"])  # probabilities add up to 1
    assert answer["method"] == "integrated-gradients" and answer["label"] in ("neg", "pos")
    assert answer["score"] == pytest.approx(classifier.predict(text)[0]["scores"][answer["label"]], abs=1e-5)


def test_integrated_gradients_add_up_to_the_change_from_the_pad_baseline(classifier):
    import torch

    text = "a wonderful story with dreadful actors"
    [answer] = explain_predictor(classifier, text, target="pos", steps=64)
    total = sum(t["attribution"] for t in answer["tokens"])
    batch = classifier.tokenizer([text], return_tensors="pt")
    ids = batch["input_ids"].clone()
    ids[0, 1:-1] = classifier.tokenizer.pad_token_id  # [CLS] and [SEP] kept
    with torch.no_grad():
        p_x = torch.softmax(classifier.model(**batch).logits, -1)[0, 1].item()
        p_b = torch.softmax(classifier.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits, -1)[0, 1]
    assert answer["baseline_score"] == pytest.approx(p_b.item(), abs=1e-5)
    assert total == pytest.approx(p_x - p_b.item(), abs=0.01)
    assert abs(answer["convergence_delta"]) < 0.01


def test_head_and_tail_truncation_keeps_the_offsets_of_the_words_read(classifier):
    from workbench.explain import explained_target
    from workbench.models.built import tokenize_texts
    from workbench.tasks.classification import Predictor

    words = [f"w{i}" if i % 2 else "film" for i in range(40)]
    text = " ".join(words)
    p = Predictor(classifier.model, classifier.tokenizer, ["neg", "pos"], 12,
                  encode=lambda texts, n: tokenize_texts(classifier.tokenizer, texts, n, "head+tail"))
    assert explained_target(p).method == "integrated-gradients"
    [answer] = explain_predictor(p, text)
    read = [t["token"] for t in answer["tokens"]]
    pieces = classifier.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 10 and len(answer["tokens"]) <= 10  # 12 less [CLS] and [SEP]
    assert read[0] == "film" and read[-1] == words[-1]
    for token in answer["tokens"]:
        assert text[token["start"]: token["end"]] == token["token"]


def test_occlusion_on_a_predictor_with_only_probabilities():
    [answer] = explain_predictor(KeywordModel(), "the plot was great but the actors awful, awful")
    assert answer["method"] == "occlusion" and answer["label"] == "neg"
    by_word = {t["token"]: t["attribution"] for t in answer["tokens"]}
    assert by_word["awful"] > 0.1 and by_word["great"] < -0.1 and by_word["plot"] == pytest.approx(0.0)
    assert len(answer["tokens"]) == 10 and "convergence_delta" not in answer


def test_an_int8_copy_is_explained_by_occlusion_and_forcing_gradients_is_refused(classifier):
    from workbench.deploy.artifacts import TorchPredictor, quantize_torch

    int8 = TorchPredictor(quantize_torch(classifier.model), classifier.tokenizer, ["neg", "pos"], 32)
    [answer] = explain_predictor(int8, "a superb film")
    assert answer["method"] == "occlusion" and [t["token"] for t in answer["tokens"]] == ["a", "superb", "film"]
    with pytest.raises(WorkbenchError, match="method occlusion"):
        explain_predictor(int8, "a superb film", method="integrated-gradients")


def test_calibrated_and_ensemble_predictors_are_explained_through_their_network(classifier):
    from workbench.calibration import CalibratedPredictor
    from workbench.tasks.ensemble import EnsemblePredictor

    calibrated = CalibratedPredictor(classifier, temperature=3.0)
    [answer] = explain_predictor(calibrated, "a superb film", steps=64)
    assert answer["method"] == "integrated-gradients"
    assert answer["score"] == pytest.approx(max(calibrated.predict("a superb film")[0]["scores"].values()), abs=1e-5)
    assert sum(t["attribution"] for t in answer["tokens"]) == pytest.approx(
        answer["score"] - answer["baseline_score"], abs=0.01)
    ensemble = EnsemblePredictor([classifier, KeywordModel()], [0.5, 0.5], "run", ["fine-tuned", "classical"])
    [member] = explain_predictor(ensemble, "a superb film")
    assert member["method"] == "integrated-gradients" and "'fine-tuned'" in member["note"]
    [whole] = explain_predictor(ensemble, "a superb film", method="occlusion")
    assert "note" not in whole and whole["score"] == pytest.approx(ensemble.probabilities(["a superb film"]).max())


def test_regression_attributions_explain_the_value(tiny_model_dir: Path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from workbench.tasks.regression import RegressionPredictor

    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    p = RegressionPredictor(model, AutoTokenizer.from_pretrained(tiny_model_dir), 32, mean=5.0, std=2.0)
    [answer] = explain_predictor(p, "great acting, dull plot", steps=64)
    assert answer["value"] == pytest.approx(p.predict("great acting, dull plot")[0]["value"], abs=1e-4)
    assert [t["token"] for t in answer["tokens"]] == ["great", "acting", ",", "dull", "plot"]
    total = sum(t["attribution"] for t in answer["tokens"])
    assert total == pytest.approx(answer["value"] - answer["baseline_score"], abs=0.02)
    [occluded] = explain_predictor(p, "great acting", method="occlusion")
    assert occluded["method"] == "occlusion" and len(occluded["tokens"]) == 2


@pytest.fixture(scope="module")
def tagger(tiny_model_dir: Path):
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from workbench.tasks.token_classification import EntityPredictor

    tags = ["O", "B-PER", "I-PER"]
    model = BertForTokenClassification.from_pretrained(tiny_model_dir, num_labels=len(tags))
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 8.0, 0.0]))  # every word starts a PER entity
    return EntityPredictor(model, AutoTokenizer.from_pretrained(tiny_model_dir), tags, 32)


@pytest.mark.parametrize("method", ["integrated-gradients", "occlusion"])
def test_named_entities_are_each_explained(tagger, method):
    text = "alice met bob"
    [answer] = explain_predictor(tagger, text, method=method)
    assert answer["method"] == method
    assert [e["text"] for e in answer["entities"]] == ["alice", "met", "bob"]
    assert answer["targets"] == ["PER 'alice'", "PER 'met'", "PER 'bob'"] and answer["target"] == "PER 'alice'"
    assert [t["token"] for t in answer["tokens"]] == ["alice", "met", "bob"]
    assert all(set(t["by_class"]) == set(answer["targets"]) for t in answer["tokens"])
    [bob] = explain_predictor(tagger, text, target="bob", method=method)
    assert bob["targets"] == ["PER 'bob'"]
    with pytest.raises(WorkbenchError, match="no entity found"):
        explain_predictor(tagger, text, target="carol", method=method)


@pytest.mark.parametrize("texts, match", [("", "text 0 is empty"), (["fine", "  "], "text 1 is empty"),
                                          ([], "no text"), ([3], "not a text")])
def test_bad_texts_are_refused(classifier, texts, match):
    with pytest.raises(WorkbenchError, match=match):
        explain_predictor(classifier, texts)


def test_bad_options_are_refused(classifier):
    with pytest.raises(WorkbenchError, match="not a class"):
        explain_predictor(classifier, "fine", target="maybe")
    with pytest.raises(WorkbenchError, match="unknown"):
        explain_predictor(classifier, "fine", method="lime")
    with pytest.raises(WorkbenchError, match="steps"):
        explain_predictor(classifier, "fine", steps=1)


def tiny_run_config(model_dir: Path, csv: Path):
    from workbench.config import Config

    return Config.from_dict({
        "model": str(model_dir), "data": {"source": str(csv), "eval_fraction": 0.25},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                  "early_stopping_patience": 0, "threads": 1},
        "track": {"wandb": "disabled", "tensorboard": False}})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_csv, tmp_path_factory):
    from workbench.loop import train
    from workbench.store import RunStore

    store = RunStore(tmp_path_factory.mktemp("explain-home"))
    record = train(tiny_run_config(tiny_model_dir, tiny_csv), store=store)
    assert record["status"] == "completed", record.get("error")
    return store, record


def test_faithfulness_writes_the_runs_report(trained):
    from workbench.run_paths import RunPaths

    store, record = trained
    report = faithfulness(record["id"], home=store.home, k=2, n=4, steps=8)
    assert {"run_id", "k", "n", "method", "top_k_drop", "random_k_drop", "ratio", "top_beats_random",
            "seconds_per_text", "examples", "definition"} <= set(report)
    assert report["k"] == 2 and report["n"] == 4 and report["method"] == "integrated-gradients"
    assert json.loads(RunPaths.of(record).faithfulness.read_text()) == report
    if report["random_k_drop"] > 0:
        assert report["ratio"] == pytest.approx(report["top_k_drop"] / report["random_k_drop"])
    given = ["write to ann@example.org, the film was great and superb", "awful dreadful boring film sadly"]
    masked = faithfulness(record["id"], given, home=store.home, k=2, n=2, steps=8)
    assert masked["texts"] == "texts given" and masked["n"] == 2
    assert "ann@example.org" not in RunPaths.of(record).faithfulness.read_text()
    assert any("[EMAIL]" in e["text"] for e in masked["examples"])


def test_explain_a_run_and_refuse_one_with_no_model(trained, tiny_model_dir, tiny_csv):
    store, record = trained
    [answer] = explain(record["id"], "great great film", home=store.home)
    assert answer["label"] in ("neg", "pos") and len(answer["tokens"]) == 3
    queued = store.create_run(tiny_run_config(tiny_model_dir, tiny_csv).to_dict())
    with pytest.raises(WorkbenchError, match="no trained model"):
        explain(queued, "great film", home=store.home)
    with pytest.raises(WorkbenchError, match="no trained model"):
        faithfulness(queued, home=store.home)


def test_explain_view_escapes_the_text_and_colours_toward_the_chosen_class():
    from widgets.explain_view import NEGATIVE_RGB, POSITIVE_RGB, ExplainView

    [answer] = explain_predictor(KeywordModel(), "<script>alert(1)</script> great film")
    view = ExplainView()
    view.explanation = answer
    assert view.target == "pos" and view._target.options == ("neg", "pos")
    shown = view._text.value
    assert "<script" not in shown and "</script" not in shown and ">&lt;</span>" in shown
    great = next(part for part in shown.split("<span")[1:] if ">great<" in part)
    assert POSITIVE_RGB in great
    view._target.value = "neg"
    assert view.target == "neg"
    great = next(part for part in view._text.value.split("<span")[1:] if ">great<" in part)
    assert NEGATIVE_RGB in great
    import traitlets

    with pytest.raises(traitlets.TraitError, match="not in this explanation"):
        view.target = "maybe"


def test_playground_explains_the_shown_answer_inline(trained):
    from widgets.playground import Playground

    store, record = trained
    pg = Playground(store=store, background=False, uploads=False)
    pg.explain()
    assert "predict first" in pg.explain_view.error and pg.explanation is None
    pg.run_id = record["id"]
    pg.predict("a great and superb film")
    assert pg._explain.layout.display == ""
    pg._explain.click()
    assert pg.explain_view.error == ""
    assert [t["token"] for t in pg.explanation["tokens"]] == ["a", "great", "and", "superb", "film"]
    assert pg.explain_view.explanation == pg.explanation and "superb" in pg.explain_view._text.value
    pg.predict("another film")
    assert pg.explanation is None and pg.explain_view._text.value == ""


def test_the_mistakes_list_has_an_explain_button_per_example(trained):
    from widgets.confusion import ConfusionMatrix

    store, record = trained
    cm = ConfusionMatrix(store=store, run_id=record["id"], background=False)
    cell = next((t, p) for t in cm.labels for p in cm.labels if cm.matrix[cm.labels.index(t)][cm.labels.index(p)])
    examples = cm.select_cell(*cell)
    buttons = cm._explain_buttons.children
    assert len(buttons) == min(10, len(examples)) and buttons[0].description == "explain #1"
    buttons[0].click()
    assert cm.explain_view.error == "" and cm.explanation["index"] == 0
    assert cm.explanation["text"] == examples[0]["text"] and cm.explanation["label"] == examples[0]["predicted"]
    assert cm.explain_example(99) is None and "no example 100" in cm.explain_view.error


def test_many_classes_attribute_the_most_probable_and_the_asked_one(tiny_model_dir: Path, classifier):
    from transformers import BertForSequenceClassification

    from workbench.explain import BY_CLASS_LIMIT
    from workbench.tasks.classification import Predictor

    labels = [f"c{i}" for i in range(BY_CLASS_LIMIT + 2)]
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=len(labels))
    p = Predictor(model, classifier.tokenizer, labels, 32)
    least = min(p.predict("a film")[0]["scores"].items(), key=lambda kv: kv[1])[0]
    [answer] = explain_predictor(p, "a film", target=least, steps=8)
    assert len(answer["targets"]) == BY_CLASS_LIMIT + 1 and least in answer["targets"]
    assert answer["label"] in answer["targets"] and answer["target"] == least
    assert all(t["attribution"] == t["by_class"][least] for t in answer["tokens"])


@pytest.mark.integration
def test_minilm_attributions_are_faithful_on_held_out_reviews(store):
    """The issue's bar on a catalog run: deleting the top 5 words drops the predicted probability at least
    twice as much as deleting 5 random words (bench_faithfulness measures the full run: 50 texts)."""
    from workbench.config import Config
    from workbench.loop import train

    record = train(Config.from_dict({
        "model": "minilm-l6", "data": {"source": "rotten-tomatoes", "max_train_samples": 240,
                                       "max_eval_samples": 60},
        "method": {"name": "lora"}, "train": {"epochs": 1, "batch_size": 16, "max_length": 48, "baseline": False},
        "track": {"wandb": "disabled", "tensorboard": False}}), store=store)
    assert record["status"] == "completed", record["error"]
    report = faithfulness(record["id"], home=store.home, k=5, n=20, steps=16)
    assert report["n"] == 20 and report["method"] == "integrated-gradients"
    assert report["ratio"] >= 2.0, report


def _predict_module():
    """workbench.predict, the module (the package exports a function of the same name)."""
    import importlib

    return importlib.import_module("workbench.predict")


def _finished_run(store, task: str, point: dict, rows: list[dict]) -> str:
    """A finished run of `task` with one evaluation point and its rows in eval/step-10.json (no model files:
    the explainer's predictor is the test's)."""
    from workbench.config import Config

    run_id = store.create_run(Config(task=task).to_dict(), task)
    store.mark_running(run_id)
    store.add_point(run_id, "eval", 10, {"step": 10, "epoch": 1.0, "eval_loss": 0.5, **point})
    (store.run_dir(run_id) / "eval").mkdir(exist_ok=True)
    (store.run_dir(run_id) / "eval" / "step-10.json").write_text(json.dumps({"step": 10, "rows": rows}))
    store.finish(run_id, "completed", metrics={"best_step": 10})
    return run_id


def test_the_largest_regression_errors_each_have_an_explain_button(tmp_path, tiny_model_dir: Path, monkeypatch):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from workbench.store import RunStore
    from workbench.tasks.regression import RegressionPredictor
    from widgets.regression import RegressionView

    store = RunStore(tmp_path / "home")
    rows = [{"index": i, "text": text, "true": 1.0 + i, "predicted": 1.0 + 3 * i}
            for i, text in enumerate(["a dull plot", "great acting, dull plot", "superb"])]
    run_id = _finished_run(store, "text-regression", {"rmse": 1.0, "baseline_rmse": 2.0, "mae": 0.9,
                                                       "pearson": 0.5, "spearman": 0.5}, rows)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    predictor = RegressionPredictor(model, AutoTokenizer.from_pretrained(tiny_model_dir), 32, mean=5.0, std=2.0)
    loaded = []
    monkeypatch.setattr(_predict_module(), "load_predictor", lambda run, home=None: loaded.append(run) or predictor)
    view = RegressionView(store=store, run_id=run_id, background=False)
    assert [r["text"] for r in view.worst] == ["superb", "great acting, dull plot", "a dull plot"]  # worst first
    buttons = view.explainer.buttons.children
    assert [b.description for b in buttons] == ["explain #1", "explain #2", "explain #3"]
    buttons[1].click()
    answer = view.explainer.explanation
    assert view.explainer.view.error == "" and answer["index"] == 1 and loaded == [run_id]
    assert [t["token"] for t in answer["tokens"]] == ["great", "acting", ",", "dull", "plot"]
    assert view.explainer.view.explanation == answer and "dull" in view.explainer.view._text.value
    view.explain_error(0)
    assert view.explainer.explanation["text"] == "superb" and loaded == [run_id]  # the predictor is loaded once
    assert view.explain_error(7) is None and "no error 8" in view.explainer.view.error


def test_the_worst_tagged_sentences_each_have_an_explain_button(tmp_path, tagger, monkeypatch):
    from workbench.store import RunStore
    from widgets.entities import EntitiesView

    store = RunStore(tmp_path / "home")
    sentence = "alice met bob"
    point = {"f1": 0.5, "precision": 0.5, "recall": 0.5, "accuracy": 0.9, "labels": ["PER"],
             "per_type": {"PER": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}},
             "confusion_labels": ["PER", "O"], "confusion_matrix": [[1, 1], [1, 0]],
             "mistakes": [{"index": 0, "text": sentence, "gold": [], "predicted": []}]}
    run_id = _finished_run(store, "token-classification", point, [])
    monkeypatch.setattr(_predict_module(), "load_predictor", lambda run, home=None: tagger)
    view = EntitiesView(store=store, run_id=run_id, background=False)
    assert [b.description for b in view.explainer.buttons.children] == ["explain #1"] and "#1" in view._worst.value
    view.explainer.buttons.children[0].click()
    answer = view.explainer.explanation
    assert view.explainer.view.error == "" and answer["targets"] == ["PER 'alice'", "PER 'met'", "PER 'bob'"]


def test_an_explain_failure_is_an_inline_message(tmp_path, monkeypatch):
    from workbench.errors import WorkbenchError
    from workbench.store import RunStore
    from widgets.regression import RegressionView

    def missing(run, home=None):
        raise WorkbenchError(f"run {run} has no saved model: train it again\nsecond line")

    store = RunStore(tmp_path / "home")
    run_id = _finished_run(store, "text-regression", {"rmse": 1.0, "baseline_rmse": 2.0, "mae": 0.9,
                                                       "pearson": 0.5, "spearman": 0.5},
                           [{"index": 0, "text": "x", "true": 1.0, "predicted": 2.0}])
    monkeypatch.setattr(_predict_module(), "load_predictor", missing)
    view = RegressionView(store=store, run_id=run_id, background=False)
    view.explain_error(0)
    assert view.explainer.explanation is None and view.explainer.view.error == (
        f"run {run_id} has no saved model: train it again")
