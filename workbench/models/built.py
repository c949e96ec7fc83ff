"""A model built for a classification task: the module, its tokenizer, and what the method did to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

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

    def encode(self, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
        """Token ids (and masks) of each text as this model reads it, unpadded; collate pads them on the
        tokenizer's padding side (left for a causal-LM classifier). An encoder reads the text cut to
        `max_length` tokens; a causal-LM classifier reads its prompt with the text cut to `max_length`."""
        if self.prompt is None:
            return tokenize_texts(self.tokenizer, texts, max_length, self.truncation)
        longest_label = max(len(c) for c in self.prompt.label_ids())
        return prompt_encodings(with_max_length(self.prompt, max_length), texts, self.max_length_limit,
                                longest_label)


HEAD_SHARE = 0.25  # head+tail keeps the first quarter of the token budget and the last three quarters
CHARS_PER_TOKEN_BOUND = 24  # no token of these tokenizers spans more characters: a text cut there loses nothing


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int,
                   truncation: str = "head") -> list[dict[str, list[int]]]:
    """The tokenizer's ids of each text, as one dict per text: cut to `max_length` from the end ("head"), or
    by keeping its first quarter and last three quarters ("head+tail": a review's verdict, an e-mail's body
    end and its signature survive; Sun et al. 2019 found head+tail best for long texts with BERT)."""
    if truncation == "head":
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
    budget = max(2, max_length - tokenizer.num_special_tokens_to_add(pair=False))
    bound = budget * CHARS_PER_TOKEN_BOUND  # tokenizing a 1 MB text in full to keep 256 tokens is waste
    clipped = [t if len(t) <= 2 * bound else t[:bound] + " " + t[-bound:] for t in texts]
    ids = tokenizer(clipped, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    prefix, suffix, keys = special_frame(tokenizer)
    out = []
    for seq in ids:
        if len(seq) > budget:
            head = int(budget * HEAD_SHARE)
            seq = seq[:head] + seq[len(seq) - (budget - head):]
        full = prefix + seq + suffix
        enc = {"input_ids": full, "attention_mask": [1] * len(full), "token_type_ids": [0] * len(full)}
        out.append({k: enc[k] for k in keys})
    return out


def special_frame(tokenizer: Any) -> tuple[list[int], list[int], list[str]]:
    """The ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT), and the keys it returns
    (transformers 5 tokenizers no longer offer build_inputs_with_special_tokens)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")
    ids = list(full["input_ids"])
    at = next(i for i in range(len(ids) - len(plain) + 1) if ids[i: i + len(plain)] == plain)
    return ids[:at], ids[at + len(plain):], [k for k in full.keys() if k in ("input_ids", "attention_mask",
                                                                             "token_type_ids")]
