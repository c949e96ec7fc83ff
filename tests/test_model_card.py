"""The model card: every export holds one as README.md, with the record's figures, the trust reports when the run
has them and "not measured" when it has not; regression, NER and chat records render too."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from workbench.errors import WorkbenchError
from workbench.export import EXPORT_INFO, export_run
from workbench.loop import train
from workbench.model_card import CARD_FILE, model_card, write_model_card
from workbench.run_paths import RunPaths


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def _section(card: str, title: str) -> str:
    """The text of one `## title` section."""
    after = card.split(f"\n## {title}\n", 1)[1]
    return after.split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config):
    """A tiny LoRA run with its classical baseline, and its store."""
    from workbench.store import RunStore

    store = RunStore(tmp_path_factory.mktemp("card-home"))
    record = train(tiny_config(train={"epochs": 1, "batch_size": 12, "learning_rate": 5e-3}), store=store)
    assert record["status"] == "completed", record["error"]
    return store.get(record["id"]), store


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir, tiny_csv):  # module scope: one training run serves every test here
    from workbench.config import Config

    def make(**sections):
        raw = {"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
               "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
               "train": {"max_length": 32, "warmup_ratio": 0.0, "early_stopping_patience": 0, "threads": 1},
               "track": {"wandb": "disabled", "tensorboard": False}}
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return Config.from_dict(raw)

    return make


@pytest.mark.parametrize("merge", [True, False])
def test_an_export_holds_the_card_with_the_records_figures(trained, tmp_path, merge):
    record, store = trained
    out = export_run(record["id"], out=tmp_path / "export", merge=merge, home=store.home)
    names = {p.name for p in out.iterdir()}
    assert {CARD_FILE, EXPORT_INFO, "labels.json", "tokenizer.json"} <= names, names  # the export's own files stay
    assert ("model.safetensors" if merge else "adapter_model.safetensors") in names
    card = (out / CARD_FILE).read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == ("transformers" if merge else "peft")  # ours, not peft's own README
    assert meta["pipeline_tag"] == "text-classification" and "lora" in meta["tags"]
    figures = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    m = record["metrics"]
    assert figures == {"accuracy": round(m["accuracy"], 4), "f1_macro": round(m["f1_macro"], 4)}
    evaluation = _section(card, "Evaluation")
    assert f"| accuracy | {m['accuracy']:.4f} | 95 % interval" in evaluation
    assert f"| f1_macro | {m['f1_macro']:.4f} |" in evaluation
    baseline = _section(card, "Classical baseline")
    base = m["baseline"]
    assert f"| accuracy | {m['accuracy']:.4f} | {base['accuracy']:.4f} |" in baseline
    assert f"| f1_macro | {m['f1_macro']:.4f} | {base['f1_macro']:.4f} |" in baseline
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["load"] in _section(card, "How to load")
    assert ("PeftModel.from_pretrained" in card) is not merge
    assert yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0]) == record["config"]


def test_calibration_shows_the_records_numbers_or_says_not_measured(trained, tmp_path):
    record, _ = trained
    bare = copy.deepcopy(record)
    bare["metrics"].pop("calibration", None)
    bare["dir"] = str(tmp_path / "no-such-run")  # no calibration.json either
    assert _section(model_card(bare), "Calibration").strip().startswith("not measured: train with")

    fitted = copy.deepcopy(bare)
    fitted["metrics"]["calibration"] = {"method": "temperature", "temperature": 1.8731, "ece_before": 0.1234,
                                        "ece_after": 0.0456, "rows": 24, "note": "fitted on the eval split",
                                        "bins_after": [{"lower": 0.5, "upper": 0.6, "count": 7, "confidence": 0.55,
                                                        "accuracy": 0.5714}]}
    fitted["config"]["train"]["abstain_below"] = 0.65
    section = _section(model_card(fitted), "Calibration")
    assert "| temperature | 1.8731 (above 1: the model was overconfident) |" in section
    assert "| ECE before | 0.1234 |" in section and "| ECE after | 0.0456 |" in section
    assert "| 0.5-0.6 | 7 | 0.5500 | 0.5714 |" in section and "Abstains below 0.65" in section
    assert "divide the logits by the temperature 1.873" in _section(model_card(fitted, {"merged": True, "load": "x"}),
                                                                     "How to load")


def test_trust_reports_written_by_hand_show_up_masked_and_escaped(trained, tmp_path):
    record = copy.deepcopy(trained[0])
    record["dir"] = str(tmp_path / "run")
    paths = RunPaths.of(record)
    paths.trust.mkdir(parents=True)
    assert f"not measured: run `workbench evaluate {record['id']} TEST_FILE --robustness`" in _section(
        model_card(record), "Robustness")
    paths.calibration.write_text(json.dumps({"method": "temperature", "temperature": 0.7, "ece_before": 0.2,
                                             "ece_after": 0.05, "rows": 24}))
    paths.robustness.write_text(json.dumps({  # the shape workbench.robustness writes
        "kind": "classification", "rows": 80, "labels": ["neg", "pos"],
        "clean": {"accuracy": 0.9125, "f1_macro": 0.91, "mean_confidence": 0.88},
        "perturbations": [{"name": "typos", "description": "a typo in 10 % of the words", "changed": 80,
                           "accuracy": 0.8375, "flip_rate": 0.0912, "examples": [{"clean": "a", "perturbed": "b"}]},
                          {"name": "lowercase", "description": "lower case", "changed": 50, "accuracy": 0.9,
                           "flip_rate": 0.0125, "examples": []}],
        "ood": {"source": "built-in", "in_domain_confidence": 0.88, "notes": [],
                "sets": [{"name": "word salad", "rows": 300, "mean_confidence": 0.64, "shift": -0.2468,
                          "auroc": 0.81, "examples": ["x y z"]}]}}))
    paths.slices.write_text(json.dumps({
        "slices": [{"slice": "length > 40 tokens", "rows": 12, "accuracy": 0.5833},
                   {"slice": "<script>alert(1)</script>", "rows": 3, "accuracy": 1.0}],
        "flagged": [{"slice": "length > 40 tokens", "gap": -0.33}],
        "examples": ["write to ann@example.org please"]}))
    paths.faithfulness.write_text(json.dumps({"top_k": 0.3141, "random_k": 0.1047, "ratio": 3.0}))
    card = model_card(record)
    robustness = _section(card, "Robustness")
    assert "clean:\n\n| figure | value |\n|---|---|\n| accuracy | 0.9125 |" in robustness
    assert "| typos | a typo in 10 % of the words | 80 | 0.8375 | 0.0912 |" in robustness
    assert "(examples of each row: in the run's report)" in robustness
    assert "ood sets:\n\n| name | rows | mean_confidence | shift | auroc |" in robustness
    assert "| word salad | 300 | 0.6400 | -0.2468 | 0.8100 |" in robustness
    slices = _section(card, "Slices")
    assert "Flagged (a gap this report marks): length &gt; 40 tokens (gap -0.3300)." in slices
    assert "| length &gt; 40 tokens | 12 | 0.5833 |" in slices
    assert "<script>" not in card and "&lt;script&gt;" in slices
    assert "ann@example.org" not in card and "write to [EMAIL] please" in slices
    assert "| ratio | 3.0000 |" in _section(card, "Explanations") and "Ratio of the two: 3.00 (above 1" in card
    assert "| temperature | 0.7000 (below 1: the model was underconfident) |" in _section(card, "Calibration")


def _record(task: str, metrics: dict, info: dict, tmp_path: Path, **config) -> dict:
    return {"id": f"run-{task}", "name": None, "status": "completed", "dir": str(tmp_path / task),
            "config": {"task": task, "model": "minilm-l6", "data": {"source": "movie-ratings", **config.get("data", {})},
                       "method": {"name": "lora", "r": 8}, "train": {"max_length": 128, **config.get("train", {})}},
            "info": info, "metrics": metrics}


def test_regression_ner_and_chat_records_render(tmp_path):
    regression = _record("text-regression", {
        "step": 40, "epoch": 2.0, "eval_loss": 0.61, "rmse": 1.2345, "mae": 0.9, "spearman": 0.612, "r2": 0.3,
        "baseline_rmse": 1.5, "baseline": {"method": "TF-IDF + ridge", "rmse": 1.1111, "mae": 0.8, "spearman": 0.65}},
        {"train_rows": 200, "eval_rows": 50, "target_mean": 0.25, "target_std": 1.7}, tmp_path)
    card = model_card(regression)
    assert _front_matter(card)["pipeline_tag"] == "text-classification"
    # a catalog model names its hub id and language, so the Hub links the card to its base
    assert _front_matter(card)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert _front_matter(card)["language"] == ["en"]
    assert "| rmse | 1.2345 |" in _section(card, "Evaluation")
    assert "not better than the classical baseline on rmse (1.2345 vs 1.1111)" in _section(card, "Classical baseline")
    assert "Does not apply" in _section(card, "Calibration") and "mean 0.2500" in _section(card, "Training data")

    ner = _record("token-classification", {
        "step": 10, "epoch": 1.0, "eval_loss": 0.4, "f1": 0.5123, "precision": 0.5, "recall": 0.52, "accuracy": 0.9,
        "per_type": {"person": {"precision": 0.6, "recall": 0.7, "f1": 0.6462, "support": 10}}},
        {"train_rows": 80, "eval_rows": 20, "labels": ["person"], "train_entity_counts": {"person": 31}}, tmp_path,
        data={"source": "wnut-16"})
    card = model_card(ner)
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "token-classification" and meta["metrics"] == ["accuracy", "f1", "precision",
                                                                                    "recall"]
    assert "| person | 0.6000 | 0.7000 | 0.6462 | 10 |" in _section(card, "Evaluation")
    assert "no classical baseline for this task" in _section(card, "Classical baseline")
    assert "| person | 31 | 100.0 % |" in _section(card, "Training data")

    chat = _record("chat", {"step": 5, "epoch": 1.0, "eval_loss": 2.5, "perplexity": 12.18}, {}, tmp_path,
                   data={"source": "chatterbot"})
    card = model_card(chat)
    assert _front_matter(card)["pipeline_tag"] == "text-generation" and "| perplexity | 12.1800 |" in card

    unfinished = _record("text-classification", {}, {}, tmp_path)
    assert "not measured: the run has no evaluation" in _section(model_card(unfinished), "Evaluation")


def test_write_model_card_is_atomic_and_refuses_a_missing_directory(trained, tmp_path):
    record, _ = trained
    path = write_model_card(record, tmp_path)
    assert path == tmp_path / CARD_FILE and path.read_text() == model_card(record)
    assert [p.name for p in tmp_path.iterdir()] == [CARD_FILE], "no temporary file left behind"
    with pytest.raises(WorkbenchError, match=r"cannot write a model card into .*missing.*: it is not a directory"):
        write_model_card(record, tmp_path / "missing")
    with pytest.raises(WorkbenchError, match=r"model_card needs a run record with its config"):
        model_card({"id": "x"})


def test_the_deploy_tab_shows_the_card_and_writes_it_into_the_export(trained):
    pytest.importorskip("ipywidgets")
    from widgets import DeployPanel

    record, store = trained
    panel = DeployPanel(store=store, background=False)
    try:
        assert panel.run_id == record["id"] and "## Calibration" in panel.card
        shown = panel._card_view.get_state()["outputs"][0]["data"]["text/markdown"]
        assert shown.startswith(f"# {record['name'] or record['id']}") and "library_name" not in shown  # no YAML
        assert f"| accuracy | {record['metrics']['accuracy']:.4f} |" in shown
        assert "not an export: `workbench export" in shown
        assert panel.write_card() is None and "has no export in" in panel.error

        out = export_run(record["id"], home=store.home, merge=True, force=True)
        (out / CARD_FILE).unlink()
        panel.error = ""
        panel._write_card.click()
        assert panel.error == "" and (out / CARD_FILE).is_file() and "written:" in panel._card_status.value
        assert (out / CARD_FILE).read_text() == panel.card and "In one line, as the export records it" in panel.card
    finally:
        panel.close()


def test_cli_card_prints_the_card_and_writes_it_into_a_directory(trained, tmp_path, capsys):
    from workbench.cli import main

    record, store = trained
    argv = ["--home", str(store.home)]
    assert main([*argv, "card", record["id"]]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("---\n") and "## Calibration" in printed
    out = tmp_path / "card-out"
    out.mkdir()
    assert main([*argv, "card", record["id"], "--out", str(out)]) == 0
    assert (out / "README.md").read_text(encoding="utf-8").startswith("---\n")
