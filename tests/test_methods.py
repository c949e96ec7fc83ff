"""Methods: trainable parameters per method, LoRA targets, and the inspect estimate against reality."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.catalog import resolve_model
from workbench.data import prepare
from workbench.models.classifier import build_model
from workbench.models.inspect import inspect_model


@pytest.mark.parametrize("method, targets, train_head", [
    ("full", "auto", True),
    ("head-only", "auto", True),
    ("lora", "auto", True),
    ("lora", ["query", "value"], False),
    ("lora", "all-linear", True),
])
def test_inspect_counts_the_parameters_the_method_really_trains(tiny_config, method, targets, train_head):
    cfg = tiny_config(method={"name": method, "r": 4, "target_modules": targets, "train_head": train_head})
    split = prepare(cfg.data, cfg.train.seed)
    built = build_model(cfg, resolve_model(cfg.model, Path("."), False), split.labels)
    info = inspect_model(cfg.model, method=method, num_labels=2, r=4, target_modules=targets,
                         train_head=train_head)
    assert info["trainable_parameters"] == built.trainable_params
    assert info["parameters"] == built.total_params or method in ("lora",)  # peft adds adapter weights
    assert info["memory_estimate_mb"] > 0


def test_pinned_counts_on_the_tiny_model(tiny_config):
    """hidden 32, 2 layers, intermediate 64, 2 labels."""
    counts = {}
    for method in ("full", "head-only", "lora"):
        cfg = tiny_config(method={"name": method, "r": 4})
        split = prepare(cfg.data, cfg.train.seed)
        counts[method] = build_model(cfg, resolve_model(cfg.model, Path("."), False), split.labels).trainable_params
    head = 32 * 32 + 32 + 32 * 2 + 2  # pooler + classifier
    per_layer_lora = 4 * ((32 + 32) * 4 + (32 + 64) + (64 + 32))  # q, k, v, attn-out; intermediate; output
    assert counts["head-only"] == head
    assert counts["lora"] == head + 2 * per_layer_lora
    assert counts["full"] > 30522 * 32  # embeddings train too


def test_inspect_zero_shot_trains_nothing(tiny_config):
    info = inspect_model(str(tiny_config().model), method="zero-shot-embedding", num_labels=2)
    assert info["trainable_parameters"] == 0 and "nothing is trained" in info["note"]
    assert info["memory_breakdown_mb"]["gradients_and_optimiser"] == 0


def test_zero_shot_runs_have_no_model_to_predict_with(tiny_config, store):
    from workbench.errors import WorkbenchError
    from workbench.predict import load_predictor
    from workbench.loop import train

    record = train(tiny_config(method={"name": "zero-shot-embedding"}), store=store)
    assert record["status"] == "completed"
    with pytest.raises(WorkbenchError, match="zero-shot-embedding baseline: it trained no model"):
        load_predictor(record["id"], home=store.home)
