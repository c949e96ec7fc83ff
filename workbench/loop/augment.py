"""More training rows from the ones a run has: augmentation (`data.augment`) and self-training
(`data.unlabeled_source` with `data.pseudo_label_from`).

Augmentation adds, per training row, `data.augment_factor` new rows (the integer part each, the fraction as a
seeded chance) made by one of the operations asked for, with the row's label or value; the eval split is never
touched. The word-level operations are EDA's (Wei & Zou 2019): `synonym` replaces about one word in ten by its
nearest neighbour in the model's own word-embedding space (offline, in any language the vocabulary covers:
neighbours of this kind are near-synonyms or related words, not a thesaurus), `insert` puts such a neighbour
of a random word at a random place, `swap` exchanges two random words, `delete` drops each word with
probability 0.1. `back-translation` sends each text through a translation model and back (`data.back_translation`:
[to, back], each a model name or directory the seq2seq task loads, or run:<id> of a seq2seq run) — the
paraphrase keeps the meaning and changes the words.

Self-training: a completed classification run labels the texts of an unlabelled file; those whose (calibrated)
top-class probability reaches `data.pseudo_label_threshold` join the training split, counted apart from the
gold rows in the record.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

__all__ = ["augment_rows", "embedding_neighbours", "pseudo_labels"]

WORD = re.compile(r"\S+")
REPLACE_SHARE = 0.1  # synonym: about one word in ten, at least one
DELETE_P = 0.1
EXAMPLES_KEPT = 5


def embedding_neighbours(tokenizer: Any, embeddings: Any, words: set[str]) -> dict[str, str]:
    """Each word's nearest whole-word neighbour (cosine) in the model's input embeddings, for the words the
    tokenizer keeps whole; words it splits into pieces have none."""
    import torch

    vocab = tokenizer.get_vocab()
    whole = [(w, i) for w, i in vocab.items() if w.isalpha() and len(w) >= 3]
    if not whole:
        return {}
    ids = torch.tensor([i for _, i in whole])
    with torch.no_grad():
        table = torch.nn.functional.normalize(embeddings.weight[ids].float(), dim=1)
        asked = [(w, vocab[w.lower()]) for w in sorted(words) if w.lower() in vocab and w.isalpha()]
        if not asked:
            return {}
        index = {i: k for k, (_, i) in enumerate(whole)}
        rows = torch.tensor([index[i] for _, i in asked if i in index])
        asked = [(w, i) for w, i in asked if i in index]
        sims = table[rows] @ table.T
        sims[torch.arange(len(asked)), rows] = -1.0  # not itself
        best = sims.argmax(dim=1).tolist()
    out = {}
    for (word, _), j in zip(asked, best):
        neighbour = whole[j][0]
        out[word] = neighbour.capitalize() if word[:1].isupper() else neighbour
    return out


def _synonym(words: list[str], rng: random.Random, near: dict[str, str]) -> list[str]:
    slots = [i for i, w in enumerate(words) if w in near]
    if not slots:
        return words
    out = list(words)
    for i in rng.sample(slots, max(1, round(REPLACE_SHARE * len(words)))) if len(slots) > 1 else slots:
        out[i] = near[out[i]]
    return out


def _insert(words: list[str], rng: random.Random, near: dict[str, str]) -> list[str]:
    known = [w for w in words if w in near]
    if not known:
        return words
    out = list(words)
    out.insert(rng.randrange(len(out) + 1), near[rng.choice(known)])
    return out


def _swap(words: list[str], rng: random.Random, near: dict[str, str]) -> list[str]:
    if len(words) < 2:
        return words
    i, j = rng.sample(range(len(words)), 2)
    out = list(words)
    out[i], out[j] = out[j], out[i]
    return out


def _delete(words: list[str], rng: random.Random, near: dict[str, str]) -> list[str]:
    if len(words) < 2:
        return words
    kept = [w for w in words if rng.random() >= DELETE_P]
    return kept or [rng.choice(words)]


WORD_OPS: dict[str, Callable[[list[str], random.Random, dict[str, str]], list[str]]] = {
    "synonym": _synonym, "insert": _insert, "swap": _swap, "delete": _delete}


def augment_rows(texts: list[str], targets: list[Any], ops: list[str], factor: float, seed: int,
                 neighbours: dict[str, str] | None = None,
                 translate: Callable[[list[str]], list[str]] | None = None) -> tuple[list[str], list[Any], dict]:
    """New (texts, targets) made from the given rows, and a report: rows added per operation and a few
    examples. A row an operation leaves unchanged is not added."""
    rng = random.Random(seed)
    near = neighbours or {}
    plan: list[tuple[int, str]] = []
    for i in range(len(texts)):
        copies = int(factor) + (1 if rng.random() < factor - int(factor) else 0)
        plan += [(i, rng.choice(ops)) for _ in range(copies)]
    made: dict[int, str] = {}
    back = [k for k, (_, op) in enumerate(plan) if op == "back-translation"]
    if back:
        if translate is None:
            raise ValueError("back-translation needs a translator")
        for k, text in zip(back, translate([texts[plan[k][0]] for k in back])):
            made[k] = text
    for k, (i, op) in enumerate(plan):
        if op != "back-translation":
            made[k] = " ".join(WORD_OPS[op](WORD.findall(texts[i]), rng, near))
    new_texts, new_targets, counts, examples = [], [], {op: 0 for op in ops}, []
    for k, (i, op) in enumerate(plan):
        text = made.get(k, "")
        if not text.strip() or text.strip() == texts[i].strip():
            continue
        new_texts.append(text)
        new_targets.append(targets[i])
        counts[op] += 1
        if len(examples) < EXAMPLES_KEPT and all(e["op"] != op for e in examples[-len(ops):]):
            examples.append({"op": op, "original": texts[i], "augmented": text})
    report = {"added": len(new_texts), "by_operation": counts, "factor": factor, "examples": examples}
    return new_texts, new_targets, report


def pseudo_labels(predictor: Any, texts: list[str], labels: list[str], threshold: float,
                  batch_size: int = 32) -> tuple[list[str], list[int], dict[str, Any]]:
    """The texts a classifier labels with at least `threshold` probability, their label indices (in `labels`'
    order) and a report (kept, looked at, per class)."""
    import numpy as np

    if list(predictor.labels) != list(labels):
        raise ValueError(f"the labelling run's classes {list(predictor.labels)} differ from this data's {labels}")
    probs = np.asarray(predictor.probabilities(texts, batch_size=batch_size)) if texts else np.zeros((0, 1))
    keep = [i for i in range(len(texts)) if probs[i].max() >= threshold]
    chosen = [int(probs[i].argmax()) for i in keep]
    per_class = {name: chosen.count(j) for j, name in enumerate(labels)}
    return [texts[i] for i in keep], chosen, {"pool": len(texts), "pseudo_labelled": len(keep),
                                              "threshold": threshold, "per_class": per_class}


def grow_training(config: Any, data: Any, source: Any, store: Any) -> dict[str, Any]:
    """Apply self-training and augmentation to the run's training split, in place (classification: `data`
    is a Split; regression: `train_values`), before the loop chooses epochs and steps from its size; returns
    the record's info entries. `source` is the run's resolved model (catalog.ModelSource)."""
    from ..errors import WorkbenchError

    info: dict[str, Any] = {}
    targets = "train_labels" if hasattr(data, "train_labels") else "train_values"
    if config.data.unlabeled_source is not None:
        from ..data import load_texts

        record = store.get(store.resolve(config.data.pseudo_label_from))
        if record["status"] != "completed" or record["config"].get("task") != config.task:
            raise WorkbenchError(f"data.pseudo_label_from: run {record['id']} is a {record['status']} "
                                 f"{record['config'].get('task')} run: name a completed {config.task} run")
        pool = load_texts(config.data.unlabeled_source)
        seen = {t.strip() for t in [*data.train_texts, *data.eval_texts]}
        pool = list(dict.fromkeys(t for t in pool if t.strip() and t.strip() not in seen))
        try:
            texts, labels, report = pseudo_labels(_calibrated(record, store.home), pool, data.labels,
                                                  config.data.pseudo_label_threshold)
        except ValueError as exc:
            raise WorkbenchError(f"data.pseudo_label_from: {exc}: label with a run trained on these classes") from None
        report.update(run=record["id"], gold_rows=len(data.train_texts))
        data.train_texts = list(data.train_texts) + texts
        data.train_labels = list(data.train_labels) + labels
        info["self_training"] = report
    if config.data.augment:
        ops = list(dict.fromkeys(config.data.augment))
        words = {w for t in data.train_texts for w in WORD.findall(t) if w.isalpha()}
        near = embedding_neighbours(*word_embeddings(source, config.trust_remote_code), words) \
            if {"synonym", "insert"} & set(ops) else {}
        translate = back_translator(config.data.back_translation, store) if "back-translation" in ops else None
        texts, values, report = augment_rows(data.train_texts, getattr(data, targets), ops,
                                             config.data.augment_factor, config.train.seed, near, translate)
        report["rows_before"] = len(data.train_texts)
        data.train_texts = list(data.train_texts) + texts
        setattr(data, targets, list(getattr(data, targets)) + values)
        info["augmentation"] = report
    return info


def word_embeddings(source: Any, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The model's tokenizer and its input word-embedding matrix, read from its safetensors files alone
    (no model is built: the matrix is one tensor, loaded lazily)."""
    import glob
    import os

    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from ..errors import WorkbenchError

    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    for path in sorted(glob.glob(os.path.join(source.path, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            name = next((k for k in f.keys() if k.endswith(("word_embeddings.weight", "embed_tokens.weight",
                                                                 "wte.weight", "shared.weight"))), None)
            if name is not None:
                return tokenizer, torch.nn.Embedding.from_pretrained(f.get_tensor(name))
    raise WorkbenchError(f"data.augment synonym/insert: no word-embedding matrix found in {source.name}'s "
                         "safetensors files: use swap, delete or back-translation with this model")


def _calibrated(record: dict[str, Any], home: Any) -> Any:
    """The run's classifier, its probabilities scaled by the temperature it fitted (when it fitted one)."""
    from ..calibration import CalibratedPredictor, read_calibration
    from ..tasks import task_of

    predictor = task_of(record["config"]).load_predictor(record, home)
    fitted = read_calibration(record["dir"])
    return CalibratedPredictor(predictor, fitted["temperature"]) if fitted else predictor


def back_translator(models: list[str], store: Any) -> Callable[[list[str]], list[str]]:
    """Texts through `models[0]` and back through `models[1]`: each a seq2seq run (run:<id>) or a translation
    model the seq2seq task can load (a directory or a hub id; offline, a hub id must be in the cache)."""
    there, back = (_translator(m, store) for m in models)
    return lambda texts: back(there(texts))


def _translator(name: str, store: Any) -> Callable[[list[str]], list[str]]:
    from ..errors import WorkbenchError

    if name.startswith("run:"):
        from ..tasks import task_of

        record = store.get(store.resolve(name[4:]))
        predictor = task_of(record["config"]).load_predictor(record, store.home)
        if getattr(predictor, "task", None) != "seq2seq":
            raise WorkbenchError(f"data.back_translation: {name} is not a seq2seq run: name a translation run "
                                 "or model")
        return lambda texts: [r["translation"] for r in predictor.predict(texts)]
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ..catalog import resolve_model

    source = resolve_model(name, store.home, False)
    path = source.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    except OSError as exc:
        raise WorkbenchError(f"data.back_translation: cannot load {name!r} ({str(exc).splitlines()[0][:120]}): "
                             "name a translation model directory, a cached hub id, or run:<id>") from None

    def translate(texts: list[str], batch: int = 16) -> list[str]:
        out: list[str] = []
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i: i + batch], return_tensors="pt", padding=True, truncation=True, max_length=256)
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=256, num_beams=1, do_sample=False)
            out += tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out

    return translate
