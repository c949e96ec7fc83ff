"""The classical baseline on every run, settings chosen from the data, the run's ensemble answer, and
`workbench evaluate`: each pinned on the tiny model (a 2-layer BERT built from a config)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from workbench.classical import ClassicalModel, fit_classifiers, fit_regressor
from workbench.cli import main
from workbench.config import Config
from workbench.errors import WorkbenchError
from workbench.loop import train
from workbench.loop.defaults import MAX_EPOCHS, MIN_EPOCHS, choose_before_build
from workbench.models.built import tokenize_texts
from workbench.store import RunStore
from workbench.tasks.ensemble import EnsemblePredictor, baseline_note, choose_answer, fit_baseline, write_json

from conftest import minilm_dir, sentiment_rows


def _cli(capsys, home: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _write_csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8", names=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows([[r["text"], r["label"]] for r in rows])
    return path


# --- the classical model ---------------------------------------------------------------------------------

def test_classical_model_saves_without_pickle_and_reloads_the_same_probabilities(tmp_path):
    rows = sentiment_rows(60)
    texts, labels = [r["text"] for r in rows], [0 if r["label"] == "neg" else 1 for r in rows]
    plain, balanced = fit_classifiers(texts, labels, ["neg", "pos"])
    assert (plain.class_weight, balanced.class_weight) == ("none", "balanced")
    probs = plain.probabilities(texts)
    assert probs.shape == (60, 2) and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == labels).mean() == 1.0  # one word gives the label away
    plain.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["classical.json", "classical.safetensors"]
    assert np.allclose(ClassicalModel.load(tmp_path / "c").probabilities(texts), probs, atol=1e-5)


def test_a_class_absent_from_training_gets_no_probability():
    rows = sentiment_rows(40)
    texts, labels = [r["text"] for r in rows], [0 if r["label"] == "neg" else 2 for r in rows]
    (model, _) = fit_classifiers(texts, labels, ["neg", "neutral", "pos"])
    probs = model.probabilities(texts)
    assert probs.shape == (40, 3) and probs[:, 1].max() < 1e-6 and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == labels).all()


def test_ridge_baseline_follows_a_number():
    texts = [f"{'good ' * k}{'bad ' * (30 - k)}film" for k in range(1, 30)]  # the share of good words
    values = [float(k) for k in range(1, 30)]
    model = fit_regressor(texts, values)
    predicted = model.values(texts)
    assert np.corrcoef(predicted, values)[0, 1] > 0.9


# --- settings chosen from the data ---------------------------------------------------------------------

def test_choices_follow_the_data_and_explicit_settings_win():
    cfg = Config.from_dict({"method": {"name": "lora"}})
    skewed = [0] * 80 + [1] * 10 + [2] * 10
    chosen, decisions = choose_before_build(cfg, 100, 1, skewed, 3)
    assert chosen.train.class_weights == "balanced" and chosen.train.best_metric == "f1_macro"
    assert chosen.train.epochs == MAX_EPOCHS and chosen.train.learning_rate == 1e-3  # 7 steps an epoch
    assert {d["field"] for d in decisions} == {"train.epochs", "train.learning_rate", "train.class_weights",
                                               "train.best_metric", "train.early_stopping_patience"}
    assert all(d["why"] for d in decisions)
    chosen, _ = choose_before_build(cfg, 100_000, 1, [0, 1] * 50, 2)
    assert chosen.train.class_weights == "none" and chosen.train.best_metric == "accuracy"
    assert chosen.train.epochs == MIN_EPOCHS
    # on a CPU, long texts cost time: 600 rows of 256 tokens get fewer epochs than 600 rows of 40
    short, _ = choose_before_build(cfg, 600, 1, [0, 1] * 300, 2, tokens_per_epoch=600 * 40)
    long, decisions = choose_before_build(cfg, 600, 1, [0, 1] * 300, 2, tokens_per_epoch=600 * 256)
    assert short.train.epochs == 8 and long.train.epochs == 2 and "on a CPU" in decisions[0]["why"]
    explicit = Config.from_dict({"train": {"epochs": 3, "learning_rate": 2e-4, "class_weights": "none",
                                           "best_metric": "accuracy"}})
    chosen, decisions = choose_before_build(explicit, 100, 1, skewed, 3)
    assert (chosen.train.epochs, chosen.train.learning_rate, chosen.train.class_weights,
            chosen.train.best_metric) == (3, 2e-4, "none", "accuracy") and decisions == []


def test_a_tagger_gets_epochs_from_its_data_and_its_rows_step_target():
    """Token classification reads texts like classification: its epochs come from the data (its row's larger
    step target: few entity words a sentence), not the fixed 2 of the generation tasks."""
    from workbench.task_table import task_spec

    ner = Config.from_dict({"task": "token-classification", "method": {"name": "lora"}})
    chosen, decisions = choose_before_build(ner, 1847, 1, None, 0, tokens_per_epoch=1847 * 40)
    per_epoch = -(-1847 // 16)
    assert chosen.train.epochs == -(-task_spec("token-classification").target_steps // per_epoch) == 6
    assert decisions[0]["field"] == "train.epochs" and "600 steps" in decisions[0]["why"]
    chat = Config.from_dict({"task": "chat", "model": "smollm2-135m-instruct", "data": {"source": "chatterbot"}})
    assert choose_before_build(chat, 1847, 1, None, 0)[0].train.epochs == 2


def test_head_and_tail_keep_the_end_of_a_long_text():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    text = "opening " + "filler " * 400 + "the verdict is wonderful"
    (tail,) = tokenize_texts(tokenizer, [text], 32, "head+tail")
    (head,) = tokenize_texts(tokenizer, [text], 32, "head")
    assert len(tail["input_ids"]) == len(head["input_ids"]) == 32
    decoded = tokenizer.decode(tail["input_ids"])
    assert decoded.startswith("[CLS] opening") and decoded.endswith("verdict is wonderful [SEP]")
    assert "wonderful" not in tokenizer.decode(head["input_ids"])
    short = tokenize_texts(tokenizer, ["a short text"], 32, "head+tail")
    assert short == tokenize_texts(tokenizer, ["a short text"], 32, "head")  # nothing to cut: the same ids


def test_a_run_with_settings_left_out_records_what_it_chose(tiny_config, store):
    cfg = tiny_config(train={"epochs": None, "learning_rate": None, "max_length": None})
    record = train(cfg, store=store)
    assert record["status"] == "completed", record["error"]
    fields = {d["field"]: d["value"] for d in record["info"]["decisions"]}
    assert set(fields) >= {"train.epochs", "train.learning_rate", "train.max_length"}
    stored = Config.from_dict(record["config"])  # the stored config holds the chosen values
    assert (stored.train.epochs, stored.train.learning_rate, stored.train.max_length) == (
        fields["train.epochs"], fields["train.learning_rate"], fields["train.max_length"])
    assert record["info"]["truncation"]["texts_measured"] > 0
    assert record["timings"]["steps"] <= fields["train.epochs"] * 9  # 72 rows / 8 a batch


# --- the baseline and the ensemble in a run ------------------------------------------------------------

def test_every_classification_run_has_the_baseline_and_answers_as_it_recorded(tiny_config, store):
    from workbench.predict import load_predictor

    record = train(tiny_config(), store=store)
    m = record["metrics"]
    assert 0 <= m["baseline"]["accuracy"] <= 1 and 0 <= m["baseline"]["f1_macro"] <= 1
    assert record["info"]["baseline"]["accuracy"] == m["baseline"]["accuracy"]
    assert set(m["baseline"]["variants"]) == {"none", "balanced"}
    answer = m["answers_with"]
    rows = json.loads(Path(m["predictions_file"]).read_text())["rows"]
    predictor = load_predictor(record["id"], store.home, calibrated=False)
    assert isinstance(predictor, EnsemblePredictor) == (answer["by"] == "ensemble")
    predicted = [p["label"] for p in predictor.predict([r["text"] for r in rows])]
    accuracy = np.mean([p == r["true"] for p, r in zip(predicted, rows)])
    assert accuracy == pytest.approx(answer["accuracy"], abs=1e-9)  # what the record says is what answers


def test_baseline_off_means_none(tiny_config, store):
    record = train(tiny_config(train={"baseline": False}), store=store)
    assert "baseline" not in record["metrics"] and "answers_with" not in record["metrics"]
    assert not (Path(record["dir"]) / "classical").exists()


def test_the_ensemble_is_chosen_only_when_it_scores_higher(tmp_path):
    rows_true = ["a", "b", "a", "b"]
    classical = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])  # right on all four
    model = [[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.4, 0.6]]  # right on 3 of 4
    texts, labels = ["x"] * 4, [0, 1, 0, 1]

    class Config_:  # what fit_baseline reads
        class train:
            baseline, best_metric, ensemble = True, "accuracy", "auto"

        class data:
            mask_personal = "stored"

    rows = [{"true": t, "scores": s} for t, s in zip(rows_true, model)]
    run_dir = tmp_path / "run"
    fit_baseline(Config_, ["good", "bad", "good", "bad"], labels, texts, labels, ["a", "b"], run_dir)
    write_json(run_dir / "classical" / "eval_probabilities.json", {"labels": ["a", "b"],
                                                                  "probabilities": classical.tolist()})
    out = choose_answer(run_dir, rows, ["a", "b"])
    assert out["answers_with"]["by"] == "ensemble" and out["answers_with"]["accuracy"] == 1.0
    assert (run_dir / "model" / "ensemble.json").is_file()
    rows = [{"true": t, "scores": s} for t, s in zip(rows_true, classical.tolist())]  # now the model is perfect
    (run_dir / "model" / "ensemble.json").unlink()
    out = choose_answer(run_dir, rows, ["a", "b"])
    assert out["answers_with"]["by"] == "fine-tuned" and not (run_dir / "model" / "ensemble.json").exists()


def test_the_note_names_what_the_baseline_beats():
    m = {"accuracy": 0.6, "f1_macro": 0.3, "baseline": {"accuracy": 0.7, "f1_macro": 0.5}}
    assert "accuracy and f1_macro" in baseline_note(m)
    m["answers_with"] = {"by": "ensemble", "accuracy": 0.72, "f1_macro": 0.55}
    assert baseline_note(m) is None


def test_cli_prints_the_baseline_and_the_choices(tiny_config, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    tiny_config(train={"epochs": None}).save(config)
    code, out, _ = _cli(capsys, tmp_path / "home", "train", str(config))
    assert code == 0
    assert "classical baseline (TF-IDF" in out and "chosen: train.epochs = " in out


# --- evaluate --------------------------------------------------------------------------------------------

def test_evaluate_scores_a_separate_file_beside_the_baseline(tiny_config, tmp_path, capsys):
    home = tmp_path / "home"
    config = tmp_path / "c.yaml"
    tiny_config().save(config)
    assert _cli(capsys, home, "train", str(config))[0] == 0
    test_rows = [{"text": r["text"] + " café", "label": r["label"]} for r in sentiment_rows(40, seed=9)]
    test_file = _write_csv(tmp_path / "test.csv", test_rows, encoding="latin-1", names=("review", "sentiment"))
    code, out, err = _cli(capsys, home, "evaluate", "latest", str(test_file), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["rows"] == 40 and result["encoding"] != "utf-8"
    assert (result["text_column"], result["label_column"]) == ("review", "sentiment")
    assert set(result["per_class"]) == {"neg", "pos"} and np.sum(result["confusion_matrix"]) == 40
    assert 0 <= result["baseline"]["accuracy"] <= 1
    code, out, _ = _cli(capsys, home, "evaluate", "latest", str(test_file))
    assert code == 0 and "classical baseline" in out and "support 20" in out


@pytest.mark.parametrize("problem, match", [
    ("missing", "not found"),
    ("unknown-label", "are not among the run's labels"),
    ("no-rows", "has no rows"),
])
def test_evaluate_refuses_bad_files_with_exit_2(tiny_config, tmp_path, capsys, problem, match):
    home = tmp_path / "home"
    record = train(tiny_config(), store=RunStore(home))
    path = tmp_path / "t.csv"
    if problem == "unknown-label":
        _write_csv(path, [{"text": "fine film", "label": "meh"}, {"text": "good", "label": "pos"}])
    elif problem == "no-rows":
        path.write_text("text,label\n")
    code, _, err = _cli(capsys, home, "evaluate", record["id"], str(path))
    assert code == 2 and match in err and "Traceback" not in err


def test_predict_reads_a_table_with_multi_line_texts(tiny_config, tmp_path, capsys):
    home = tmp_path / "home"
    train(tiny_config(), store=RunStore(home))
    capsys.readouterr()  # the run's console lines
    path = tmp_path / "mails.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"line one\nline two {i} great", "id": i}) for i in range(3)))
    code, out, err = _cli(capsys, home, "predict", "latest", "--file", str(path), "--text-column", "body", "--json")
    assert code == 0, err
    answers = json.loads(out)
    assert [a["text"] for a in answers] == [f"line one\nline two {i} great" for i in range(3)]


def test_chat_refuses_encoder_only_settings():
    with pytest.raises(WorkbenchError, match="train.ensemble = 'off' is not allowed"):
        Config.from_dict({"task": "chat", "model": "smollm2-135m-instruct", "method": {"name": "lora"},
                          "train": {"ensemble": "off"}})


# --- ensembles of runs -----------------------------------------------------------------------------------

def test_an_ensemble_of_runs_is_a_run_that_answers_as_measured(tiny_config, tmp_path, capsys):
    from workbench.ensembles import create_ensemble
    from workbench.evaluate import evaluate_file
    from workbench.predict import load_predictor

    store = RunStore(tmp_path / "home")
    a = train(tiny_config(train={"ensemble": "off"}), store=store)
    b = train(tiny_config(method={"name": "head-only"}, train={"ensemble": "off", "learning_rate": 5e-2}),
              store=store)
    record = create_ensemble([a["id"], b["id"]], store.home)
    m = record["metrics"]
    assert record["status"] == "completed" and set(m["members"]) == {a["id"], b["id"], "classical"}
    rows = json.loads(Path(a["metrics"]["predictions_file"]).read_text())["rows"]
    predictor = load_predictor(record["id"], store.home, calibrated=False)
    assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == 3
    predicted = [p["label"] for p in predictor.predict([r["text"] for r in rows])]
    assert np.mean([p == r["true"] for p, r in zip(predicted, rows)]) == pytest.approx(m["accuracy"])
    test_file = _write_csv(tmp_path / "t.csv", sentiment_rows(20, seed=5))
    result = evaluate_file(record["id"], test_file, store.home)
    assert result["answers_with"] == "ensemble" and result["baseline"] is not None
    code, out, _ = _cli(capsys, store.home, "ensemble", a["id"], a["id"])
    assert code == 2
    other = train(tiny_config(train={"seed": 7}), store=store)
    with pytest.raises(WorkbenchError, match="evaluated on different rows"):
        create_ensemble([a["id"], other["id"]], store.home)


def test_optimised_artifacts_read_long_texts_as_the_run_does(tiny_config, store):
    """int8/ONNX/pruned predictors cut a long text head+tail like the run's own predictor (they cut the head)."""
    from workbench.deploy.artifacts import TorchPredictor, truncation_of
    from workbench.predict import load_predictor

    record = train(tiny_config(train={"ensemble": "off"}), store=store)
    predictor = load_predictor(record["id"], store.home, calibrated=False)
    assert truncation_of(predictor) == "head+tail"
    texts = ["awful " + "the film was a story " * 20 + "great great great", "great " + "plot " * 60 + "awful awful"]
    plain = TorchPredictor(predictor.model, predictor.tokenizer, predictor.labels, predictor.max_length,
                           truncation_of(predictor))
    assert np.allclose(plain.probabilities(texts), predictor.probabilities(texts), atol=1e-5)
    head = TorchPredictor(predictor.model, predictor.tokenizer, predictor.labels, predictor.max_length, "head")
    assert not np.allclose(head.probabilities(texts), predictor.probabilities(texts), atol=1e-5)
