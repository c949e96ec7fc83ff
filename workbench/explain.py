"""Token attributions of a trained run's answers, and how faithful they are.

`explain_predictor(predictor, ["a gripping, beautifully shot film"])` gives, per text, the words the model
read with each one's attribution: how much it pushed the answer, signed, toward every class of a classifier
(`by_class`), toward a higher value of a regressor, toward each entity a tagger found. Where the network's
gradients reach its input embeddings, the attributions are Integrated Gradients (Sundararajan et al. 2017;
captum's IntegratedGradients on the input token embeddings, from a baseline that replaces every text
token by the pad token and keeps the special tokens): they add up to the answer's change from the baseline,
up to `convergence_delta`. Where they do not (int8 and ONNX artifacts, the classical half of an ensemble),
each word's attribution is the answer's change when that word is deleted from the text (occlusion). Word
pieces are summed into words (the tokenizer's pre-tokenized words: "unwatchable" is one token, "," another),
each with its character offsets into the text.

`faithfulness(run)` measures whether deleting the words with the highest attribution lowers the predicted
class's probability more than deleting as many random words (comprehensiveness, DeYoung et al. 2020, ERASER),
on held-out texts, and writes the figures to the run's trust/faithfulness.json.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import WorkbenchError
from .privacy import mask_text
from .run_paths import RunPaths
from .store import RunStore
from .task_table import DEFAULT_TASK, task_spec

__all__ = ["explain", "explain_predictor", "faithfulness", "METHODS"]

METHODS = ("auto", "integrated-gradients", "occlusion")
IG = "integrated-gradients"
OCCLUSION = "occlusion"
BY_CLASS_LIMIT = 10  # classes attributed per text: all of them up to this many, else the most probable ones
IG_ROWS_PER_PASS = 64  # interpolation steps sent through the network at once
OCCLUSION_MAX_WORDS = 400  # words deleted one at a time (the rest are listed with no attribution)
RANDOM_DRAWS = 10  # random deletions averaged per text in faithfulness
FAITHFULNESS_EXAMPLES = 5  # texts kept in the report, masked
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass
class Target:
    """What a predictor's attributions explain: the object holding the network (or answering, for occlusion),
    the scale of its probabilities, and a sentence when it is a part of what the run answers with."""

    predictor: Any
    method: str
    temperature: float = 1.0
    note: str = ""
    labels: list[str] = field(default_factory=list)


# --- what is explained -----------------------------------------------------------------------------------------

def has_gradients(predictor: Any) -> bool:
    """Whether the predictor's network is a float torch module with an input embedding layer that takes
    `inputs_embeds` (int8-quantised and ONNX models have no gradients that reach the input)."""
    import torch

    model = getattr(predictor, "model", None)
    if not isinstance(model, torch.nn.Module) or getattr(predictor, "tokenizer", None) is None:
        return False
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        layer = embeddings() if callable(embeddings) else None
    except (AttributeError, NotImplementedError):
        layer = None
    if not isinstance(layer, torch.nn.Module):
        return False
    if any("quantized" in type(m).__module__ for m in model.modules()):
        return False
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return False  # Integrated Gradients feeds the network embeddings, not token ids
    return any(p.is_floating_point() for p in model.parameters())


def explained_target(predictor: Any, method: str = "auto") -> Target:
    """The part of `predictor` whose answers are attributed: a calibrated predictor's inner model (its
    temperature kept), an ensemble's first member with a network for Integrated Gradients; the predictor as
    it answers for occlusion."""
    if method not in METHODS:
        raise WorkbenchError(f"explanation method {method!r} is unknown: use one of {', '.join(METHODS)}")
    p, temperature, note = predictor, 1.0, ""
    while method != OCCLUSION:
        if "inner" in vars(p):  # a calibrated predictor: the same network, its logits divided by a temperature
            temperature *= float(getattr(p, "temperature", 1.0) or 1.0)
            p = p.inner
            continue
        members = getattr(p, "members", None)
        if isinstance(members, list):
            names = list(getattr(p, "names", None) or [f"member {i}" for i in range(len(members))])
            picks = [(n, m) for n, m in zip(names, members) if has_gradients(m) or hasattr(m, "members")]
            if not picks:
                break
            name, p = picks[0]
            temperature = 1.0  # the ensemble's temperature scales the average, not this member
            note = (f"the attributions are those of the ensemble's member {name!r}: the run answers with "
                    f"{', '.join(map(str, names))} averaged, and the label and score here are that member's")
            continue
        break
    if method == "auto":
        method = IG if has_gradients(p) else OCCLUSION
    if method == IG and not has_gradients(p):
        raise WorkbenchError(f"{type(p).__name__} has no float network whose gradients reach its input (an int8 or "
                             "ONNX artifact, a classical model): explain it with method occlusion")
    if method == OCCLUSION:
        p, temperature, note = predictor, 1.0, ""
    return Target(p, method, temperature, note, list(getattr(p, "labels", None) or []))


def _view(predictor: Any) -> str:
    return task_spec(getattr(predictor, "task", None) or DEFAULT_TASK).view


def checked_texts(texts: Any) -> list[str]:
    """The texts as a list, refused with the reason when one is not a text with a word in it."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise WorkbenchError("no text to explain: give one text or a list of texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise WorkbenchError(f"text {i} is a {type(text).__name__}, not a text: give strings")
        if not _WORD.search(text):
            raise WorkbenchError(f"text {i} is empty: give each text at least one word")
    return list(texts)


# --- words and their model positions ----------------------------------------------------------------------------

def text_words(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """The (start, end) offsets of the words of `text`: the tokenizer's pre-tokenized words, or runs of word
    characters and single punctuation marks without a fast tokenizer."""
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        spans: dict[int, list[int]] = {}
        for w, (s, e) in zip(enc.word_ids(), enc["offset_mapping"]):
            if w is not None and e > s:
                spans.setdefault(w, [s, e])[1] = e
        if spans:
            return [(s, e) for s, e in (spans[w] for w in sorted(spans))]
    return [m.span() for m in _WORD.finditer(text)]


def aligned_pieces(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int, int, int]]:
    """(position in `ids`, word, start, end) of every id that is a piece of `text`: the text's pieces found in
    the model's input as a run of its first pieces and a run of its last ones (head, or head+tail truncation),
    empty when they are not there (a prompt that tokenizes the text otherwise)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    pieces, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    words = enc.word_ids() if getattr(tokenizer, "is_fast", False) else list(range(len(pieces)))
    n = len(pieces)
    best_at, best_h = -1, 0
    for at in (i for i, t in enumerate(ids) if n and t == pieces[0]):
        h = 0
        while h < n and at + h < len(ids) and ids[at + h] == pieces[h]:
            h += 1
        if h > best_h:
            best_at, best_h = at, h
    if best_at < 0:
        return []
    rest = ids[best_at + best_h:]
    tail = next((t for t in range(min(n - best_h, len(rest)), 0, -1) if rest[:t] == pieces[n - t:]), 0)
    kept = list(range(best_h)) + list(range(n - tail, n))
    return [(best_at + j, words[i] if words[i] is not None else i, offsets[i][0], offsets[i][1])
            for j, i in enumerate(kept)]


def _model_inputs(p: Any, text: str) -> dict[str, Any] | None:
    """The padded tensors the predictor's network reads for `text` (None when it reads the text as several
    windows)."""
    import torch

    if getattr(p, "encode", None) is not None:
        from .tasks.classification import pad_batch

        encodings = p.encode([text], p.max_length)
        return pad_batch(p.tokenizer, encodings) if len(encodings) == 1 else None
    if hasattr(p, "batch"):  # an optimised artifact's TorchPredictor: the text cut as the run cuts it
        return dict(p.batch([text], "pt"))
    enc = p.tokenizer([text], truncation=True, max_length=p.max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _words_of_positions(pieces: list[tuple[int, int, int, int]]) -> tuple[list[tuple[int, int]], list[int],
                                                                          list[int]]:
    """Word spans (in reading order), and for each aligned piece its position and its word's index."""
    order: dict[int, int] = {}
    spans: list[list[int]] = []
    positions, word_index = [], []
    for position, word, start, end in pieces:
        if word not in order:
            order[word] = len(spans)
            spans.append([start, end])
        k = order[word]
        spans[k] = [min(spans[k][0], start), max(spans[k][1], end)]
        positions.append(position)
        word_index.append(k)
    return [(s, e) for s, e in spans], positions, word_index


# --- Integrated Gradients ----------------------------------------------------------------------------------------

def integrated_gradients(model: Any, batch: dict[str, Any], positions: list[int], baseline_id: int,
                         targets: list[int], output: Callable[[Any], Any], steps: int) -> dict[str, Any]:
    """Integrated Gradients of `output(model logits)` at each index of `targets`, on the input token embeddings
    (the model is called with `inputs_embeds`, so no hook touches it and other threads may use it meanwhile),
    from the input with the token ids at `positions` replaced by `baseline_id`: per target, each position's
    attribution (summed over the embedding), the convergence delta, f(input) and f(baseline)."""
    import torch
    from captum.attr import IntegratedGradients

    keys = [k for k in ("attention_mask", "token_type_ids") if k in batch]
    device = next(model.parameters()).device

    def forward(embeds: Any, *extra: Any) -> Any:
        return output(model(inputs_embeds=embeds, **dict(zip(keys, extra))).logits.float())

    n = len(targets)
    ids = batch["input_ids"].to(device)
    base = ids.clone()
    base[:, positions] = baseline_id
    with torch.no_grad():
        embed = model.get_input_embeddings()
        x, b = embed(ids).repeat(n, 1, 1), embed(base).repeat(n, 1, 1)
    extra = tuple(batch[k].to(device).repeat(n, 1) for k in keys)
    attr, delta = IntegratedGradients(forward).attribute(
        x, baselines=b, target=list(targets), additional_forward_args=extra, n_steps=steps,
        internal_batch_size=IG_ROWS_PER_PASS, return_convergence_delta=True)
    with torch.no_grad():
        f_x = forward(x[:1], *(e[:1] for e in extra))[0].cpu().numpy()
        f_b = forward(b[:1], *(e[:1] for e in extra))[0].cpu().numpy()
    per_position = attr.sum(-1).detach().float().cpu().numpy()[:, positions]
    return {"attributions": per_position, "delta": delta.detach().float().cpu().numpy(), "f_x": f_x, "f_b": f_b}


def baseline_id(tokenizer: Any) -> int:
    """The id every text token is replaced by in the Integrated Gradients baseline: the pad token (the
    unknown token, or 0, for a tokenizer without one)."""
    for name in ("pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _sum_by_word(values: np.ndarray, word_index: list[int], n_words: int) -> np.ndarray:
    """(targets, positions) -> (targets, words): word pieces summed into their words."""
    out = np.zeros((values.shape[0], n_words))
    np.add.at(out, (slice(None), np.asarray(word_index)), values)
    return out


def _ig_classes(t: Target, text: str, steps: int, wanted: int | None) -> dict[str, Any] | None:
    """A classifier's attributions toward each class by Integrated Gradients (toward the most probable ones
    and class `wanted` when there are more than BY_CLASS_LIMIT); None when the text's pieces are not found in
    what the network reads."""
    import torch

    p = t.predictor
    batch = _model_inputs(p, text)
    if batch is None:
        return None
    pieces = aligned_pieces(p.tokenizer, text, batch["input_ids"][0].tolist())
    if not pieces:
        return None
    spans, positions, word_index = _words_of_positions(pieces)

    def probabilities(logits: Any) -> Any:
        return torch.softmax(logits / t.temperature, dim=-1)

    with torch.no_grad():
        device = next(p.model.parameters()).device
        probs = probabilities(p.model(**{k: v.to(device) for k, v in batch.items()}).logits.float())[0].cpu().numpy()
    n = len(probs)
    # the probabilities add up to 1, so the attributions toward the last class are minus the others' sum
    complete = n <= BY_CLASS_LIMIT
    targets = list(range(n - 1)) if complete else [int(i) for i in np.argsort(-probs)[:BY_CLASS_LIMIT]]
    if not complete and wanted is not None and wanted not in targets:
        targets.append(wanted)
    ig = integrated_gradients(p.model, batch, positions, baseline_id(p.tokenizer), targets or [0], probabilities,
                              steps)
    words = _sum_by_word(ig["attributions"], word_index, len(spans))
    deltas = ig["delta"]
    if complete:
        words = np.vstack([words[: n - 1], -words[: n - 1].sum(0, keepdims=True)]) if n > 1 else words
        deltas = np.append(deltas[: n - 1], -deltas[: n - 1].sum()) if n > 1 else deltas
        targets = list(range(n))
    return {"spans": spans, "probs": probs, "targets": targets, "words": words, "deltas": deltas,
            "baseline": ig["f_b"]}


# --- occlusion ------------------------------------------------------------------------------------------------

def without(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with the characters of `spans` deleted."""
    out, at = [], 0
    for s, e in sorted(spans):
        if s >= at:
            out.append(text[at:s])
            at = e
    out.append(text[at:])
    return "".join(out)


def class_probabilities(predictor: Any, texts: list[str]) -> np.ndarray:
    """(texts, classes) probabilities of any classification predictor, in the order of its labels."""
    if hasattr(predictor, "probabilities"):
        return np.asarray(predictor.probabilities(list(texts)), dtype=np.float64)
    answers = predictor.predict(list(texts))
    return np.asarray([[a["scores"][name] for name in predictor.labels] for a in answers], dtype=np.float64)


def target_probabilities(t: Target, texts: list[str]) -> np.ndarray:
    """(texts, classes) probabilities of what `t` explains (its temperature applied)."""
    probs = class_probabilities(t.predictor, texts)
    if t.temperature == 1.0:
        return probs
    from scipy.special import softmax

    return softmax(np.log(np.clip(probs, 1e-12, 1.0)) / t.temperature, axis=-1)


def _occlusion_classes(t: Target, text: str) -> dict[str, Any]:
    spans = text_words(getattr(t.predictor, "tokenizer", None), text)[:OCCLUSION_MAX_WORDS]
    probs = target_probabilities(t, [text] + [without(text, [s]) for s in spans])
    return {"spans": spans, "probs": probs[0], "targets": list(range(probs.shape[1])),
            "words": (probs[0] - probs[1:]).T}


# --- per task ------------------------------------------------------------------------------------------------

def _tokens(text: str, spans: list[tuple[int, int]], by_target: dict[str, np.ndarray],
            toward: str | None) -> list[dict[str, Any]]:
    return [{"token": text[s:e], "start": int(s), "end": int(e),
             "attribution": float(by_target[toward][i]) if toward in by_target else 0.0,
             "by_class": {name: float(values[i]) for name, values in by_target.items()}}
            for i, (s, e) in enumerate(spans)]


def _explain_classes(t: Target, text: str, target: str | None, steps: int) -> dict[str, Any]:
    labels = t.labels
    if target is not None and target not in labels:
        raise WorkbenchError(f"target {target!r} is not a class of this run: use one of {', '.join(labels)}")
    wanted = labels.index(target) if target is not None else None
    found = _ig_classes(t, text, steps, wanted) if t.method == IG else None
    method = IG if found is not None else OCCLUSION
    if found is None:  # no gradients, or the network reads the text otherwise than as its pieces
        found = _occlusion_classes(t, text)
    probs = found["probs"]
    predicted = labels[int(np.argmax(probs))]
    by_target = {labels[c]: found["words"][i] for i, c in enumerate(found["targets"])}
    toward = target or predicted
    out = {"text": text, "label": predicted, "score": float(np.max(probs)), "target": toward, "method": method,
           "targets": list(by_target), "tokens": _tokens(text, found["spans"], by_target, toward)}
    if method == IG:
        c = found["targets"].index(labels.index(toward)) if labels.index(toward) in found["targets"] else None
        out["convergence_delta"] = float(found["deltas"][c]) if c is not None else None
        out["baseline_score"] = float(found["baseline"][labels.index(toward)])
    return out


def _explain_value(t: Target, text: str, target: str | None, steps: int) -> dict[str, Any]:
    p = t.predictor
    value = float(p.predict([text])[0]["value"])
    found = None
    if t.method == IG:
        batch = _model_inputs(p, text)
        pieces = aligned_pieces(p.tokenizer, text, batch["input_ids"][0].tolist()) if batch is not None else []
        if pieces:
            spans, positions, word_index = _words_of_positions(pieces)
            ig = integrated_gradients(p.model, batch, positions, baseline_id(p.tokenizer), [0],
                                      lambda logits: logits[:, :1] * p.std + p.mean, steps)
            found = {"spans": spans, "words": _sum_by_word(ig["attributions"], word_index, len(spans))[0],
                     "delta": float(ig["delta"][0]), "baseline": float(ig["f_b"][0])}
    out = {"text": text, "value": value, "target": "value", "targets": ["value"]}
    if found is not None:
        out.update({"method": IG, "convergence_delta": found["delta"], "baseline_score": found["baseline"]})
    else:
        spans = text_words(getattr(p, "tokenizer", None), text)[:OCCLUSION_MAX_WORDS]
        values = [float(a["value"]) for a in p.predict([without(text, [s]) for s in spans])]
        found = {"spans": spans, "words": value - np.asarray(values)}
        out["method"] = OCCLUSION
    out["tokens"] = _tokens(text, found["spans"], {"value": found["words"]}, "value")
    return out


def _entity_keys(entities: list[dict[str, Any]]) -> list[str]:
    """A name per entity: its type and text, with its offset where the same type and text come twice."""
    plain = [f"{e['type']} {e['text']!r}" for e in entities]
    return [k if plain.count(k) == 1 else f"{k} at {e['start']}" for k, e in zip(plain, entities)]


def _explain_entities(t: Target, text: str, target: str | None, steps: int) -> dict[str, Any]:
    from .entities import words_of

    p = t.predictor
    answer = p.predict([text])[0]
    words, offsets = words_of(text)
    entities = [dict(e) for e in answer["entities"]]
    for e, key in zip(entities, _entity_keys(entities)):
        e["key"] = key
    if target is not None:
        entities = [e for e in entities if target in (e["text"], e["key"])]
        if not entities:
            keys = ", ".join(repr(e["text"]) for e in answer["entities"]) or "none"
            raise WorkbenchError(f"target {target!r} is no entity found in the text (found: {keys}): give an "
                                 "entity's words")
    firsts = [next(i for i, (s, _) in enumerate(offsets) if s == e["start"]) for e in entities]
    tags = [p.tags.index(answer["tags"][w]) for w in firsts]
    if t.method == IG:
        by_target, deltas = _ig_entities(p, words, firsts, tags, steps)
        method = IG
    else:
        by_target, deltas, method = _occlusion_entities(p, words, firsts, tags), None, OCCLUSION
    named = {e["key"]: by_target[i] for i, e in enumerate(entities)}
    toward = entities[0]["key"] if entities else None
    out = {"text": text, "entities": entities, "target": toward, "targets": list(named), "method": method,
           "tokens": _tokens(text, offsets, named, toward)}
    if deltas is not None:
        out["convergence_delta"] = float(np.max(np.abs(deltas))) if len(deltas) else 0.0
    if not entities:
        out["note"] = "no entity was found in the text: there is nothing to attribute"
    return out


def _ig_entities(p: Any, words: list[str], firsts: list[int], tags: list[int],
                 steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Each entity's attributions per word: Integrated Gradients of its first word's tag probability."""
    import torch

    from .tasks.token_classification import ENCODED_KEYS

    enc = p.tokenizer([words], is_split_into_words=True, truncation=True, max_length=p.max_length)
    word_ids = enc.word_ids(0)
    batch = {k: torch.tensor([enc[k][0]]) for k in ENCODED_KEYS if k in enc}
    positions = [i for i, w in enumerate(word_ids) if w is not None]
    word_index = [word_ids[i] for i in positions]
    n_tags = len(p.tags)
    found = [(k, word_ids.index(w)) for k, w in enumerate(firsts) if w in word_ids]
    out = np.zeros((len(firsts), len(words)))
    if not found or not positions:
        return out, np.zeros(0)
    targets = [position * n_tags + tags[k] for k, position in found]
    ig = integrated_gradients(p.model, batch, positions, baseline_id(p.tokenizer), targets,
                              lambda logits: torch.softmax(logits, -1).flatten(1), steps)
    summed = _sum_by_word(ig["attributions"], word_index, len(words))
    for row, (k, _) in enumerate(found):
        out[k] = summed[row]
    return out, ig["delta"]


def _occlusion_entities(p: Any, words: list[str], firsts: list[int], tags: list[int]) -> np.ndarray:
    """Each entity's attributions per word: its first word's tag probability, less that probability with the
    word deleted (all of it when the deleted word is the entity's first)."""
    import torch

    from .tasks.token_classification import encode_sentences, pad_tokens

    n = min(len(words), OCCLUSION_MAX_WORDS)
    sentences = [words] + [words[:i] + words[i + 1:] for i in range(n)]
    probs = []
    for start in range(0, len(sentences), 32):
        chunk = sentences[start: start + 32]
        enc = encode_sentences(p.tokenizer, chunk, None, {}, p.max_length)
        batch = pad_tokens(p.tokenizer, enc)
        soft = torch.softmax(p.logits(batch), -1).numpy()
        width = soft.shape[1]
        for row, e in enumerate(enc):
            shift = width - len(e["word_starts"]) if p.tokenizer.padding_side == "left" else 0
            probs.append({w: soft[row, pos + shift] for pos, w in enumerate(e["word_starts"]) if w >= 0})
    out = np.zeros((len(firsts), len(words)))
    for k, (w, tag) in enumerate(zip(firsts, tags)):
        full = float(probs[0][w][tag]) if w in probs[0] else 0.0
        for i in range(n):
            moved = w - 1 if i < w else w  # the entity's first word, in the sentence without word i
            out[k, i] = full - (float(probs[1 + i][moved][tag]) if i != w and moved in probs[1 + i] else 0.0)
    return out


EXPLAINERS: dict[str, Callable[[Target, str, str | None, int], dict[str, Any]]] = {
    "confusion": _explain_classes, "regression": _explain_value, "entities": _explain_entities}


# --- public ------------------------------------------------------------------------------------------------

def explain_predictor(predictor: Any, texts: str | list[str], *, target: str | None = None, method: str = "auto",
                      steps: int = 32) -> list[dict[str, Any]]:
    """Per text: the answer ("label" and "score", "value", or "entities"), "method" (integrated-gradients or
    occlusion), "target" (what "attribution" pushes toward: the predicted class unless `target` names
    another, the value, the first entity or the one whose words `target` gives), "targets" (the keys of
    "by_class") and "tokens": one per word read, {"token", "start", "end" (character offsets), "attribution",
    "by_class"}; for Integrated Gradients "convergence_delta" (sum of attributions less the answer's change
    from the baseline) and "baseline_score"; "note" when the attributions are those of a part of the answer."""
    texts = checked_texts(texts)
    if not isinstance(steps, int) or not 2 <= steps <= 1024:
        raise WorkbenchError(f"steps must be a whole number from 2 to 1024, got {steps!r}: 32 is the default")
    view = _view(predictor)
    if view not in EXPLAINERS:
        raise WorkbenchError(f"a run of task {getattr(predictor, 'task', '?')} has no token attributions: "
                             "explain a classification, regression or named-entity run")
    t = explained_target(predictor, method)
    out = []
    for text in texts:
        answer = EXPLAINERS[view](t, text, target, steps)
        if t.note:
            answer["note"] = t.note
        out.append(answer)
    return out


def explain(run: str, texts: str | list[str], home: str | Path | None = None, **options: Any) -> list[dict[str, Any]]:
    """`explain_predictor` of the run's predictor (loaded from its best weights); options: target, method,
    steps."""
    from .predict import load_predictor

    texts = checked_texts(texts)
    return explain_predictor(load_predictor(run, home), texts, **options)


def write_json(path: Path, payload: Any) -> None:
    """`payload` as JSON at `path`, written to a temporary file and moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# --- faithfulness ------------------------------------------------------------------------------------------

def comprehensiveness(t: Target, explanations: list[dict[str, Any]], k: int, draws: int,
                      rng: np.random.Generator) -> dict[str, Any]:
    """ERASER comprehensiveness of each explanation: its predicted class's probability less that probability
    once the k words of highest attribution toward it are deleted, against the same for k random words (the
    mean over `draws` draws); texts with no more than k words are left out."""
    variants, rows = [], []
    for e in explanations:
        spans = [(tok["start"], tok["end"]) for tok in e["tokens"]]
        if len(spans) <= k:
            continue
        top = np.argsort([-tok["attribution"] for tok in e["tokens"]], kind="stable")[:k]
        randoms = [rng.choice(len(spans), size=k, replace=False) for _ in range(draws)]
        rows.append((e, len(variants), [spans[i] for i in top]))
        variants += [e["text"], without(e["text"], [spans[i] for i in top])]
        variants += [without(e["text"], [spans[i] for i in r]) for r in randoms]
    probs = target_probabilities(t, variants) if variants else np.zeros((0, 1))
    top_drops, random_drops, examples = [], [], []
    for e, at, top_spans in rows:
        c = t.labels.index(e["label"])
        full = probs[at, c]
        top_drops.append(float(full - probs[at + 1, c]))
        random_drops.append(float(np.mean(full - probs[at + 2: at + 2 + draws, c])))
        if len(examples) < FAITHFULNESS_EXAMPLES:
            examples.append({"text": mask_text(e["text"]), "label": e["label"], "score": round(float(full), 4),
                             "top_words": [mask_text(e["text"][s:x]) for s, x in top_spans],
                             "top_k_drop": round(top_drops[-1], 4), "random_k_drop": round(random_drops[-1], 4)})
    top, rand = float(np.mean(top_drops)) if rows else 0.0, float(np.mean(random_drops)) if rows else 0.0
    return {"n": len(rows), "top_k_drop": top, "random_k_drop": rand,
            "ratio": top / rand if rand > 0 else None,
            "top_beats_random": float(np.mean(np.asarray(top_drops) > np.asarray(random_drops))) if rows else 0.0,
            "examples": examples}


def faithfulness(run: str = "latest", texts: list[str] | None = None, home: str | Path | None = None, *,
                 k: int = 5, n: int = 50, seed: int = 0, method: str = "auto", steps: int = 32) -> dict[str, Any]:
    """Explain `n` held-out texts of a classification run (its eval split, or `texts`) and measure their
    comprehensiveness with `k` words deleted; the report (k, n, method, mean drops, their ratio, seconds per
    explanation, a few masked examples) is written to the run's trust/faithfulness.json and returned."""
    from .predict import load_predictor

    if not isinstance(k, int) or k < 1 or not isinstance(n, int) or n < 1:
        raise WorkbenchError(f"k and n must be whole numbers of at least 1, got k={k!r}, n={n!r}: the defaults "
                             "are k=5 words deleted on n=50 texts")
    store = RunStore(home)
    record = store.get(run)
    task = (record.get("config") or {}).get("task", DEFAULT_TASK)
    if not task_spec(task).classes:
        raise WorkbenchError(f"run {record['id']} is a {task} run: faithfulness is measured on the predicted class's "
                             "probability, so only classification runs have it")
    predictor = load_predictor(record["id"], store.home)
    source = "the run's eval split" if texts is None else "texts given"
    if texts is None:
        from .deploy.runs import eval_split

        texts = eval_split(record)[0]
    texts = checked_texts(texts)
    rng = np.random.default_rng(seed)
    t = explained_target(predictor, method)
    tokenizer = getattr(t.predictor, "tokenizer", None)
    chosen = [texts[i] for i in rng.permutation(len(texts)) if len(text_words(tokenizer, texts[i])) > k][:n]
    if not chosen:
        raise WorkbenchError(f"no text has more than k={k} words: give longer texts or a smaller k")
    started = time.perf_counter()
    explanations = explain_predictor(predictor, chosen, method=method, steps=steps)
    seconds = (time.perf_counter() - started) / len(chosen)
    figures = comprehensiveness(t, explanations, k, RANDOM_DRAWS, rng)
    report = {"run_id": record["id"], "k": k, "method": explanations[0]["method"], "steps": steps,
              "random_draws": RANDOM_DRAWS, "seed": seed, **figures, "seconds_per_text": round(seconds, 4),
              "texts": source,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "definition": f"mean drop of the predicted class's probability when the {k} words of highest "
                            f"attribution are deleted (top_k_drop), and when {k} random words are (random_k_drop, "
                            f"mean of {RANDOM_DRAWS} draws per text); ratio = top_k_drop / random_k_drop"}
    if t.note:
        report["note"] = t.note
    write_json(RunPaths.of(record).faithfulness, report)
    return report
