"""Token classification (named entities): a tag per word, scored as entities.

- Data: CoNLL, JSON Lines or Parquet sentences (workbench/entities.py), or catalog NER data (wnut-16), in
  IOB2 (BIO) or BIOES; exact duplicate sentences dropped; a seeded split holds out data.eval_fraction (or
  data.eval_source). The head's tags are every prefix of every entity type seen, so a type that the eval
  split holds and the training split lacks is still a tag (said in the notes).
- Model: an encoder with a token-classification head (models/token_classifier.py). A word's tag is
  learned and predicted on its first sub-word token; the others are ignored (-100), as is the padding.
- Loss: cross-entropy, a mean over the batch's labelled tokens (what `loss_weight` counts).
- Evaluation: seqeval's entity-level F1 (the best checkpoint's figure), precision and recall, micro over
  entities and per type, token accuracy, a confusion over entity types, the sentences with mistakes; every
  eval sentence's tags and spans in <run>/eval/step-N.json. A word cut off by train.max_length counts as O.
- Answering: `predict` takes raw strings (split into words at whitespace, a CJK character a word) or lists
  of tokens, and returns entity spans with character offsets and a score each.
- Personal data (data.mask_personal): the eval rows in <run>/eval/step-N.json and the mistakes are masked
  unless "off" (a token overlapping an address or a number becomes [EMAIL], [PHONE], ...; tags stay aligned);
  "all" masks the training and eval sentences themselves before the model sees them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..catalog import DATASETS, ModelSource, resolve_model
from ..config import Config, DataConfig
from ..entities import (OUTSIDE, NerFile, Sentence, convert, entity_figures, entity_tuples, figures_lines,
                        read_sentences, sentence_text, spans_of, tag_set, types_of, words_of)
from ..errors import WorkbenchError
from ..models.built import BuiltModel
from ..models.loading import load_tokenizer
from ..models.state import load_trainable_state, set_seed
from ..models.token_classifier import build_token_classifier, check_token_model
from ..models.vocabulary import missing_characters
from ..privacy import PLACEHOLDERS, mask_tokens
from ..run_paths import TAGS_FILE, RunPaths
from ..task_table import spec_for
from .base import EvalResult, Evaluation
from .classification import encoder_run_info, trained_model_dir, write_json

IGNORED = -100  # a label the loss skips: sub-tokens after a word's first, special tokens, padding
MISTAKES_KEPT = 50
ENCODED_KEYS = ("input_ids", "attention_mask", "token_type_ids")
SPEC = spec_for("token_classification:TokenClassificationTask")  # this task's row in the task table
TASK_NAME = SPEC.name


@dataclass
class NerData:
    """Sentences split for training, the head's tags, their entity types and scheme."""

    train: list[Sentence]
    held: list[Sentence]
    tags: list[str]
    types: list[str]
    scheme: str
    source: str
    rows_read: int = 0
    notes: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)  # characters the run added to the vocabulary
    vocabulary: dict[str, Any] = field(default_factory=dict)  # what was added and why (run info "vocabulary")
    mask_personal: str = "stored"  # data.mask_personal: what the run masks
    masked: dict[str, int] = field(default_factory=dict)  # personal items masked in the sentences ("all"), by kind

    @property
    def train_texts(self) -> list[str]:
        """The training sentences as text (what a token-length measure reads)."""
        return [sentence_text(s.tokens)[0] for s in self.train]


def read_ner_source(source: str, tokens_column: str | None = None, tags_column: str | None = None) -> NerFile:
    """A catalog dataset of tagged sentences, or a file of them (CoNLL, JSONL, Parquet)."""
    if source in DATASETS:
        asset = DATASETS[source]
        if asset.shape != "sentences":
            raise WorkbenchError(f"dataset {source!r} is not tagged sentences: choose "
                                 f"{', '.join(n for n, a in DATASETS.items() if a.shape == 'sentences')}, or a "
                                 "CoNLL or JSONL file of tagged sentences")
        return read_sentences(asset.path())
    return read_sentences(source, tokens_column, tags_column)


def _unique(sentences: list[Sentence]) -> tuple[list[Sentence], int]:
    seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    kept = []
    for s in sentences:
        key = (tuple(s.tokens), tuple(s.tags))
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept, len(sentences) - len(kept)


def load_ner_data(cfg: DataConfig, seed: int) -> NerData:
    """Read, de-duplicate and split the sentences the config names; the head's tags from both splits."""
    read = read_ner_source(cfg.source, cfg.text_column, cfg.label_column)
    notes = list(read.notes)
    sentences, dropped = _unique(read.sentences)
    if dropped:
        notes.append(f"dropped {dropped} duplicate sentences")
    if cfg.eval_source:
        other = read_ner_source(cfg.eval_source, cfg.text_column, cfg.label_column)
        notes += [f"{cfg.eval_source}: {note}" for note in other.notes]
        held = [Sentence(s.tokens, convert(s.tags, read.scheme), s.where) for s in other.sentences] \
            if other.scheme != read.scheme else other.sentences
        train = sentences
    else:
        order = list(range(len(sentences)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * cfg.eval_fraction))
        if n_eval >= len(order):
            raise WorkbenchError(f"only {len(order)} sentences in {cfg.source!r}: too few to hold some out; add "
                                 "sentences or give data.eval_source")
        held, train = [sentences[i] for i in order[:n_eval]], [sentences[i] for i in order[n_eval:]]
    train = train[: cfg.max_train_samples] if cfg.max_train_samples is not None else train
    held = held[: cfg.max_eval_samples] if cfg.max_eval_samples is not None else held
    trained = types_of([t for s in train for t in s.tags])
    if not trained:
        raise WorkbenchError(f"the training sentences of {cfg.source!r} tag no entity (every tag is O): give "
                             "sentences with B- tags, or raise data.max_train_samples")
    types = types_of([t for s in train + held for t in s.tags])
    unseen = [t for t in types if t not in trained]
    if unseen:
        notes.append(f"entity types {', '.join(unseen)} occur in the eval sentences only: the model cannot learn them")
    masked: dict[str, int] = {}
    if cfg.mask_personal == "all":
        train, held = masked_sentences(train, masked), masked_sentences(held, masked)
        if masked:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(masked.items()))
            notes.append(f"masked {sum(masked.values())} personal items ({kinds}) in the training and eval "
                         "sentences before training (data.mask_personal: all)")
    return NerData(train, held, tag_set(types, read.scheme), types, read.scheme, cfg.source, len(read.sentences),
                   notes, mask_personal=cfg.mask_personal, masked=masked)


def masked_sentences(sentences: list[Sentence], counts: dict[str, int]) -> list[Sentence]:
    """The sentences with each token that overlaps personal data replaced by its placeholder (tags kept);
    adds the tokens masked, by kind, to `counts`."""
    kinds = {v: k for k, v in PLACEHOLDERS.items()}
    out = []
    for s in sentences:
        tokens = mask_tokens(s.tokens, *sentence_text(s.tokens))
        for before, after in zip(s.tokens, tokens):
            if before != after:
                counts[kinds[after]] = counts.get(kinds[after], 0) + 1
        out.append(Sentence(tokens, s.tags, s.where) if tokens != s.tokens else s)
    return out


def stored_sentence(tokens: list[str], mode: str) -> list[str]:
    """A sentence's tokens as the run stores or shows them under data.mask_personal = `mode`."""
    return list(tokens) if mode == "off" else mask_tokens(tokens, *sentence_text(tokens))


def encode_sentences(tokenizer: Any, token_lists: list[list[str]], tag_lists: list[list[str]] | None,
                     index: dict[str, int], max_length: int) -> list[dict[str, Any]]:
    """Sub-word ids of each sentence; `labels` on each word's first sub-token (the others IGNORED), and
    `word_starts`: the word whose first sub-token each position is (-1 elsewhere)."""
    enc = tokenizer(token_lists, is_split_into_words=True, truncation=True, max_length=max_length)
    out = []
    for i in range(len(token_lists)):
        starts, previous = [], None
        for word in enc.word_ids(i):
            starts.append(word if word is not None and word != previous else -1)
            previous = word
        example = {k: enc[k][i] for k in ENCODED_KEYS if k in enc}
        example["word_starts"] = starts
        if tag_lists is not None:
            example["labels"] = [index[tag_lists[i][w]] if w >= 0 else IGNORED for w in starts]
        out.append(example)
    return out


def pad_tokens(tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A padded batch; labels padded with IGNORED on the tokenizer's padding side."""
    batch = dict(tokenizer.pad([{k: r[k] for k in ENCODED_KEYS if k in r} for r in rows], return_tensors="pt"))
    if rows and "labels" in rows[0]:
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(rows), width), IGNORED, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["labels"])
            if tokenizer.padding_side == "left":
                labels[i, width - n:] = torch.tensor(r["labels"])
            else:
                labels[i, :n] = torch.tensor(r["labels"])
        batch["labels"] = labels
    return batch


@torch.no_grad()
def held_predictions(model: torch.nn.Module, accelerator: Any, tokenizer: Any, held: list[dict],
                     words: int, batch_size: int) -> tuple[list[list[int]], float]:
    """Each held-out sentence's predicted tag ids per word (-1 where a word was cut off) and the mean loss
    over labelled tokens, gathered from all processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(held), world))
    per_rank = math.ceil(len(held) / world)
    mine += mine[-1:] * (per_rank - len(mine))  # equal counts for the gather; duplicates dropped below
    idx_chunks, tag_chunks, loss_chunks = [], [], []
    for start in range(0, per_rank, batch_size):
        idx = mine[start: start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in pad_tokens(tokenizer, [held[i] for i in idx]).items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORED,
                                                   reduction="none")
        tags = torch.full((len(idx), max(words, 1)), -1, dtype=torch.long, device=accelerator.device)
        best = logits.argmax(-1)
        offset = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            starts = held[i]["word_starts"]
            shift = offset - len(starts) if tokenizer.padding_side == "left" else 0
            for position, word in enumerate(starts):
                if word >= 0:
                    tags[row, word] = best[row, position + shift]
        idx_chunks.append(torch.tensor(idx, device=accelerator.device))
        tag_chunks.append(tags)
        loss_chunks.append(torch.stack([losses.sum(1), (labels != IGNORED).sum(1).float()], 1))
    idx_all = accelerator.gather(torch.cat(idx_chunks)).cpu().tolist()
    tags_all = accelerator.gather(torch.cat(tag_chunks)).cpu().tolist()
    loss_all = accelerator.gather(torch.cat(loss_chunks)).cpu().tolist()
    model.train()
    first = {}
    for pos, i in enumerate(idx_all):
        first.setdefault(i, pos)
    total, count = sum(loss_all[p][0] for p in first.values()), sum(loss_all[p][1] for p in first.values())
    return [tags_all[first[i]] for i in range(len(held))], total / max(count, 1.0)


def tags_from_ids(ids: list[int], n_words: int, tags: list[str]) -> list[str]:
    return [tags[ids[w]] if ids[w] >= 0 else OUTSIDE for w in range(n_words)]


def mistaken(held: list[Sentence], predicted: list[list[str]], mask_personal: str = "stored") -> list[dict[str, Any]]:
    """Up to MISTAKES_KEPT sentences whose entities differ from the gold ones, most wrong entities first;
    their tokens masked unless `mask_personal` is "off"."""
    rows = []
    for i, (s, guess) in enumerate(zip(held, predicted)):
        truth, answer = set(entity_tuples(s.tags)), set(entity_tuples(guess))
        wrong = len(truth ^ answer)
        if wrong:
            text, offsets = sentence_text(stored_sentence(s.tokens, mask_personal))
            rows.append((-wrong, i, {"index": i, "text": text, "gold": spans_of(s.tags, offsets, text),
                                     "predicted": spans_of(guess, offsets, text)}))
    return [r for *_, r in sorted(rows, key=lambda r: r[:2])[:MISTAKES_KEPT]]


def vocabulary_decision(tokenizer: Any, texts: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The characters of `texts` that `tokenizer` maps to its unknown token (most frequent first), and the
    decision to add them as the run records it ({} when the tokenizer covers every character)."""
    missing = missing_characters(tokenizer, texts)
    if not missing:
        return [], {}
    lacking = set(missing)
    occurrences = [ch for text in texts for ch in text if not ch.isspace()]
    unknown = sum(ch in lacking for ch in occurrences) / max(len(occurrences), 1)
    return missing, {"added_characters": len(missing), "unknown_share": round(unknown, 4),
                     "examples": "".join(missing[:20]),
                     "why": (f"the tokenizer reads {len(missing)} distinct characters of the training text "
                             f"({unknown:.0%} of character occurrences) as its unknown token: each is added as a "
                             "token of its own, its embedding row started at the mean one, and the word "
                             "embeddings train (at a larger learning rate) under every method")}


class TokenClassificationTask:
    name = SPEC.name
    best_metric = SPEC.best_metric
    greater_is_better = SPEC.greater_is_better
    examples = "training sentences"

    def load_data(self, config: Config, home: Path) -> NerData:
        return load_ner_data(config.data, config.train.seed)

    def train_size(self, data: NerData) -> int:
        return len(data.train)

    def check_model(self, config: Config, source: ModelSource, data: NerData) -> None:
        check_token_model(config, source, data.tags)

    def build(self, config: Config, source: ModelSource, data: NerData, total_steps: int | None) -> BuiltModel:
        """The tagger; the training text's characters its tokenizer lacks are added to the vocabulary first."""
        tokenizer = load_tokenizer(source, config.trust_remote_code)
        data.added_tokens, data.vocabulary = vocabulary_decision(tokenizer, data.train_texts)
        return build_token_classifier(config, source, data.tags, total_steps, data.added_tokens)

    def encode(self, config: Config, built: BuiltModel, data: NerData) -> tuple[list[dict], list[dict]]:
        index = {t: i for i, t in enumerate(data.tags)}

        def encoded(sentences: list[Sentence]) -> list[dict]:
            return encode_sentences(built.tokenizer, [s.tokens for s in sentences], [s.tags for s in sentences],
                                    index, config.train.max_length)

        return encoded(data.train), encoded(data.held)

    def collate(self, built: BuiltModel, examples: list[dict], indices: list[int]) -> dict[str, torch.Tensor]:
        return pad_tokens(built.tokenizer, [examples[i] for i in indices])

    def loss(self, built: BuiltModel, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss  # cross-entropy, a mean over the tokens not IGNORED

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORED).sum())

    def run_info(self, config: Config, built: BuiltModel, data: NerData, train: list[dict],
                 held: list[dict]) -> dict[str, Any]:
        counts = {t: 0 for t in data.types}
        for s in data.train:
            for kind, *_ in entity_tuples(s.tags):
                counts[kind] += 1
        cut = sum(sum(w >= 0 for w in e["word_starts"]) < len(s.tokens) for e, s in zip(train + held,
                                                                                       data.train + data.held))
        notes = data.notes + ([f"{cut} sentences are longer than train.max_length = {config.train.max_length} "
                               "tokens: their last words are not read (tagged O)"] if cut else [])
        return {"task": self.name, "train_rows": len(train), "eval_rows": len(held), "labels": data.types,
                "tags": data.tags, "scheme": data.scheme, "train_entity_counts": counts,
                "sentences_read": data.rows_read, "data_notes": notes, **encoder_run_info(built),
                **({"vocabulary": data.vocabulary} if data.vocabulary else {})}

    def eval_at_start(self, config: Config) -> bool:
        return False

    def evaluate(self, model: torch.nn.Module, accelerator: Any, config: Config, built: BuiltModel, data: NerData,
                 held: list[dict], step: int, epoch: float) -> Evaluation:
        words = max(len(s.tokens) for s in data.held)
        ids, loss = held_predictions(model, accelerator, built.tokenizer, held, words,
                                     config.train.effective_eval_batch_size)
        if not math.isfinite(loss):
            raise WorkbenchError(f"evaluation loss is {loss} at step {step}: lower train.learning_rate")
        predicted = [tags_from_ids(i, len(s.tokens), data.tags) for i, s in zip(ids, data.held)]
        metrics, payload = entity_figures([s.tags for s in data.held], predicted, data.types)
        result = EvalResult(step, float(epoch), float(loss), metrics, payload,
                            mistaken(data.held, predicted, data.mask_personal), figures_lines(payload))
        return Evaluation(result, result[self.best_metric], predicted)

    def fit_baseline(self, config: Config, data: NerData, run_dir: Path) -> dict[str, Any] | None:
        return None  # no classical tagger beside the model

    def write_evaluation(self, run_dir: Path, evaluation: Evaluation, data: NerData) -> None:
        rows = []
        for i, (s, guess) in enumerate(zip(data.held, evaluation.details)):
            tokens = stored_sentence(s.tokens, data.mask_personal)
            text, offsets = sentence_text(tokens)
            rows.append({"index": i, "text": text, "tokens": tokens, "gold": s.tags, "predicted": guess,
                         "gold_spans": spans_of(s.tags, offsets, text),
                         "predicted_spans": spans_of(guess, offsets, text)})
        step = evaluation.result.step
        write_json(RunPaths(run_dir).eval_step(step), {"step": step, "task": self.name, "labels": data.types,
                                                            "scheme": data.scheme, "rows": rows})

    def model_files(self, data: NerData) -> dict[str, Any]:
        return {TAGS_FILE: {"tags": data.tags, "types": data.types, "scheme": data.scheme,
                            "added_tokens": data.added_tokens}}

    def final_metrics(self, best: dict[str, Any], first: dict[str, Any] | None, run_dir: Path) -> dict[str, Any]:
        summary = {k: v for k, v in best.items() if k not in ("seq", "kind", "time", "mistakes")}
        preds = RunPaths(run_dir).eval_step(best["step"])
        summary["predictions_file"] = str(preds) if preds.is_file() else None
        return summary

    def load_predictor(self, record: dict[str, Any], home: Path) -> "EntityPredictor":
        from safetensors.torch import load_file

        config, paths = Config.from_dict(record["config"]), RunPaths.of(record)
        trained_model_dir(record)  # refused with the reason when the run has no trained weights yet
        saved = json.loads(paths.tags.read_text())
        set_seed(config.train.seed)
        built = build_token_classifier(config, resolve_model(config.model, home, config.trust_remote_code),
                                       saved["tags"], added_tokens=saved.get("added_tokens") or [])
        load_trainable_state(built.model, load_file(str(paths.trainable)))
        return EntityPredictor(built.model, built.tokenizer, saved["tags"], config.train.max_length or 256,
                               record["id"], config.task, saved.get("scheme", "IOB2"))


class EntityPredictor:
    """A trained tagger: `predict(texts)` gives each text's entities with character offsets.

    A text is a raw string (split into words at whitespace, punctuation at word edges and each CJK
    character a word of its own) or a list of tokens (a sentence already split: `[["Obama", "visited",
    "Paris"]]`); a sentence longer than `max_length` sub-word tokens is read in consecutive pieces."""

    def __init__(self, model: Any, tokenizer: Any, tags: list[str], max_length: int, run_id: str = "",
                 task: str = TASK_NAME, scheme: str = "IOB2") -> None:
        self.model, self.tokenizer, self.tags, self.max_length = model.eval(), tokenizer, tags, max_length
        self.run_id, self.task, self.scheme = run_id, task, scheme
        self.types = types_of(tags)

    def with_model(self, model: Any) -> "EntityPredictor":
        """The same predictor answering with another model of the same tags (an int8-quantised copy)."""
        return EntityPredictor(model, self.tokenizer, self.tags, self.max_length, self.run_id, self.task, self.scheme)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(sentences, sub-tokens, tags) scores of a padded batch; an optimised artifact (int8, ONNX) answers
        through a subclass that overrides this alone."""
        device = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()

    def _pieces(self, words: list[str]) -> list[tuple[int, int]]:
        """(first, end) word ranges whose sub-tokens fit in max_length with the special tokens."""
        if not words:
            return []
        budget = max(1, self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False))
        counts = [0] * len(words)
        for w in self.tokenizer(words, is_split_into_words=True, add_special_tokens=False).word_ids():
            if w is not None:
                counts[w] += 1
        pieces, first, used = [], 0, 0
        for w, n in enumerate(counts):
            if used + n > budget and w > first:
                pieces.append((first, w))
                first, used = w, 0
            used += n
        return pieces + [(first, len(words))]

    def tag_words(self, sentences: list[list[str]], batch_size: int = 32) -> list[tuple[list[str], list[float]]]:
        """Each sentence's tag per word and that tag's probability (O, 1.0 for a word with no sub-token)."""
        pieces = [(s, a, b) for s, words in enumerate(sentences) for a, b in self._pieces(words)]
        out = [([OUTSIDE] * len(words), [1.0] * len(words)) for words in sentences]
        for start in range(0, len(pieces), batch_size):
            chunk = pieces[start: start + batch_size]
            enc = encode_sentences(self.tokenizer, [sentences[s][a:b] for s, a, b in chunk], None, {},
                                   self.max_length)
            batch = pad_tokens(self.tokenizer, enc)
            probs = torch.softmax(self.logits(batch), -1)
            score, best = probs.max(-1)
            width = batch["input_ids"].shape[1]
            for row, ((s, a, _), e) in enumerate(zip(chunk, enc)):
                shift = width - len(e["word_starts"]) if self.tokenizer.padding_side == "left" else 0
                for position, word in enumerate(e["word_starts"]):
                    if word >= 0:
                        out[s][0][a + word] = self.tags[int(best[row, position + shift])]
                        out[s][1][a + word] = float(score[row, position + shift])
        return out

    def predict(self, texts: str | list[str | list[str]], batch_size: int = 32) -> list[dict[str, Any]]:
        if isinstance(texts, str):
            texts = [texts]
        split = [words_of(t) if isinstance(t, str) else (list(map(str, t)), sentence_text(list(map(str, t)))[1])
                 for t in texts]
        tagged = self.tag_words([words for words, _ in split], batch_size)
        answers = []
        for item, (words, offsets), (tags, scores) in zip(texts, split, tagged):
            text = item if isinstance(item, str) else sentence_text(words)[0]
            answers.append({"text": text, "entities": spans_of(tags, offsets, text, scores), "tokens": words,
                            "tags": tags})
        return answers
