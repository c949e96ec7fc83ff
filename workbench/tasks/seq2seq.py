"""Sequence to sequence (`task: seq2seq`): an encoder-decoder (Marian, M2M-100, T5) learns source -> target.

`Seq2SeqTask` is a `generation.GenerationTask`, trained by the one loop like chat, with these pieces:

- Data: a CSV/TSV/JSONL/Parquet file with a source and a target column, named by data.prompt_column /
  data.answer_column or detected (source/target, src/tgt, input/output, or two language-code columns such
  as en/de, the first being the source). Blank and duplicate pairs are dropped and counted; the held-out
  split keeps every copy of a source on one side. A pair travels as a two-turn conversation (user: source,
  assistant: target), so the chat data code (split, caps, samples) serves both tasks.
- Tokens: the source is the encoder's input_ids; the target, tokenised as a target (`text_target`, which
  Marian's separate target vocabulary needs) and ended by the end-of-sequence token, is the labels, padded
  with -100. The model makes its decoder inputs from the labels (shifted right after its decoder start
  token, the pad token for T5). The loss is on every target token, token-weighted as in chat.
- Evaluation: held-out loss and perplexity, then greedy outputs for every held-out source, scored at corpus
  level with sacrebleu (BLEU and chrF, 0 to 100) as the evaluation's `bleu` and `chrf`; `chat.sample_prompts`
  of them are logged as samples. Early stopping and the best checkpoint follow the held-out loss.
- Methods: full, lora and qlora; adapters on every linear layer but the output layer (`auto`), or named
  ones (T5: [q, v]).
- Languages: M2M-100, NLLB and mBART mark the source and the target with language tokens. Their codes come from
  data.source_lang / data.target_lang, else from the column names when both are codes (en, de), and are
  matched to the tokenizer's own codes (M2M-100 de, the token __de__; NLLB deu_Latn; mBART-50 de_DE, which
  a bare de also finds). They are set as the tokenizer's src_lang / tgt_lang, so sources carry the source
  token and labels the target token, and every generation (evaluation outputs, samples, predict) is forced to
  start with the target token (forced_bos_token_id) when the labels start with it (M2M-100, NLLB, mBART-50;
  mBART-cc25 ends its labels with it and starts decoding from it: nothing is forced). Such a model without
  codes, or with codes it does not know, is refused in preflight with the fields to set. Marian and T5 take
  no codes (setting them is refused).
- Tokenizers: Marian and M2M-100 need sentencepiece (a dependency); a tokenizer that needs a missing package
  fails with one line naming it and its pip command.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import torch

from ..catalog import DATASETS, ModelSource
from ..config import Config, DataConfig
from ..data import load_table
from ..errors import WorkbenchError
from ..models.generation import GenerationModel, check_generation_method, generation_kwargs, load_generation_model
from ..models.loading import architecture, load_config, load_tokenizer, quiet_libraries
from ..task_table import spec_for
from .generation import (IGNORE_INDEX, SAMPLE_CHARS, ChatData, Conversation, GenerationTask, rebuild_generation_run,
                         split_and_cap, text_of)

SPEC = spec_for("seq2seq:Seq2SeqTask")

SOURCE_NAMES = ("source", "src", "input", "source_text", "text", "document", "article")
TARGET_NAMES = ("target", "tgt", "output", "target_text", "translation", "summary", "reference", "label")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}([_-][a-zA-Z]{2,4})?")  # en, de, pt_br, zh-Hans
NOT_LANGUAGES = ("id", "idx", "ids", "key", "row")  # row numbers, not Indonesian (id)
PIP_NAMES = {"google": "protobuf"}  # import names whose pip package is named otherwise


# --- data -------------------------------------------------------------------------------------------

def detect_seq2seq_columns(columns: list[str], cfg: DataConfig) -> dict[str, str]:
    """{'prompt': source column, 'answer': target column}: the configured names, else by name."""
    found = ", ".join(columns) or "none"
    for name in ("prompt_column", "answer_column"):
        given = getattr(cfg, name)
        if given is not None and given not in columns:
            raise WorkbenchError(f"data.{name} = {given!r} not found: columns found are {found}")
    lower = {c.lower(): c for c in columns}
    source = cfg.prompt_column or next((lower[n] for n in SOURCE_NAMES if n in lower), None)
    target = cfg.answer_column or next((lower[n] for n in TARGET_NAMES if n in lower and lower[n] != source), None)
    codes = [c for c in columns if LANGUAGE_CODE.fullmatch(c) and c not in NOT_LANGUAGES]
    if source is None and target is None and len(codes) == 2:  # a language pair: en, de
        source, target = codes
    if source is None:
        raise WorkbenchError(f"no source column detected: columns found are {found} (set data.prompt_column "
                             "to the source text column)")
    if target is None:
        raise WorkbenchError(f"no target column detected: columns found are {found} (set data.answer_column "
                             "to the target text column)")
    if source == target:
        raise WorkbenchError(f"data.prompt_column and data.answer_column are both {source!r}: "
                             "sources and targets need their own columns")
    return {"prompt": source, "answer": target}


def _read_pairs(source: str, cfg: DataConfig, where: str, report: ChatData) -> list[Conversation]:
    if source in DATASETS or source == "chatterbot":
        raise WorkbenchError(f"dataset {source!r} is not a set of source/target pairs: task seq2seq needs a "
                             "CSV/TSV/JSONL/Parquet file with source and target columns")
    df, _ = load_table(source)
    if df.empty:
        raise WorkbenchError(f"{where} has no rows: add source/target rows")
    df = df.rename(columns=str)
    columns = detect_seq2seq_columns(list(df.columns), cfg)
    report.columns = report.columns or columns
    sources, targets = df[columns["prompt"]].map(text_of).tolist(), df[columns["answer"]].map(text_of).tolist()
    report.rows_read += len(sources)
    pairs: list[Conversation] = []
    seen: set[tuple[str, str]] = set()
    for s, t in zip(sources, targets):
        if not s.strip() or not t.strip():
            report.blank_dropped += 1
        elif (s, t) in seen:
            report.duplicates_dropped += 1
        else:
            seen.add((s, t))
            pairs.append([{"role": "user", "content": s}, {"role": "assistant", "content": t}])
    return pairs


def load_seq2seq_data(cfg: DataConfig, seed: int) -> ChatData:
    """Load, de-duplicate and split the source/target pairs the config names."""
    data = ChatData([], [], cfg.source, "source/target", {})
    pairs = _read_pairs(cfg.source, cfg, f"data source {cfg.source!r}", data)
    held = (_read_pairs(cfg.eval_source, cfg, f"eval file {cfg.eval_source!r}", ChatData([], [], "", "", {}))
            if cfg.eval_source else None)
    data.train, data.eval = split_and_cap(pairs, held, cfg, seed, "source/target pair", "source", "source/target")
    return data


# --- tokens and labels --------------------------------------------------------------------------------

class Seq2SeqEncoder:
    """The source as encoder input_ids, the target (ended by end-of-sequence) as labels."""

    prompt_format = "source -> target (encoder-decoder; the loss on every target token)"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.forced_bos_token_id = target_language_id(tokenizer)  # None for Marian and T5

    def source_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])

    def encode(self, pair: Conversation) -> dict[str, list[int]] | None:
        """input_ids, attention_mask and labels; None when the source or the target has no token."""
        source, target = pair[-2]["content"], pair[-1]["content"]
        ids = self.source_ids(source)
        labels = list(self.tokenizer(text_target=target, truncation=True, max_length=self.max_length)["input_ids"])
        eos = self.tokenizer.eos_token_id
        # a model that never sees the end never stops; mBART-cc25 ends targets with eos and then the language
        if labels and eos is not None and eos not in labels[-2:]:
            labels = labels[: self.max_length - 1] + [eos]
        if not ids or not labels:
            return None
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collate_seq2seq(encodings: list[dict[str, list[int]]], indices: list[int],
                    pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded sources (pad id, attention 0) and targets (label -100); the model shifts the labels."""
    rows = [encodings[i] for i in indices]
    src_width, tgt_width = max(len(e["input_ids"]) for e in rows), max(len(e["labels"]) for e in rows)
    ids = torch.full((len(rows), src_width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), src_width), dtype=torch.long)
    labels = torch.full((len(rows), tgt_width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(rows):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
        labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is on: every target token (the decoder predicts each one, the first included)."""
    return int((labels != IGNORE_INDEX).sum())


# --- language codes (M2M-100, NLLB, mBART) --------------------------------------------------------------

def language_codes(tokenizer: Any) -> list[str] | None:
    """The codes a tokenizer marks languages with (M2M-100 de, NLLB deu_Latn, mBART-50 de_DE); None: it has none."""
    if not isinstance(getattr(type(tokenizer), "src_lang", None), property):  # Marian, T5: no language tokens
        return None
    codes = getattr(tokenizer, "lang_code_to_id", None)  # M2M-100, mBART
    if codes:
        return [str(c) for c in codes]
    return [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []]  # NLLB: its added codes


def _language_id(tokenizer: Any, code: str) -> int:
    """The id of the language token: M2M-100 asks get_lang_id ('de' is the token __de__), the others are tokens."""
    if hasattr(tokenizer, "get_lang_id"):
        return int(tokenizer.get_lang_id(code))
    return int(tokenizer.convert_tokens_to_ids(code))


def target_language_id(tokenizer: Any) -> int | None:
    """The token generation must start with (forced_bos_token_id): the target language's, when the tokenizer
    starts targets with it (M2M-100, NLLB, mBART-50; mBART-cc25 ends them with it); else None."""
    if language_codes(tokenizer) is None or not getattr(tokenizer, "tgt_lang", None):
        return None
    token = _language_id(tokenizer, tokenizer.tgt_lang)
    first = tokenizer(text_target="a")["input_ids"][:1]  # the labels learn what the decoder must start with
    return token if first == [token] else None


def match_language(code: str, codes: list[str]) -> str | None:
    """The tokenizer's code for `code`: itself, or the one code that adds a region or script (de -> de_DE)."""
    bare = code.strip().strip("_").replace("-", "_")  # __de__ (M2M-100's token) -> de, pt-BR -> pt_BR
    exact = [c for c in codes if c.lower() == bare.lower()]
    if exact:
        return exact[0]
    longer = [c for c in codes if c.lower().startswith(bare.lower() + "_")]
    return longer[0] if len(longer) == 1 else None


def _examples(codes: list[str]) -> str:
    common = [c for c in codes if c.split("_")[0].lower() in ("en", "eng", "de", "deu", "fr", "fra")]
    return ", ".join((common or codes)[:3])


def language_pair(cfg: DataConfig, columns: dict[str, str] | None = None) -> tuple[tuple[str, str], str] | None:
    """(source, target) codes and where they come from: data.source_lang/target_lang, else the column names
    when both are language codes (en, de); None when neither. `columns` left out: read from data.source."""
    if cfg.source_lang and cfg.target_lang:
        return (cfg.source_lang, cfg.target_lang), "data.source_lang and data.target_lang"
    if columns is None:
        if cfg.prompt_column and cfg.answer_column:
            columns = {"prompt": cfg.prompt_column, "answer": cfg.answer_column}
        else:
            columns = detect_seq2seq_columns([str(c) for c in load_table(cfg.source)[0].columns], cfg)
    pair = columns["prompt"], columns["answer"]
    if all(LANGUAGE_CODE.fullmatch(c) and c not in NOT_LANGUAGES for c in pair):
        return pair, "the data columns"
    return None


def set_languages(tokenizer: Any, config: Config, model_name: str,
                  columns: dict[str, str] | None = None) -> tuple[str, str] | None:
    """Set the tokenizer's src_lang/tgt_lang from the config or the columns; a one-line error when a model that
    marks languages has no codes or does not know them, or a model that marks none is given some."""
    codes = language_codes(tokenizer)
    kind = type(tokenizer).__name__
    if codes is None:
        if config.data.source_lang:
            raise WorkbenchError(f"data.source_lang = {config.data.source_lang!r} is not allowed: model "
                                 f"{model_name!r} ({kind}) takes no language codes; leave data.source_lang and "
                                 "data.target_lang out")
        return None
    found = language_pair(config.data, columns)
    if found is None:
        raise WorkbenchError(f"model {model_name!r} ({kind}) needs the source and target languages: set "
                             f"data.source_lang and data.target_lang to its codes, e.g. {_examples(codes)}")
    (source, target), origin = found
    matched = []
    for code in (source, target):
        mine = match_language(code, codes)
        if mine is None:
            raise WorkbenchError(f"language {code!r} (from {origin}) is not a code of model {model_name!r} "
                                 f"({kind}): set data.source_lang and data.target_lang to its codes, e.g. "
                                 f"{_examples(codes)}")
        matched.append(mine)
    tokenizer.src_lang, tokenizer.tgt_lang = matched  # the setter re-marks sources; targets read tgt_lang
    return matched[0], matched[1]


# --- the model --------------------------------------------------------------------------------------

def _load_tokenizer(config: Config, source: ModelSource) -> Any:
    """The model's tokenizer; a missing package (sentencepiece for Marian and M2M-100) is one line with its pip."""
    try:
        return load_tokenizer(source, config.trust_remote_code)
    except ImportError as exc:
        named = re.search(r"requires the (\S+) library", str(exc))  # transformers' own message
        module = named.group(1) if named else (getattr(exc, "name", None) or "").split(".")[0]
        package = PIP_NAMES.get(module.lower(), module.lower()) or "the package it names"
        raise WorkbenchError(f"model {source.name!r} needs the {package} package for its tokenizer: "
                             f"pip install {package}") from None


def check_seq2seq_model(config: Config, source: ModelSource, columns: dict[str, str] | None = None) -> Any:
    """The checks that need no weights: an encoder-decoder, the context length, adapter targets, bitsandbytes,
    the tokenizer and its language codes. Returns the tokenizer, languages set."""
    from transformers import AutoModelForSeq2SeqLM

    model_config = load_config(source, config.trust_remote_code)
    if not getattr(model_config, "is_encoder_decoder", False):
        raise WorkbenchError(f"task seq2seq needs an encoder-decoder model (Marian, M2M-100, T5): model "
                             f"{config.model!r} is {architecture(model_config)}")
    check_generation_method(config, model_config, AutoModelForSeq2SeqLM)
    tokenizer = _load_tokenizer(config, source)
    set_languages(tokenizer, config, source.name, columns)
    return tokenizer


def build_seq2seq_model(config: Config, source: ModelSource, columns: dict[str, str] | None = None) -> GenerationModel:
    """Load the encoder-decoder and apply full, lora or qlora (adapters on every linear layer but the output).
    `columns`: the run's source and target columns, for language codes named by them (else read from the data)."""
    from transformers import AutoModelForSeq2SeqLM

    quiet_libraries()
    tokenizer = check_seq2seq_model(config, source, columns)

    def prepare(model: torch.nn.Module) -> None:
        if model.config.decoder_start_token_id is None:  # T5's convention: the decoder starts from the pad token
            model.config.decoder_start_token_id = model.config.pad_token_id
        forced = target_language_id(tokenizer)
        if forced is not None:  # M2M-100, NLLB, mBART: any generate() starts with the target language
            model.generation_config.forced_bos_token_id = forced

    return load_generation_model(config, source, tokenizer, AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM", prepare)


# --- generation and scores ----------------------------------------------------------------------------

@torch.no_grad()
def translate(model: torch.nn.Module, encoder: Seq2SeqEncoder, sources: list[str], max_new_tokens: int,
              batch_size: int = 16) -> list[str]:
    """Greedy outputs for the sources, in their order (batches of similar length: less padding)."""
    tokenizer = encoder.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    encoded = [encoder.source_ids(s) for s in sources]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]))
    out = [""] * len(sources)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            batch = collate_seq2seq([{"input_ids": encoded[i], "labels": [0]} for i in chunk],
                                    list(range(len(chunk))), pad_id)
            forced = ({"forced_bos_token_id": encoder.forced_bos_token_id}
                      if encoder.forced_bos_token_id is not None else {})  # the target language comes first
            generated = model.generate(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device), num_beams=1,
                                       **generation_kwargs(tokenizer, max_new_tokens), **forced)
            for i, text in zip(chunk, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                out[i] = text.strip()
    finally:
        model.train(was_training)
    return out


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level BLEU and chrF (sacrebleu defaults, 0 to 100) of the outputs against one reference each."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score)}


def _seq2seq_outputs(model: torch.nn.Module, encoder: Seq2SeqEncoder, held: list[Conversation],
                     samples: list[Conversation], config: Config) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Every held-out source generated and scored; the sample pairs' outputs are logged."""
    outputs = translate(model, encoder, [c[-2]["content"] for c in held], config.chat.max_new_tokens,
                        config.train.effective_eval_batch_size)
    scores = corpus_scores(outputs, [c[-1]["content"] for c in held])
    position = {id(c): i for i, c in enumerate(held)}
    logged = [{"source": c[-2]["content"][:SAMPLE_CHARS], "reference": c[-1]["content"][:SAMPLE_CHARS],
               "translation": outputs[position[id(c)]][:SAMPLE_CHARS]} for c in samples if id(c) in position]
    return logged, scores


class Seq2SeqTask(GenerationTask):
    name = SPEC.name
    examples = "training source/target pairs"

    def read(self, cfg: DataConfig, seed: int) -> ChatData:
        return load_seq2seq_data(cfg, seed)

    def check(self, config: Config, source: ModelSource, data: ChatData | None) -> None:
        check_seq2seq_model(config, source, data.columns if data is not None else None)

    def build_model(self, config: Config, source: ModelSource, data: ChatData | None) -> GenerationModel:
        return build_seq2seq_model(config, source, data.columns if data is not None else None)

    def encoder(self, tokenizer: Any, max_length: int) -> Seq2SeqEncoder:
        return Seq2SeqEncoder(tokenizer, max_length)

    def collate_examples(self, encodings: list[dict], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_seq2seq(encodings, indices, pad_id)

    def count(self, labels: torch.Tensor) -> int:
        return target_tokens(labels)

    def outputs(self, model: torch.nn.Module, encoder: Seq2SeqEncoder, held: list[Conversation],
                samples: list[Conversation], config: Config) -> tuple[list[dict[str, str]], dict[str, float]]:
        return _seq2seq_outputs(model, encoder, held, samples, config)

    def load_predictor(self, record: dict[str, Any], home: Path) -> "Seq2SeqPredictor":
        """Rebuild a seq2seq run's model (base weights + the run's trained parameters)."""
        columns = record.get("info", {}).get("data_columns") or None  # language codes named by the run's columns
        config, built = rebuild_generation_run(record, home,
                                               lambda config, source: build_seq2seq_model(config, source, columns))
        return Seq2SeqPredictor(built.model, built.tokenizer, config.train.max_length, config.chat.max_new_tokens,
                                record["id"])


# --- translating with a trained run -------------------------------------------------------------------

class Seq2SeqPredictor:
    """A tuned encoder-decoder: `predict(texts)` gives each text's greedy output."""

    task = SPEC.name

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, max_new_tokens: int,
                 run_id: str = "") -> None:
        self.model, self.encoder = model.eval(), Seq2SeqEncoder(tokenizer, max_length)
        self.max_new_tokens, self.run_id = max_new_tokens, run_id
        self._lock = threading.Lock()  # one generation at a time on this model

    def predict(self, texts: str | list[str], batch_size: int = 16) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            texts = [texts]
        if any(not t.strip() for t in texts):
            raise WorkbenchError("type a text to translate")
        with self._lock:
            outputs = translate(self.model, self.encoder, texts, self.max_new_tokens, batch_size)
        return [{"text": t, "translation": o} for t, o in zip(texts, outputs)]
