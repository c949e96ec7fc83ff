"""workbench optimize: int8 (torch and onnxruntime), structured pruning and ONNX export of a classification run,
the report, and serving an artifact. A tiny BERT (hidden 32, 2 layers, 2 heads) trained here in seconds."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from workbench.cli import main
from workbench.config import Config
from workbench.deploy.adapter import eval_split, load_served_model, merge_adapters
from workbench.deploy.app import create_app
from workbench.deploy.artifacts import (OnnxPredictor, TorchPredictor, apply_pruning, export_onnx, fuse_onnx,
                                       optimize, pruning_plan)
from workbench.deploy.server import ThreadedServer, artifact_warning
from workbench.errors import WorkbenchError
from workbench.predict import load_predictor
from workbench.store import RunStore

KEY = "wb-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, tiny_csv):
    import workbench

    home = tmp_path_factory.mktemp("optimize-home")
    raw = {"model": str(tiny_model_dir), "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                     "early_stopping_patience": 0, "threads": 1},
           "track": {"wandb": "disabled", "tensorboard": False}}
    record = workbench.train(Config.from_dict(raw), store=RunStore(home))
    assert record["status"] == "completed", record.get("error")
    return record["id"], home


@pytest.fixture(scope="module")
def report(run):
    run_id, home = run
    stages = []
    result = optimize(run_id, home, int8=True, prune=True, onnx=True, prune_heads=0.5, prune_ffn=0.4,
                      progress=lambda stage, fraction: stages.append((stage, fraction)))
    return result, stages


def _fp32(run_id, home) -> TorchPredictor:
    p = load_predictor(run_id, home)
    return TorchPredictor(merge_adapters(p.model), p.tokenizer, p.labels, p.max_length)


def test_report_compares_every_artifact_with_fp32_on_the_evaluation_split(run, report):
    run_id, home = run
    result, stages = report
    texts, gold, labels = eval_split(RunStore(home).get(run_id))
    assert result["eval_size"] == len(texts) == 24
    assert set(result["artifacts"]) == {"int8", "pruned", "onnx"}
    for name, a in result["artifacts"].items():
        for key in ("speedup", "agreement", "accuracy", "size_mb", "samples_per_s", "marked", "reasons"):
            assert key in a, (name, key)
        for batch in ("batch_1", "batch_32"):
            assert a["latency_ms"][batch]["p95"] >= a["latency_ms"][batch]["p50"] > 0
        assert a["marked"] == bool(a["reasons"])
        assert a["marked"] == (a["speedup"] < 1.0 or round(result["fp32"]["accuracy"] - a["accuracy"], 6) > 0.01)
    assert set(result["artifacts"]["int8"]["candidates"]) == {"int8-torch", "int8-onnx"}
    kept = result["artifacts"]["int8"]["backend"]
    candidates = result["artifacts"]["int8"]["candidates"]
    faithful = {n: c["samples_per_s"] for n, c in candidates.items() if not c["marked"] and c["agreement"] >= 0.99}
    speeds = faithful or {n: c["samples_per_s"] for n, c in candidates.items()}
    # the faster of those that agree with fp32 and keep its accuracy (of all, when none does) is kept
    assert speeds["int8-torch" if kept == "torch" else "int8-onnx"] == max(speeds.values())
    assert candidates["int8-onnx"]["fused_ops"].get("Attention") == 2  # one per layer of the tiny BERT
    # the reported accuracy is the artifact's own, recomputed here from the served artifact
    for name in ("int8", "pruned", "onnx"):
        served = load_served_model(run_id, home, artifact=name)
        predicted = [labels.index(r["label"]) for r in served.predict(texts)]
        assert result["artifacts"][name]["accuracy"] == pytest.approx(np.mean(np.array(predicted) == gold), abs=1e-4)
    fp32_acc = np.mean(np.array([labels.index(r["label"]) for r in _fp32(run_id, home).predict(texts)]) == gold)
    assert result["fp32"]["accuracy"] == pytest.approx(fp32_acc, abs=1e-4)
    assert result["artifacts"]["onnx"]["agreement"] == 1.0  # the same model, another runtime
    run_dir = RunStore(home).run_dir(run_id)
    assert json.loads((run_dir / "deploy" / "report.json").read_text())["run"] == run_id
    assert "| int8" in (run_dir / "deploy" / "report.md").read_text()
    assert stages[0] == ("loading the run", 0.0) and stages[-1] == ("done", 1.0)


def test_onnx_export_and_its_fused_graph_give_the_torch_logits(run, tmp_path):
    run_id, home = run
    fp32 = _fp32(run_id, home)
    texts = ["great great film", "an awful awful plot with music", "x"]  # other lengths than the export sample
    before = fp32.probabilities(texts)
    export_onnx(fp32.model, fp32.tokenizer, tmp_path / "m.onnx", fp32.max_length)
    onnx = OnnxPredictor(tmp_path / "m.onnx", fp32.tokenizer, fp32.labels, fp32.max_length, threads=1)
    np.testing.assert_allclose(onnx.probabilities(texts), before, atol=1e-5)
    stats = fuse_onnx(tmp_path / "m.onnx", tmp_path / "fused.onnx", fp32.model.config)
    assert stats.get("Attention") == 2 and stats.get("SkipLayerNormalization", 0) > 0  # fused, not skipped
    fused = OnnxPredictor(tmp_path / "fused.onnx", fp32.tokenizer, fp32.labels, fp32.max_length, threads=1)
    np.testing.assert_allclose(fused.probabilities(texts), before, atol=1e-5)
    # exporting leaves the torch model as it was (exporting MiniLM itself changed 4 of 96 later predictions)
    np.testing.assert_array_equal(fp32.probabilities(texts), before)


def test_pruning_shrinks_the_matrices_and_keeping_everything_changes_nothing(run):
    run_id, home = run
    fp32 = _fp32(run_id, home)
    texts = ["great great film", "awful plot", "the music was lovely"]
    layers = [m for m in fp32.model.modules() if hasattr(m, "intermediate")]
    keep_all = [{"heads": [0, 1], "neurons": list(range(64))} for _ in layers]
    import copy

    same = apply_pruning(copy.deepcopy(fp32.model), keep_all)
    np.testing.assert_allclose(TorchPredictor(same, fp32.tokenizer, fp32.labels, 32).probabilities(texts),
                               fp32.probabilities(texts), atol=1e-6)
    plan = pruning_plan(fp32.model, fp32.tokenizer, texts, 32, heads_fraction=0.5, ffn_fraction=0.4)
    assert all(len(p["heads"]) == 1 and len(p["neurons"]) == 38 for p in plan)
    pruned = apply_pruning(copy.deepcopy(fp32.model), plan)
    layer = [m for m in pruned.modules() if hasattr(m, "intermediate")][0]
    assert layer.attention.self.query.out_features == 16 and layer.attention.output.dense.in_features == 16
    assert layer.intermediate.dense.out_features == 38 and layer.output.dense.in_features == 38
    before = sum(p.numel() for p in fp32.model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < before
    assert TorchPredictor(pruned, fp32.tokenizer, fp32.labels, 32).probabilities(texts).shape == (3, 2)


def test_cli_prints_the_report_as_json_and_refuses_bad_input(run, report, capsys):
    run_id, home = run
    assert main(["--home", str(home), "optimize", run_id, "--int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["artifacts"]) == {"int8"}
    assert {"speedup", "agreement", "accuracy"} <= set(out["artifacts"]["int8"])
    assert main(["--home", str(home), "optimize", run_id, "--prune", "--prune-ffn", "1.5"]) == 2
    assert "prune_ffn must be a fraction" in capsys.readouterr().err
    assert main(["--home", str(home), "serve", run_id, "--artifact", "nope"]) == 2
    assert "has no artifact 'nope'" in capsys.readouterr().err
    assert main(["--home", str(home), "serve", run_id, "--host", "0.0.0.0", "--no-api-key"]) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_a_marked_artifact_is_served_with_a_warning(run, report):
    run_id, home = run
    run_dir = RunStore(home).run_dir(run_id)
    path = run_dir / "deploy" / "pruned" / "artifact.json"
    info = json.loads(path.read_text())
    info.update(marked=True, reasons=["loses 5.0 accuracy points"])
    path.write_text(json.dumps(info))
    assert artifact_warning(run_dir, "pruned") == ("warning: artifact pruned is marked in the optimize report: "
                                                  "loses 5.0 accuracy points")
    served = load_served_model(run_id, home, artifact="pruned")
    app, _ = create_app(served, api_key=KEY)
    with ThreadedServer(app) as url:
        ready = httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
        r = httpx.post(url + "/v1/classify", json={"texts": ["great film"]},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert ready["artifact"] == "pruned" and ready["marked"] is True
    assert r.status_code == 200 and r.json()["artifact"] == "pruned"


def test_a_generation_run_is_refused_with_the_reason(run, monkeypatch):
    run_id, home = run

    class Chat:
        task = "chat"

    import sys

    # the module, not `workbench.predict` the function that workbench/__init__ binds over its name
    monkeypatch.setattr(sys.modules["workbench.predict"], "load_predictor", lambda *a, **k: Chat())
    with pytest.raises(WorkbenchError, match="is a chat run: optimize handles classification"):
        optimize(run_id, home, int8=True)
