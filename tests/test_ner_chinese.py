"""Token classification on text its tokenizer lacks: the tiny BERT (MiniLM's English WordPiece vocabulary, which
reads most Han characters as [UNK]) trained on a tiny Chinese character-level set adds the characters, records
it, keeps them in tags.json and answers the same after reloading; English text adds nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CITIES, PEOPLE = ["北京", "上海", "广州"], ["张三", "李四"]
DAYS, VERBS = ["今天", "昨天", "明天", "周一", "周末"], ["去", "到", "回"]


def chinese_conll(path: Path, n: int = 60) -> Path:
    """Character-level BIO sentences in CoNLL: a character and its tag a line, a blank line between sentences."""
    rng = random.Random(1)
    blocks = []
    for _ in range(n):
        day, person, verb, city = rng.choice(DAYS), rng.choice(PEOPLE), rng.choice(VERBS), rng.choice(CITIES)
        chars = list(day + person + verb + city + "了")
        tags = ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
        blocks.append("\n".join(f"{c} {t}" for c, t in zip(chars, tags)))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def english_conll(path: Path, n: int = 40) -> Path:
    rng = random.Random(2)
    blocks = []
    for _ in range(n):
        person, city = rng.choice(["alice", "bob"]), rng.choice(["paris", "rome"])
        day, verb = rng.choice(["today", "yesterday", "monday", "friday", "then"]), rng.choice(["went", "drove", "flew"])
        words, tags = [day, person, verb, "to", city], ["O", "B-PER", "O", "O", "B-LOC"]
        blocks.append("\n".join(f"{w} {t}" for w, t in zip(words, tags)))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def make_config(model_dir: Path, data: Path, method: str = "full", epochs: int = 2):
    from workbench.config import Config

    return Config.from_dict({"task": "token-classification", "model": str(model_dir),
                             "data": {"source": str(data), "eval_fraction": 0.25}, "method": {"name": method},
                             "train": {"epochs": epochs, "batch_size": 8, "learning_rate": 3e-3, "max_length": 32,
                                       "warmup_ratio": 0.0, "threads": 1, "early_stopping_patience": 0},
                             "track": {"wandb": "disabled", "tensorboard": False}})


def saved_tags(record: dict) -> dict:
    from workbench.run_paths import RunPaths

    return json.loads(RunPaths.of(record).tags.read_text())


def test_missing_characters_are_added_recorded_saved_and_reloaded(tiny_model_dir: Path, store, tmp_path: Path) -> None:
    import workbench
    from workbench.predict import load_predictor

    record = workbench.train(make_config(tiny_model_dir, chinese_conll(tmp_path / "zh.conll")), store=store)
    assert record["status"] == "completed", record.get("error")
    vocab = record["info"]["vocabulary"]
    added = saved_tags(record)["added_tokens"]
    assert vocab["added_characters"] == len(added) > 0 and 0.0 < vocab["unknown_share"] <= 1.0
    assert "unknown token" in vocab["why"]
    assert set(added) <= set("".join(CITIES + PEOPLE + DAYS + VERBS) + "了")

    first, second = load_predictor(record["id"], store.home), load_predictor(record["id"], store.home)
    assert len(first.tokenizer) == len(second.tokenizer) and first.tokenizer.convert_tokens_to_ids(added) == \
        second.tokenizer.convert_tokens_to_ids(added)
    assert first.tokenizer.unk_token_id not in first.tokenizer("张三去上海了", add_special_tokens=False)["input_ids"]
    rows = json.loads(Path(record["metrics"]["predictions_file"]).read_text())["rows"]
    tagged = first.predict([row["tokens"] for row in rows])
    assert [a["tags"] for a in tagged] == [row["predicted"] for row in rows]  # the reloaded model is the evaluated one
    assert [a["tags"] for a in second.predict([row["tokens"] for row in rows])] == [a["tags"] for a in tagged]
    assert record["metrics"]["f1"] > 0.5, record["metrics"]


def test_english_text_adds_nothing(tiny_model_dir: Path, store, tmp_path: Path) -> None:
    import workbench

    record = workbench.train(make_config(tiny_model_dir, english_conll(tmp_path / "en.conll"), epochs=1), store=store)
    assert record["status"] == "completed", record.get("error")
    assert "vocabulary" not in record["info"]
    assert saved_tags(record)["added_tokens"] == []


@pytest.mark.parametrize("method", ["lora", "head-only"])
def test_new_rows_train_under_methods_that_freeze_the_encoder(method: str, tiny_model_dir: Path, store,
                                                             tmp_path: Path) -> None:
    import workbench
    from safetensors.torch import load_file

    from workbench.predict import load_predictor
    from workbench.run_paths import RunPaths

    record = workbench.train(make_config(tiny_model_dir, chinese_conll(tmp_path / "zh.conll"), method, 1),
                             store=store)
    assert record["status"] == "completed", record.get("error")
    state = load_file(str(RunPaths.of(record).trainable))
    [name] = [n for n in state if "word_embeddings" in n]
    n_added = len(saved_tags(record)["added_tokens"])
    rows = state[name][-n_added:]
    assert not bool((rows == rows[0]).all()), "the added rows stayed at their common starting mean"
    assert load_predictor(record["id"], store.home).predict("张三去上海了")[0]["tokens"] == list("张三去上海了")


def test_embedding_rows_get_their_own_learning_rate(tiny_model_dir: Path) -> None:
    from workbench.catalog import resolve_model
    from workbench.loop.trainer import parameter_groups
    from workbench.models.token_classifier import EMBEDDING_LEARNING_RATE, build_token_classifier

    config = make_config(tiny_model_dir, tiny_model_dir / "unused.conll")
    source = resolve_model(str(tiny_model_dir), tiny_model_dir)
    plain = build_token_classifier(config, source, ["O", "B-PER", "I-PER"])
    assert plain.learning_rates == {} and len(parameter_groups(plain)) == 1
    grown = build_token_classifier(config, source, ["O", "B-PER", "I-PER"], added_tokens=["旮", "旯", "旮"])
    [(name, rate)] = grown.learning_rates.items()
    assert "word_embeddings" in name and rate == max(EMBEDDING_LEARNING_RATE, config.train.learning_rate)
    groups = parameter_groups(grown)
    assert len(groups) == 2 and groups[1]["lr"] == rate
    assert grown.added_tokens == ["旮", "旯"]
    assert grown.model.get_input_embeddings().weight.shape[0] == plain.model.get_input_embeddings().weight.shape[0] + 2


def test_a_merged_export_keeps_the_added_characters(tiny_model_dir: Path, store, tmp_path: Path) -> None:
    """Export rebuilds the tagger with tags.json's added tokens: the merged model and its tokenizer read the
    characters as the run did and tag as the run's predictor does."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    import workbench
    from workbench.export import export_run
    from workbench.predict import load_predictor

    record = workbench.train(make_config(tiny_model_dir, chinese_conll(tmp_path / "zh.conll"), "lora", 1),
                             store=store)
    assert record["status"] == "completed", record.get("error")
    out = export_run(record["id"], merge=True, home=store.home, out=tmp_path / "export")
    tags = json.loads((out / "labels.json").read_text())
    model, tokenizer = AutoModelForTokenClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    words = list("张三去上海了")
    batch = tokenizer([words], is_split_into_words=True, return_tensors="pt")
    assert tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    with torch.no_grad():
        ids = model.eval()(**batch).logits[0].argmax(-1).tolist()
    firsts = {w: i for i, w in reversed(list(enumerate(batch.word_ids()))) if w is not None}
    assert [tags[ids[firsts[w]]] for w in range(len(words))] == \
        load_predictor(record["id"], store.home).predict([words])[0]["tags"]


def test_an_adapter_export_says_to_grow_the_base_and_then_tags_as_the_run(tiny_model_dir: Path, store,
                                                                           tmp_path: Path) -> None:
    """Unmerged, the adapter holds the grown word embeddings: the export's load line says to resize the base to
    the exported tokenizer first, and done so, it tags as the run's predictor does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    import workbench
    from workbench.export import EXPORT_INFO, export_run
    from workbench.predict import load_predictor

    record = workbench.train(make_config(tiny_model_dir, chinese_conll(tmp_path / "zh.conll"), "lora", 1),
                             store=store)
    assert record["status"] == "completed", record.get("error")
    out = export_run(record["id"], merge=False, home=store.home, out=tmp_path / "adapter")
    info = json.loads((out / EXPORT_INFO).read_text())
    assert "resize_token_embeddings" in info["load"] and info["added_tokens"] > 0
    tags, tokenizer = json.loads((out / "labels.json").read_text()), AutoTokenizer.from_pretrained(out)
    base = AutoModelForTokenClassification.from_pretrained(str(tiny_model_dir), num_labels=len(tags))
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, out)
    words = list("张三去上海了")
    batch = tokenizer([words], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.eval()(**batch).logits[0].argmax(-1).tolist()
    firsts = {w: i for i, w in reversed(list(enumerate(batch.word_ids()))) if w is not None}
    assert [tags[ids[firsts[w]]] for w in range(len(words))] == \
        load_predictor(record["id"], store.home).predict([words])[0]["tags"]
