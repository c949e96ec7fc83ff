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

    def encode(self, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
        """Token ids (and masks) of each text as this model reads it, unpadded; collate pads them on the
        tokenizer's padding side (left for a causal-LM classifier). An encoder reads the text cut to
        `max_length` tokens; a causal-LM classifier reads its prompt with the text cut to `max_length`."""
        if self.prompt is None:
            return tokenize_texts(self.tokenizer, texts, max_length)
        longest_label = max(len(c) for c in self.prompt.label_ids())
        return prompt_encodings(with_max_length(self.prompt, max_length), texts, self.max_length_limit,
                                longest_label)


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """The tokenizer's ids of each text, truncated to `max_length`, as one dict per text."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
