"""Prompting a pretrained model for a label: embedding similarity and label-token scoring.

- Embedding similarity (zero-shot-embedding): every text and every label description is embedded with
  an encoder (mean of the last hidden state over the attention mask, L2-normalised); a label's score is
  its cosine similarity, and the class probabilities are softmax(EMBEDDING_SCALE x cosine).
- Label-token scoring (zero-shot-prompt and the causal-LM classifier): a causal LM is asked, through its
  chat template (or a plain "Answer:" prompt when the tokenizer has none), which label fits the text.
  Nothing is generated: a label's score is the log-probability of its tokens after the prompt, per
  `method.prompt_scoring`: "sum" (the default: log p of the whole label), "mean" (length-normalised) or
  "first" (the first label token only). Sum is the default because the tokens after a label's first are
  nearly certain ("entert" -> "ainment"), so averaging over them lifts long labels: on bbc-news (100 eval
  articles, SmolLM2-135M) mean predicted "politics" for 94 of them (accuracy 0.21), sum and first 0.34.
  `few_shot_indices` picks k labelled examples for earlier turns; `calibrate` divides out the label prior
  the prompt gives content-free inputs (contextual calibration, Zhao et al. 2021).

Memory stays flat: prompts run in batches, left-padded, and only the last position's logits are computed
(`logits_to_keep=1`); each multi-token label then runs its own few tokens on the prompts' key/value cache,
which is cropped back after each label. No (batch x prompt x vocab) tensor is ever made.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import StopRequested, WorkbenchError

EMBEDDING_SCALE = 20.0  # softmax temperature 1/20 on cosines, the scale sentence-transformers trains with
INSTRUCTION = ("Classify the text into one of these categories: {labels}.\n\n"
               "Text: {text}\n\nAnswer with the category only.")


PLAIN_ANSWER = "Answer:"  # the plain-prompt fallback ends here; the label follows after a space


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where the mask is 1, L2-normalised: one unit vector per text."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int, batch_size: int,
          should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Unit-length embeddings of `texts` (rows in input order); similar lengths are batched together."""
    device = next(model.parameters()).device
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            raise StopRequested("stop requested")
        idx = order[start: start + batch_size]
        batch = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = model(**batch).last_hidden_state.float()
        for row, vec in zip(idx, mean_pool(hidden, batch["attention_mask"])):
            out[row] = vec.cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def embedding_scores(model: torch.nn.Module, tokenizer: Any, texts: list[str], label_texts: list[str],
                     max_length: int, batch_size: int, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Cosine similarity of every text with every label description, shape (texts, labels)."""
    labels = embed(model, tokenizer, label_texts, max_length, batch_size)
    docs = embed(model, tokenizer, texts, max_length, batch_size, should_stop)
    return (docs @ labels.T).numpy().astype(np.float64)


def _forward_names(model: torch.nn.Module) -> tuple[str, bool]:
    """The keyword that passes a key/value cache (transformers renamed it), and whether logits_to_keep exists."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _output_cache(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    raise WorkbenchError("this model returns no key/value cache: use method.prompt_scoring = 'first'")


def _crop(cache: Any, keep: int) -> None:
    """Drop what a label's tokens added, back to the prompts' `keep` positions.

    A negative count (tokens to remove) means the same in transformers 4 and 5; a positive one does not.
    """
    added = cache.get_seq_length() - keep
    if added > 0:
        cache.crop(-added)
    if cache.get_seq_length() != keep:
        raise RuntimeError(f"cache crop left {cache.get_seq_length()} positions instead of {keep}")


def label_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 continuations: list[list[int]], scoring: str = "sum",
                 prefix_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Score of every continuation (label tokens) after every prompt of one left-padded batch: (rows, labels).

    The one implementation of label-token scoring: zero-shot prompting calls it under no_grad, the LLM
    classifier (workbench.llm_classifier) trains through it. "sum": log p(label tokens | prompt); "mean": that
    sum / the number of label tokens; "first": log p of the first label token. Positions follow the mask.
    The LM head runs on the prompts' last position only (`logits_to_keep=1`, so the prompts must be
    left-padded) and on each label's own tokens; a multi-token label runs on the prompts' key/value cache,
    cropped back after it. `prefix_embeds` (rows, virtual tokens, hidden) go before every prompt: the
    trained virtual tokens of prompt tuning.
    """
    if scoring not in ("mean", "sum", "first"):
        raise WorkbenchError(f"method.prompt_scoring = {scoring!r} is not allowed: one of 'mean', 'sum', 'first'")
    if any(not c for c in continuations):
        raise WorkbenchError("a label has no tokens: every label needs a non-empty name")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("label scoring needs left-padded prompts: the last position of every row must be real")
    device = input_ids.device
    rows = input_ids.shape[0]
    cache_kw, has_keep = _forward_names(model)
    multi = scoring != "first" and any(len(c) > 1 for c in continuations)
    # gradient checkpointing in training drops every key/value cache: multi-token labels then run whole
    need_cache = multi and not _checkpointing(model)
    mask = attention_mask
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if prefix_embeds is not None:
        embeds = model.get_input_embeddings()(input_ids)
        inputs = {"inputs_embeds": torch.cat([prefix_embeds.to(embeds.dtype), embeds], dim=1)}
        mask = torch.cat([mask.new_ones(rows, prefix_embeds.shape[1]), mask], dim=1)
    width = mask.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(**inputs, attention_mask=mask, position_ids=positions, use_cache=need_cache,
                **({"logits_to_keep": 1} if has_keep else {}))
    next_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (rows, vocab): the prompt's next token
    cache = _output_cache(out) if need_cache else None
    del out
    lengths = mask.sum(dim=1, keepdim=True)
    columns = []
    for cont in continuations:
        token_logp = [next_logp[:, cont[0]]]
        if multi and not need_cache and len(cont) > 1:
            # no cache: prompt + the label's tokens but the last, in one pass; the head on the label positions
            feed = torch.tensor(cont[:-1], device=device).expand(rows, -1)
            steps = feed.shape[1]
            extra = {"input_ids": torch.cat([input_ids, feed], dim=1)}
            if prefix_embeds is not None:
                embeds = model.get_input_embeddings()(extra["input_ids"])
                extra = {"inputs_embeds": torch.cat([prefix_embeds.to(embeds.dtype), embeds], dim=1)}
            full_mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
            out = model(**extra, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
                        use_cache=False, **({"logits_to_keep": steps} if has_keep else {}))
            logp = torch.log_softmax(out.logits[:, -steps:].float(), dim=-1)  # predicts label tokens 2..L
            token_logp += [logp[:, t, cont[t + 1]] for t in range(steps)]
            del out, logp
        elif need_cache and len(cont) > 1:
            # the label's own tokens, fed after every prompt of the batch at once, on the shared cache
            feed = torch.tensor(cont[:-1], device=device).expand(rows, -1)
            steps = feed.shape[1]
            out = model(input_ids=feed, attention_mask=torch.cat([mask, torch.ones_like(feed)], dim=1),
                        position_ids=lengths + torch.arange(steps, device=device), use_cache=True,
                        **{cache_kw: cache})
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # (rows, label tokens - 1, vocab)
            token_logp += [logp[:, t, cont[t + 1]] for t in range(steps)]
            del out, logp
            _crop(cache, width)
        stacked = torch.stack(token_logp, dim=1)
        columns.append(stacked[:, 0] if scoring == "first" else stacked.sum(1) if scoring == "sum"
                       else stacked.mean(1))
    return torch.stack(columns, dim=1)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Training under gradient checkpointing, where transformers switches every cache off."""
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists, padded on the left to the longest."""
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def score_labels(model: torch.nn.Module, prompts: list[list[int]], continuations: list[list[int]],
                 scoring: str = "sum", batch_size: int = 16, pad_id: int = 0,
                 should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Log-probability score of every continuation (label tokens) after every prompt, shape (prompts, labels).

    `label_scores` on batches of `batch_size` prompts of similar length, left-padded.
    """
    if scoring not in ("mean", "sum", "first"):
        raise WorkbenchError(f"method.prompt_scoring = {scoring!r} is not allowed: one of 'mean', 'sum', 'first'")
    device = next(model.parameters()).device
    scores = np.zeros((len(prompts), len(continuations)), dtype=np.float64)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    model.eval()
    for start in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            raise StopRequested("stop requested")
        idx = order[start: start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        value = label_scores(model, ids.to(device), mask.to(device), continuations, scoring)
        scores[idx] = value.double().cpu().numpy()
    return scores


CONTENT_FREE = ["N/A", "", "[MASK]"]  # Zhao et al. 2021, "Calibrate Before Use"


def calibrate(scores: np.ndarray, content_free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contextual calibration: (calibrated scores, the prompt's label prior).

    The label distribution the prompt gives content-free inputs (softmax over labels of their scores,
    averaged) is the prompt's bias; calibrated score = log p(label | text) - log prior(label), i.e.
    p(label | text) / prior(label) renormalised: a label the prompt favours whatever the text says loses
    that advantage.
    """
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    prior = np.exp(log_softmax(content_free)).mean(axis=0)
    return log_softmax(scores) - np.log(prior), prior


def few_shot_indices(train_labels: list[int], k: int, seed: int) -> list[int]:
    """k training rows for the prompt: labels taken in turn (each label once before any twice), seeded."""
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(train_labels):
        by_label.setdefault(y, []).append(i)
    for rows in by_label.values():
        rng.shuffle(rows)
    turn = sorted(by_label)
    rng.shuffle(turn)
    picked: list[int] = []
    while len(picked) < k and any(by_label.values()):
        for y in turn:
            if by_label[y] and len(picked) < k:
                picked.append(by_label[y].pop())
    rng.shuffle(picked)  # no label order for the model to copy
    return picked


@dataclass
class PromptBuilder:
    """Builds the token ids of each eval prompt and of each label's continuation."""

    tokenizer: Any
    labels: list[str]
    max_length: int
    shots: list[tuple[str, str]]  # (text, label) examples shown before the question

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _cut(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_length:
            return text
        return self.tokenizer.decode(ids[: self.max_length], skip_special_tokens=True)

    def _question(self, text: str) -> str:
        return INSTRUCTION.format(labels=", ".join(self.labels), text=self._cut(text))

    def prompt(self, text: str) -> str:
        if self.chat:
            messages: list[dict[str, str]] = []
            for shot_text, shot_label in self.shots:
                messages += [{"role": "user", "content": self._question(shot_text)},
                             {"role": "assistant", "content": shot_label}]
            messages.append({"role": "user", "content": self._question(text)})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        shots = "".join(f"{self._question(t)}\n{PLAIN_ANSWER} {y}\n\n" for t, y in self.shots)
        return f"{shots}{self._question(text)}\n{PLAIN_ANSWER}"

    def prompt_ids(self, text: str) -> list[int]:
        # a chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones
        ids = self.tokenizer(self.prompt(text), add_special_tokens=not self.chat)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if not self.chat and ids and eos is not None and ids[-1] == eos:
            ids = ids[:-1]  # some tokenizers end every text with EOS: the answer must follow the prompt
        return ids

    def label_ids(self) -> list[list[int]]:
        prefix = "" if self.chat else " "
        return [self.tokenizer(prefix + label, add_special_tokens=False)["input_ids"] for label in self.labels]


def check_label_tokens(labels: list[str], continuations: list[list[int]], scoring: str) -> None:
    """Labels the scorer cannot tell apart are bad input, not a silent tie."""
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            same = continuations[a] == continuations[b]
            if same:
                raise WorkbenchError(f"labels {labels[a]!r} and {labels[b]!r} have the same tokens for this "
                                     "tokenizer, so a prompt cannot tell them apart: rename one of them")
            if scoring == "first" and continuations[a][0] == continuations[b][0]:
                raise WorkbenchError(f"method.prompt_scoring = 'first' cannot tell labels {labels[a]!r} and "
                                     f"{labels[b]!r} apart: they start with the same token. Use 'mean'")


def prompt_encodings(builder: PromptBuilder, texts: list[str], limit: int | None,
                     max_label_tokens: int) -> list[dict[str, list[int]]]:
    """Each text's prompt ids and mask; a prompt (plus the longest label) beyond the context is refused."""
    out = []
    for text in texts:
        ids = builder.prompt_ids(text)
        if limit is not None and len(ids) + max_label_tokens > limit:
            raise WorkbenchError(f"a prompt is {len(ids) + max_label_tokens} tokens with its label, beyond the "
                                 f"model's limit of {limit}: lower train.max_length (now {builder.max_length}, "
                                 "the text's share of the prompt)")
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return out


def with_max_length(builder: PromptBuilder, max_length: int) -> PromptBuilder:
    return builder if builder.max_length == max_length else dataclasses.replace(builder, max_length=max_length)
