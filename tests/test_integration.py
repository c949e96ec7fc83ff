"""Integration: the real packaged model and data, small samples (a few minutes in all)."""

from __future__ import annotations

import pytest

from workbench.config import Config
from workbench.loop import train

pytestmark = pytest.mark.integration


def _bbc(method: str, **train_over) -> Config:
    return Config.from_dict({
        "model": "minilm-l6",
        "data": {"source": "bbc-news", "max_train_samples": 160, "max_eval_samples": 100},
        "method": {"name": method},
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "max_length": 64, **train_over},
        "track": {"wandb": "disabled", "tensorboard": False},
    })


@pytest.mark.parametrize("method, floor", [("lora", 0.6), ("qlora", 0.5)])
def test_minilm_learns_bbc_news_topics(store, method, floor):
    record = train(_bbc(method), store=store)
    assert record["status"] == "completed", record["error"]
    m = record["metrics"]
    assert m["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert m["accuracy"] > floor, f"{method}: {m['accuracy']} (chance is 0.2)"
    info = record["info"]
    assert info["head_modules"] == ["bert.pooler", "classifier"]
    assert info["target_modules"] == ["dense", "key", "query", "value"]


def test_smollm2_gguf_is_dequantised_once_and_cached(tmp_path):
    import time

    from transformers import AutoConfig

    from workbench.catalog import resolve_model

    start = time.monotonic()
    source = resolve_model("smollm2-135m-instruct", tmp_path)
    first = time.monotonic() - start
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    cfg = AutoConfig.from_pretrained(source.path)
    assert cfg.model_type == "llama" and not hasattr(cfg, "quantization_config")
    start = time.monotonic()
    assert resolve_model("smollm2-135m-instruct", tmp_path).path == source.path
    assert time.monotonic() - start < first / 10, "the second call must use the cache"
