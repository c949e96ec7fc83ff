"""Seq2seq tuning (task: seq2seq): labels and padding, column detection, a run that lowers the held-out loss
with BLEU/chrF equal to sacrebleu's on the same strings, predict, the CLI, and bad input.

Runs use a tiny T5 (d_model 32, 2 layers) built from a config with a word-level tokenizer of ~40 words,
trained to reverse short word sequences: a run takes seconds."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import sacrebleu
import torch

from workbench.chat import IGNORE_INDEX
from workbench.cli import main
from workbench.config import Config, DataConfig
from workbench.errors import WorkbenchError
from workbench.predict import load_predictor
from workbench.seq2seq import (Seq2SeqEncoder, collate_seq2seq, corpus_scores, detect_seq2seq_columns,
                               load_seq2seq_data, target_tokens)
from workbench.store import RunStore
from workbench.trainer import train

LETTERS = ["a", "b", "c", "d", "e", "f", "g", "h"]
WORDS = ["<pad>", "</s>", "<unk>"] + LETTERS + ["hello", "world", "x"]


# --- fixtures ----------------------------------------------------------------------------------------

def word_tokenizer():
    """Whitespace words; no post-processor, so the encoder adds the end-of-sequence token to targets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    tok = word_tokenizer()
    out = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, architectures=["T5ForConditionalGeneration"])
    T5ForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reverse_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        words = tuple(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
        if words not in seen:
            seen.add(words)
            rows.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    return rows


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq2seq-data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reverse_rows(80)), encoding="utf-8")
    return path


@pytest.fixture
def s2s_config(tiny_t5_dir, pairs_jsonl):
    def make(**sections):
        raw = {
            "task": "seq2seq",
            "model": str(tiny_t5_dir),
            "data": {"source": str(pairs_jsonl), "eval_fraction": 0.2},
            "method": {"name": "full"},
            "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-2, "max_length": 16, "warmup_ratio": 0.0,
                      "early_stopping_patience": 0, "threads": 1},
            "chat": {"max_new_tokens": 6, "sample_prompts": 2},
            "track": {"wandb": "disabled", "tensorboard": False},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return Config.from_dict(raw)

    return make


def pair(source: str, target: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": source}, {"role": "assistant", "content": target}]


# --- labels and padding ------------------------------------------------------------------------------

def test_labels_are_the_target_and_its_end_padding_is_minus_100(tiny_t5_dir):
    from transformers import T5ForConditionalGeneration

    tok = word_tokenizer()
    enc = Seq2SeqEncoder(tok, 16)
    ids = lambda text: [WORDS.index(w) for w in text.split()]  # noqa: E731
    long, short = enc.encode(pair("a b c", "c b a")), enc.encode(pair("d e", "hello world x e d"))
    assert long == {"input_ids": ids("a b c"), "attention_mask": [1, 1, 1], "labels": ids("c b a </s>")}
    assert short["labels"] == ids("hello world x e d </s>")
    assert Seq2SeqEncoder(tok, 3).encode(pair("a b c d", "a b c d"))["labels"] == ids("a b </s>"), \
        "a cut target still ends with the end token"
    batch = collate_seq2seq([long, short], [0, 1], tok.pad_token_id)
    assert batch["input_ids"].tolist() == [ids("a b c"), ids("d e <pad>")]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [ids("c b a </s>") + [IGNORE_INDEX] * 2, ids("hello world x e d </s>")]
    assert target_tokens(batch["labels"]) == 4 + 6, "every target token counts, the first included"
    model = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir)
    decoder_in = model._shift_right(batch["labels"])
    assert decoder_in[:, 0].tolist() == [tok.pad_token_id] * 2, "T5 starts decoding from the pad token"
    out = model(**batch)
    manual = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(),
                                               ignore_index=IGNORE_INDEX)
    assert out.loss.item() == pytest.approx(manual.item()), "the loss is the mean over target tokens, pads skipped"


# --- data ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("columns, expected", [
    (["source", "target"], ("source", "target")),
    (["id", "src", "tgt"], ("src", "tgt")),
    (["Input", "Output"], ("Input", "Output")),
    (["en", "de"], ("en", "de")),
    (["id", "fr", "en"], ("fr", "en")),
])
def test_columns_are_detected_by_name(columns, expected):
    assert detect_seq2seq_columns(columns, DataConfig()) == {"prompt": expected[0], "answer": expected[1]}


@pytest.mark.parametrize("columns, cfg, match", [
    (["question", "topic"], {}, r"^no source column detected: columns found are question, topic \(set "
                               r"data.prompt_column"),
    (["source", "topic"], {}, r"^no target column detected: columns found are source, topic \(set data.answer_column"),
    (["en", "de"], {"answer_column": "fr"}, r"^data.answer_column = 'fr' not found: columns found are en, de$"),
])
def test_column_errors_name_the_columns_found(columns, cfg, match):
    with pytest.raises(WorkbenchError, match=match):
        detect_seq2seq_columns(columns, DataConfig(**cfg))


def test_pairs_load_deduplicated_and_split_by_source(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("en,de\nhello,hallo\nhello,hallo\nhello,servus\n,leer\nyes,ja\nno,nein\nthanks,danke\n")
    data = load_seq2seq_data(DataConfig(source=str(path), eval_fraction=0.3), seed=0)
    assert data.columns == {"prompt": "en", "answer": "de"} and data.format == "source/target"
    assert data.rows_read == 7 and data.blank_dropped == 1 and data.duplicates_dropped == 1
    assert len(data.train) + len(data.eval) == 5
    held = {c[0]["content"] for c in data.eval}
    assert not held & {c[0]["content"] for c in data.train}, "both translations of 'hello' land on one side"


def test_config_refuses_what_seq2seq_does_not_read():
    with pytest.raises(WorkbenchError, match=r"method.name = 'ia3' is not allowed: one of full, lora, qlora for "
                                             r"task: seq2seq"):
        Config.from_dict({"task": "seq2seq", "method": {"name": "ia3"}})
    with pytest.raises(WorkbenchError, match=r"data.messages_column = 'messages' is not allowed: nothing for task: "
                                             r"seq2seq"):
        Config.from_dict({"task": "seq2seq", "data": {"messages_column": "messages"}})
    assert Config.from_dict({"task": "seq2seq", "chat": {"max_new_tokens": 32}}).chat.max_new_tokens == 32
    roundtrip = Config.from_dict({"task": "seq2seq", "data": {"prompt_column": "en", "answer_column": "de"}})
    assert Config.from_dict(roundtrip.to_dict()) == roundtrip


def test_corpus_scores_are_sacrebleus():
    hyps, refs = ["the cat sat on the mat", "a b c d"], ["the cat sat on a mat", "a b c d"]
    assert corpus_scores(hyps, refs) == {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
                                         "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}


# --- runs ----------------------------------------------------------------------------------------------

def test_run_lowers_held_out_loss_and_scores_its_outputs_with_sacrebleu(s2s_config, store):
    config = s2s_config()
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    info, m = record["info"], record["metrics"]
    assert info["task"] == "seq2seq" and info["train_rows"] == 64 and info["eval_rows"] == 16
    assert info["data_columns"] == {"prompt": "source", "answer": "target"}
    evals = store.points(record["id"], kind="eval")
    assert [p["step"] for p in evals] == [0, 8, 16, 24]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, [p["eval_loss"] for p in evals]
    for p in evals:
        assert 0.0 <= p["bleu"] <= 100.0 and 0.0 <= p["chrf"] <= 100.0
        assert p["perplexity"] == pytest.approx(math.exp(p["eval_loss"]))
        assert len(p["samples"]) == 2 and set(p["samples"][0]) == {"source", "reference", "translation"}
    assert m["bleu"] == evals[m["best_step"] // 8]["bleu"] and "chrf" in m and "start_eval_loss" in m
    # the scores are sacrebleu's on the best model's greedy outputs for the held-out sources
    held = load_seq2seq_data(config.data, config.train.seed).eval
    predictor = load_predictor(record["id"], store.home)
    outputs = [r["translation"] for r in predictor.predict([c[0]["content"] for c in held])]
    refs = [c[1]["content"] for c in held]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [refs]).score)
    assert m["chrf"] > evals[0]["chrf"], "training moved the outputs towards the references"
    by_source = dict(zip((c[0]["content"] for c in held), outputs))
    assert all(s["translation"] == by_source[s["source"]] for s in m["samples"])


def test_lora_on_t5_targets_q_and_v_or_every_linear_layer_but_the_output(s2s_config, store):
    record = train(s2s_config(method={"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q", "v"]},
                              train={"epochs": 1}), store=store)
    assert record["status"] == "completed", record["error"]
    assert record["info"]["target_modules"] == ["q", "v"]
    from workbench.seq2seq import build_seq2seq_model
    from workbench.catalog import resolve_model

    config = s2s_config(method={"name": "lora"})
    built = build_seq2seq_model(config, resolve_model(config.model, store.home))
    assert sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}) == ["k", "o", "q", "v", "wi", "wo"]
    assert 0 < built.trainable_params < built.total_params


# --- the CLI -------------------------------------------------------------------------------------------

def _cli(capsys, home, *argv):
    code = main(["--home", str(home), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_shows_and_translates(tmp_path, capsys, s2s_config):
    import yaml

    path = tmp_path / "s2s.yaml"
    path.write_text(yaml.safe_dump(s2s_config(train={"epochs": 1}).to_dict()))
    home = tmp_path / "home"
    code, out, err = _cli(capsys, home, "train", str(path))
    assert code == 0, err
    assert "bleu" in out and "chrf" in out and "source:" in out
    code, out, _ = _cli(capsys, home, "runs", "show", "latest")
    assert code == 0 and "bleu:" in out and "chrf:" in out
    code, out, err = _cli(capsys, home, "predict", "latest", "--text", "a b c", "--json")
    assert code == 0, err
    (result,) = json.loads(out)
    assert set(result) == {"text", "translation"} and result["text"] == "a b c"
    code, out, _ = _cli(capsys, home, "predict", "latest", "--text", "a b c")
    assert out.strip() == result["translation"]


@pytest.mark.parametrize("overrides, match", [
    (["data.source={no_target}"], r"no target column detected: columns found are source, topic"),
    (["data.source={blank}"], r"has 1 usable source/target pair\(s\): too few"),
    (["data.prompt_column=english"], r"data.prompt_column = 'english' not found: columns found are source, target"),
    (["data.source=bbc-news"], r"dataset 'bbc-news' is not a set of source/target pairs"),
    (["method.name=head-only"], r"one of full, lora, qlora for task: seq2seq"),
    (["model={llama}"], r"task seq2seq needs an encoder-decoder model \(Marian, M2M-100, T5\): model .* is "
                        r"LlamaForCausalLM"),
    (["model=Helsinki-NLP/opus-mt-en-de"], r"model 'Helsinki-NLP/opus-mt-en-de' is not in the catalog and could "
                                           r"not be fetched from the Hugging Face hub"),
    (["method.name=lora", "method.target_modules=[q,query]"], r"'query' is not a linear layer of this model"),
])
def test_bad_seq2seq_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, s2s_config, overrides, match):
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    subs = {}
    for name, content in {"no_target": "source,topic\nhi,greeting\nbye,greeting\n",
                          "blank": "source,target\nhi,\nbye,tschuess\n"}.items():
        (tmp_path / f"{name}.csv").write_text(content)
        subs[name] = str(tmp_path / f"{name}.csv")
    if "{llama}" in "".join(overrides):
        subs["llama"] = str(tmp_path / "llama")
        LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     architectures=["LlamaForCausalLM"])).save_pretrained(subs["llama"])
    path = tmp_path / "s2s.yaml"
    path.write_text(yaml.safe_dump(s2s_config().to_dict()))
    code, out, err = _cli(capsys, tmp_path / "home", "train", str(path),
                          *[x for o in overrides for x in ("--set", o.format(**subs))])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out + err
    assert re.search(match, lines[0]), lines[0]
    assert RunStore(tmp_path / "home").list() == [], "bad input must not leave a run behind"
