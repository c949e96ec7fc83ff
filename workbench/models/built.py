"""A model built for a classification task: the module, its tokenizer, and what the method did to it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..errors import WorkbenchError
from .prompting import prompt_encodings, with_max_length


@dataclass
class BuiltModel:
    """A model ready to train, its tokenizer, and what the method did to it."""

    model: nn.Module
    tokenizer: Any
    head_modules: list[str]
    target_modules: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    max_length_limit: int | None = None
    method: str = ""
    class_weights: Any = None  # a tensor of per-class loss weights (train.class_weights: balanced), or None
    prompt: Any = None  # a causal-LM classifier's prompting.PromptBuilder: texts go in as prompts
    truncation: str = "head"  # train.truncation: how an encoder reads a text longer than max_length
    fresh_modules: list[str] = field(default_factory=list)  # layers the checkpoint lacked (randomly initialised)
    head_init: dict[str, Any] | None = None  # how the head started (head_init.py), for the run record

    def encode(self, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
        """Token ids (and masks) of each text as this model reads it, unpadded; collate pads them on the
        tokenizer's padding side (left for a causal-LM classifier). An encoder reads the text cut to
        `max_length` tokens as `truncation` says (with "chunks": one encoding per chunk, each naming its text
        under TEXT_INDEX); a causal-LM classifier reads its prompt with the text cut to `max_length`."""
        if self.prompt is None:
            return tokenize_texts(self.tokenizer, texts, max_length, self.truncation)
        longest_label = max(len(c) for c in self.prompt.label_ids())
        return prompt_encodings(with_max_length(self.prompt, max_length), texts, self.max_length_limit,
                                longest_label)


HEAD_SHARE = 0.25  # head+tail keeps the first quarter of the token budget and the last three quarters
CHARS_PER_TOKEN_BOUND = 24  # no token of these tokenizers spans more characters: a text cut there loses nothing
CHUNK_OVERLAP = 0.25  # consecutive chunks share at least a quarter of the token budget: a sentence cut at one
# chunk's edge is read whole by its neighbour
MAX_CHUNKS = 16  # a text needing more chunks is read as MAX_CHUNKS chunks spread evenly from its start to its
# end: their overlap shrinks, and past MAX_CHUNKS budgets of tokens the stretches between chunks go unread. Each
# chunk costs a forward pass, so this bounds what one text costs; the run counts such texts (texts_over_cap)
CHUNK_BATCH = 64  # a predictor runs at most this many chunks in one forward pass: 32 long texts can be 512
TEXT_INDEX = "text_index"  # a chunk's key (truncation "chunks"): the position of its text among those encoded


def chunk_starts(length: int, budget: int) -> list[int]:
    """Where each chunk of a text of `length` tokens starts, reading `budget` tokens a chunk: one chunk at 0
    for a text that fits; else chunks spread evenly from the start to the end, every one `budget` long, as
    many as an overlap of CHUNK_OVERLAP needs, at most MAX_CHUNKS."""
    if length <= budget:
        return [0]
    n = min(chunks_needed(length, budget), MAX_CHUNKS)
    return [round(i * (length - budget) / (n - 1)) for i in range(n)]


def chunks_needed(length: int, budget: int) -> int:
    """How many chunks of `budget` tokens overlapping by CHUNK_OVERLAP cover `length` tokens (before the
    MAX_CHUNKS cap)."""
    if length <= budget:
        return 1
    stride = max(1, budget - int(budget * CHUNK_OVERLAP))
    return 1 + math.ceil((length - budget) / stride)


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int,
                   truncation: str = "head") -> list[dict[str, list[int]]]:
    """The tokenizer's ids of each text, as one dict per text: cut to `max_length` from the end ("head"), or
    by keeping its first quarter and last three quarters ("head+tail": a review's verdict, an e-mail's body
    end and its signature survive; Sun et al. 2019 found head+tail best for long texts with BERT). With
    "chunks", one dict per chunk instead (text_chunks), in text order, each with TEXT_INDEX naming its text:
    a text that fits is one chunk, equal to its "head" encoding."""
    if truncation == "head":
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
    if truncation == "chunks":
        return [{**chunk, TEXT_INDEX: i} for i, chunks in enumerate(text_chunks(tokenizer, texts, max_length))
                for chunk in chunks]
    budget = text_budget(tokenizer, max_length)
    bound = budget * CHARS_PER_TOKEN_BOUND  # tokenizing a 1 MB text in full to keep 256 tokens is waste
    clipped = [t if len(t) <= 2 * bound else t[:bound] + " " + t[-bound:] for t in texts]
    ids = tokenizer(clipped, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    prefix, suffix, keys = special_frame(tokenizer)
    out = []
    for seq in ids:
        if len(seq) > budget:
            head = int(budget * HEAD_SHARE)
            seq = seq[:head] + seq[len(seq) - (budget - head):]
        out.append(framed(prefix + seq + suffix, keys))
    return out


def text_chunks(tokenizer: Any, texts: list[str], max_length: int) -> list[list[dict[str, list[int]]]]:
    """Per text, its chunks: windows of its tokens (chunk_starts), each framed by the tokenizer's special
    tokens, so every chunk is at most `max_length` ids."""
    budget = text_budget(tokenizer, max_length)
    # a text of more characters than this holds more than MAX_CHUNKS budgets of tokens (CHARS_PER_TOKEN_BOUND):
    # its chunks are spread anyway, over its first and last halves of this many characters
    bound = MAX_CHUNKS * budget * CHARS_PER_TOKEN_BOUND // 2
    clipped = [t if len(t) <= 2 * bound else t[:bound] + " " + t[-bound:] for t in texts]
    ids = tokenizer(clipped, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    prefix, suffix, keys = special_frame(tokenizer)
    return [[framed(prefix + seq[s: s + budget] + suffix, keys) for s in chunk_starts(len(seq), budget)]
            for seq in ids]


def text_budget(tokenizer: Any, max_length: int) -> int:
    """The tokens of text that fit in `max_length` beside the tokenizer's special tokens (at least 2)."""
    return text_budget_of(max_length, tokenizer.num_special_tokens_to_add(pair=False))


def text_budget_of(max_length: int, specials: int) -> int:
    """The tokens of text that fit in `max_length` beside `specials` special tokens (at least 2)."""
    return max(2, max_length - specials)


def framed(ids: list[int], keys: list[str]) -> dict[str, list[int]]:
    """One encoding of `ids` (special tokens included) with the keys the tokenizer returns."""
    enc = {"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids)}
    return {k: enc[k] for k in keys}


def predictor_encodings(tokenizer: Any, encode: Any, texts: list[str], max_length: int) -> list[dict[str, Any]]:
    """The token ids a trained predictor reads `texts` as: its run's `encode` (BuiltModel.encode: head+tail,
    chunks, a prompt), else the tokenizer's plain cut to `max_length`; one dict per example."""
    if encode is not None:
        return encode(texts, max_length)
    encodings = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: encodings[k][i] for k in encodings.keys()} for i in range(len(texts))]


def text_indices(encodings: list[dict[str, Any]]) -> list[int]:
    """The text each encoding belongs to: its TEXT_INDEX (a chunk), else its own position (one per text)."""
    return [e.get(TEXT_INDEX, i) for i, e in enumerate(encodings)]


def pool_chunks(rows: np.ndarray, owners: list[int], n_texts: int) -> np.ndarray:
    """Per text, the mean of its rows (a chunk's class probabilities or value): `rows[i]` belongs to text
    `owners[i]`; rows one per text in order come back unchanged."""
    rows = np.asarray(rows)
    if len(owners) == n_texts and list(owners) == list(range(n_texts)):
        return rows
    sums = np.zeros((n_texts,) + rows.shape[1:], dtype=np.float64)
    np.add.at(sums, np.asarray(owners, dtype=np.int64), rows)
    counts = np.bincount(np.asarray(owners, dtype=np.int64), minlength=n_texts).reshape(
        (n_texts,) + (1,) * (rows.ndim - 1))
    if (counts == 0).any():
        raise WorkbenchError(f"{int((counts == 0).sum())} of {n_texts} texts have no chunk to pool: re-encode them")
    return (sums / counts).astype(rows.dtype)


def special_frame(tokenizer: Any) -> tuple[list[int], list[int], list[str]]:
    """The ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT), and the keys it returns
    (transformers 5 tokenizers no longer offer build_inputs_with_special_tokens)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")
    ids = list(full["input_ids"])
    at = next(i for i in range(len(ids) - len(plain) + 1) if ids[i: i + len(plain)] == plain)
    return ids[:at], ids[at + len(plain):], [k for k in full.keys() if k in ("input_ids", "attention_mask",
                                                                             "token_type_ids")]
