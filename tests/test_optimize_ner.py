"""workbench optimize on a named-entity run: int8 (torch and onnxruntime), ONNX and pruning of a tiny BERT tagger,
the report (entity F1 against fp32, tag agreement per word), and serving an artifact through /v1/ner's predictor.
The tagger is trained here in seconds on synthetic CoNLL sentences (tests/test_ner.py's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_ner import synthetic_conll
from workbench.config import Config
from workbench.deploy.adapter import load_served_model
from workbench.deploy.artifacts import agreement_of, apply_artifact, optimize, report_markdown
from workbench.predict import load_predictor
from workbench.store import RunStore

KEY = "wb-test-key-0123456789abcdef"

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tagger_run(tmp_path_factory, tiny_model_dir):
    import workbench

    home = tmp_path_factory.mktemp("optimize-ner-home")
    data = synthetic_conll(home / "train.conll", 120)
    raw = {"task": "token-classification", "model": str(tiny_model_dir),
           "data": {"source": str(data), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1},
           "track": {"wandb": "disabled", "tensorboard": False}}
    record = workbench.train(Config.from_dict(raw), store=RunStore(home))
    assert record["status"] == "completed", record.get("error")
    return record, home


@pytest.fixture(scope="module")
def report(tagger_run):
    record, home = tagger_run
    return optimize(record["id"], home, int8=True, onnx=True, prune=True, prune_heads=0.5, prune_ffn=0.4)


def _held(record, home):
    from workbench.tasks import task_of

    config = Config.from_dict(record["config"])
    return task_of(config).load_data(config, home).held


def _merged(record, home):
    """The run's fp32 tagger over its model with the adapters merged (what the server hands apply_artifact)."""
    from workbench.deploy.adapter import merge_adapters

    p = load_predictor(record["id"], home)
    return p.with_model(merge_adapters(p.model))


def test_report_measures_each_artifact_against_fp32_by_entity_f1(tagger_run, report):
    record, home = tagger_run
    held = _held(record, home)
    assert report["eval_size"] == len(held) == 30
    assert report["metric"] == "f1" and report["unit"] == "sentences" and report["labels"] == ["LOC", "PER"]
    assert set(report["artifacts"]) == {"int8", "onnx", "pruned"}
    assert set(report["artifacts"]["int8"]["candidates"]) == {"int8-torch", "int8-onnx"}
    assert report["artifacts"]["int8"]["candidates"]["int8-onnx"]["fused_ops"].get("Attention") == 2
    assert 0.0 <= report["fp32"]["f1"] <= 1.0 and "accuracy" not in report["fp32"]
    for name, a in [*report["artifacts"].items(), *report["artifacts"]["int8"]["candidates"].items()]:
        for key in ("speedup", "speedup_batch_1", "agreement", "f1", "f1_delta", "size_mb", "samples_per_s",
                    "marked", "reasons"):
            assert key in a, (name, key)
        for batch in ("batch_1", "batch_32"):
            assert a["latency_ms"][batch]["p95"] >= a["latency_ms"][batch]["p50"] > 0
        assert a["marked"] == bool(a["reasons"])
        assert a["marked"] == (a["speedup"] < 1.0 or round(report["fp32"]["f1"] - a["f1"], 6) > 0.01)
        assert all("accuracy" not in r for r in a["reasons"])
    for name in ("int8", "onnx"):  # int8 and ONNX copies of a tagger tag the words as fp32 does
        assert report["artifacts"][name]["agreement"] >= 0.9, (name, report["artifacts"][name])
    assert report["artifacts"]["onnx"]["agreement"] >= 0.98  # the same fp32 weights, fused kernels
    saved = json.loads((Path(record["dir"]) / "deploy" / "report.json").read_text())
    assert saved["artifacts"].keys() == report["artifacts"].keys()
    md = report_markdown(report)
    assert "30 evaluation sentences" in md and "| f1 |" in md and "sentences/s" in md
    for name in report["artifacts"]:
        info = json.loads((Path(record["dir"]) / "deploy" / name / "artifact.json").read_text())
        assert info["name"] == name and info["run"] == record["id"]


def test_each_served_artifact_answers_with_entity_spans_like_fp32(tagger_run, report):
    from workbench.entities import entity_figures

    record, home = tagger_run
    held = _held(record, home)
    fp32 = _merged(record, home)
    sentences = [s.tokens for s in held]
    reference = [a["tags"] for a in fp32.predict(sentences)]
    for name in ("int8", "onnx", "pruned"):
        predictor, info = apply_artifact(_merged(record, home), Path(record["dir"]), name)
        assert info["name"] == name
        answers = predictor.predict(sentences)
        tags = [a["tags"] for a in answers]
        # what the report says of the artifact is what the served artifact does
        assert agreement_of(tags, reference) == pytest.approx(report["artifacts"][name]["agreement"], abs=1e-4)
        f1 = entity_figures([s.tags for s in held], tags, ["LOC", "PER"])[0]["f1"]
        assert f1 == pytest.approx(report["artifacts"][name]["f1"], abs=1e-4)
        [raw] = predictor.predict("We saw alice in paris, then bob.")
        assert len(raw["tokens"]) == len(raw["tags"])
        for e in raw["entities"]:
            assert raw["text"][e["start"]: e["end"]] == e["text"] and e["type"] in ("LOC", "PER")


def test_the_server_answers_v1_ner_with_an_artifact(tagger_run, report):
    import httpx

    from workbench.deploy.app import create_app
    from workbench.deploy.server import ThreadedServer

    record, home = tagger_run
    for name in ("int8", "onnx"):
        served = load_served_model(record["id"], home, artifact=name)
        assert served.route == "/v1/ner" and served.artifact == name and set(served.labels) == {"LOC", "PER"}
        [answer] = served.predict(["alice went to paris today"])
        assert set(answer) == {"entities", "tokens", "tags"} and answer["tokens"][0] == "alice"
    app, _ = create_app(served, api_key=KEY)
    with ThreadedServer(app) as url:
        r = httpx.post(url + "/v1/ner", json={"texts": ["We saw alice in paris, then bob."]},
                       headers={"Authorization": f"Bearer {KEY}"})
        ready = httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    for e in result["entities"]:
        assert result["text"][e["start"]: e["end"]] == e["text"] and e["type"] in ("LOC", "PER")
    assert ready["artifact"] == "onnx"


def test_cli_optimizes_a_tagger_run(tagger_run, report, capsys):
    """Last: it rebuilds the run's int8 and onnx artifacts."""
    from workbench.cli import main

    record, home = tagger_run
    assert main(["--home", str(home), "optimize", record["id"], "--int8", "--onnx", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["artifacts"]) == {"int8", "onnx"} and out["metric"] == "f1"
    assert main(["--home", str(home), "optimize", record["id"], "--onnx"]) == 0
    assert "| f1 |" in capsys.readouterr().out
