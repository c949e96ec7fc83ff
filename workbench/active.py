"""Active learning: which unlabelled texts a classification run should see labelled next, appending the
answers to the dataset file, and the learning curve that says whether the suggestions beat random picks.

`suggest` scores a pool of texts with a run's predictor. Uncertainty is the margin between the two highest
calibrated class probabilities (small = unsure) or the entropy of the probabilities; diversity keeps a
batch from being twenty near-copies of one unsure text: among the POOL_FACTOR x n most uncertain texts,
k-means (n clusters) over the model's sentence embeddings (the mean of its last hidden layer over the
tokens) groups similar texts, and each cluster gives its most uncertain one. balanced-margin shares the
batch equally among the predicted classes first (class-balanced uncertainty sampling: on a skewed pool
plain uncertainty rarely reaches the rare classes, which macro-F1 weighs as much as the common ones),
then spreads each class's share the same way over its CLASS_POOL_FACTOR x share most uncertain texts;
balanced-committee does the same with the margin of a committee: the model's probabilities averaged with a
logistic regression fitted on the sentence embeddings of the run's labelled rows. balanced-density (the
default) ranks by that committee's (1 - margin) times the text's typicality in the pool (`typicality`:
information density, so unsure outliers wait) and shares the batch among the predicted classes without
clustering (measured against random picks in the README). Texts already in the run's
data (data.source, data.eval_source) and repeated texts are never suggested; texts are compared after
Unicode NFC, whitespace collapsing and case folding.

`append_labels` adds rows to a CSV, TSV or JSON Lines file atomically (a full copy with the rows written
to a temporary file in the same folder, fsynced, then renamed over the file), in the file's own encoding,
delimiter, line ending and columns. Each appended row is recorded in a journal beside the file
(`.<name>.labels-journal.json`: byte range and hash of the row), so `remove_last` undoes only rows that
labelling appended, also after a reload or a crash.

`learning_curve` measures rounds of train -> pick -> label from a labelled pool whose labels are revealed
only for the picked rows, one curve per strategy from the same start, each round trained afresh with
`workbench.loop.train` (the checkpoint chosen on a held-out share of the labelled rows) and its predictor
scored once on a disjoint test file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np

from .config import Config
from .data import COMPRESSIONS, FORMATS, TEXT_NAMES, detect_columns, load_labelled, read_file
from .errors import WorkbenchError
from .store import RunStore
from .task_table import DEFAULT_TASK, task_spec

__all__ = ["STRATEGIES", "Strategy", "suggest", "class_quotas", "typicality", "sentence_embeddings", "normalise",
           "append_labels", "remove_last", "appended_rows", "learning_curve", "curve_file"]

DENSITY_NEIGHBOURS = 20  # a text's typicality: the inverse mean cosine distance to this many pool neighbours
POOL_FACTOR = 10       # diversity clusters the POOL_FACTOR x n most uncertain texts
CLASS_POOL_FACTOR = 3  # balanced-margin clusters the CLASS_POOL_FACTOR x quota most uncertain texts of a class
JOURNAL_DEPTH = 1000   # rows the journal remembers (undo depth)
APPENDABLE = ("csv", "tsv", "jsonl")
CURVE_FILE = "learning-curve.json"


@dataclass(frozen=True)
class Strategy:
    """How texts are ranked (uncertainty) and whether the batch is spread over clusters (diversity)."""

    name: str
    uncertainty: Literal["margin", "entropy", "none"]
    diverse: bool
    title: str  # one line for views and the CLI
    balanced: bool = False  # the batch is shared equally among the predicted classes
    committee: bool = False  # uncertainty of the model and a linear probe on its embeddings, averaged
    dense: bool = False  # uncertainty weighted by how typical the text is of the pool (information density)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("balanced-density", "margin", False, "smallest margin of a committee (the model's calibrated "
             "probabilities averaged with a logistic regression on its sentence embeddings, fitted on the run's "
             "labelled rows) weighted by how typical the text is of the pool (the inverse mean cosine distance "
             f"to its {DENSITY_NEIGHBOURS} nearest pool neighbours), the batch shared equally among the predicted "
             "classes", balanced=True, committee=True, dense=True),
    Strategy("balanced-margin", "margin", True, "smallest margin between the top two classes, the batch shared "
             "equally among the predicted classes, one per k-means cluster of the model's embeddings within "
             "each class", balanced=True),
    Strategy("balanced-committee", "margin", True, "smallest margin of a committee (the model's calibrated "
             "probabilities averaged with a logistic regression on its sentence embeddings, fitted on the run's "
             "labelled rows), the batch shared equally among the predicted classes, one per k-means cluster "
             "within each class", balanced=True, committee=True),
    Strategy("margin-diversity", "margin", True, "smallest margin between the top two classes, one per k-means "
             "cluster of the model's embeddings"),
    Strategy("entropy-diversity", "entropy", True, "highest entropy of the class probabilities, one per k-means "
             "cluster of the model's embeddings"),
    Strategy("margin", "margin", False, "smallest margin between the top two classes"),
    Strategy("entropy", "entropy", False, "highest entropy of the class probabilities"),
    Strategy("random", "none", False, "random picks (the baseline suggestions are compared with)"),
]}


# --- suggestions ------------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """The form texts are compared in: Unicode NFC, runs of whitespace as one space, trimmed, case-folded."""
    return " ".join(unicodedata.normalize("NFC", str(text)).split()).casefold()


def suggest(run: str = "latest", pool: str | Path | list[str] = (), n: int = 20, home: str | Path | None = None,
            *, strategy: str = "balanced-density", seed: int = 0, text_column: str | None = None,
            exclude: Iterable[str] = (), predictor: Any = None) -> list[dict[str, Any]]:
    """The `n` pool texts most useful to label next for classification run `run`, most useful first.

    `pool`: a CSV/TSV/JSONL/Parquet file (its text column: `text_column`, else detected), any other file (one
    text per line), or a list of texts. Texts in the run's data, in `exclude`, or seen earlier in the pool are
    left out. Each row: index (0-based data row of the pool file, header not counted; a line of a text file;
    the position in a list), text, predicted (the top calibrated class), margin, entropy, scores (calibrated
    probability per label), cluster (k-means cluster, None without diversity), rank (1 = most useful) and
    strategy; a committee strategy adds committee_margin (the margin it ranked by). Fewer than `n` rows come
    back when fewer unlabelled texts remain. `predictor`: the run's loaded predictor, to skip loading it again.
    """
    chosen = _strategy(strategy)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise WorkbenchError(f"n = {n!r} suggestions is not allowed: ask for 1 or more")
    store = RunStore(home)
    record = store.get(run)
    _check_classification(record)
    rows = _pool_rows(pool, text_column)
    if not rows:
        raise WorkbenchError(f"the pool {_pool_name(pool)} holds no texts: give a file with a text column or one "
                             "text per line")
    gold = _labelled_rows(record)
    known = {normalise(t) for t in gold[0]} | {normalise(t) for t in exclude}
    candidates, seen = [], set()
    for index, text in rows:
        key = normalise(text)
        if key and key not in known and key not in seen:
            seen.add(key)
            candidates.append((index, text))
    if not candidates:
        raise WorkbenchError(f"every text in the pool {_pool_name(pool)} ({len(rows)}) is already labelled in "
                             f"run {record['id']}'s data or repeated: add new texts to the pool")
    if predictor is None:
        from .predict import load_predictor  # torch loads here

        predictor = load_predictor(record["id"], store.home)
    return _rank(predictor, candidates, n, chosen, seed, gold if chosen.committee else None)


def _strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise WorkbenchError(f"strategy {name!r} is unknown: choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def _check_classification(record: dict[str, Any]) -> None:
    task = (record.get("config") or {}).get("task") or DEFAULT_TASK
    spec = task_spec(task)
    if not spec.classes or spec.output != "label":
        raise WorkbenchError(f"run {record['id']} is a {task} run: suggestions rank texts by a classifier's class "
                             "probabilities; pick a text-classification run")


def _pool_name(pool: Any) -> str:
    return repr(str(pool)) if isinstance(pool, (str, Path)) else f"(a list of {len(list(pool))} texts)"


def _rank(predictor: Any, candidates: list[tuple[int, str]], n: int, strategy: Strategy,
          seed: int, gold: tuple[list[str], list[str]] | None = None) -> list[dict[str, Any]]:
    """Score the candidates and pick `n` of them by the strategy, most useful first; `gold`: the run's
    labelled (texts, labels), which a committee strategy fits its probe on."""
    texts = [t for _, t in candidates]
    features = committee = typical = None
    if strategy.uncertainty == "none":
        order = np.random.default_rng(seed).permutation(len(texts))[:n]
        probs = _probabilities(predictor, [texts[i] for i in order])
        picks = [(int(i), None) for i in order]
        full = dict(zip((int(i) for i in order), probs))
    else:
        own = probs = _probabilities(predictor, texts)
        if strategy.committee and gold is not None:
            probs, features = _committee(predictor, texts, own, gold)
            committee = dict(enumerate(probs)) if features is not None else None
        unsure = _uncertainty(probs, strategy.uncertainty)
        if strategy.dense:
            if features is None:
                features = _unit(sentence_embeddings(predictor, texts))
            typical = typicality(features)
            unsure = (1.0 + unsure) * typical  # (1 - margin) x typicality
        order = np.lexsort((np.arange(len(texts)), -unsure))  # most uncertain first, pool order on ties
        if strategy.balanced and len(texts) > n:
            picks = _balanced_picks(predictor, texts, order, probs, n, seed, features, strategy.diverse)
        elif strategy.diverse and len(texts) > n:
            short = order[: POOL_FACTOR * n]
            features = sentence_embeddings(predictor, [texts[i] for i in short])
            picks = _one_per_cluster(short, features, n, seed)
        else:
            picks = [(int(i), None) for i in order[:n]]
        full = dict(enumerate(own))
    labels = list(predictor.labels)
    out = []
    for rank, (i, cluster) in enumerate(picks, start=1):
        p = np.asarray(full[i], dtype=np.float64)
        top = np.sort(p)[::-1]
        out.append({"index": candidates[i][0], "text": texts[i], "predicted": labels[int(p.argmax())],
                    "margin": float(top[0] - (top[1] if len(top) > 1 else 0.0)),
                    "entropy": float(_uncertainty(p[None, :], "entropy")[0]),
                    "scores": {name: float(s) for name, s in zip(labels, p)},
                    "cluster": cluster, "rank": rank, "strategy": strategy.name})
        if committee is not None:
            mean = np.sort(np.asarray(committee[i], dtype=np.float64))[::-1]
            out[-1]["committee_margin"] = float(mean[0] - (mean[1] if len(mean) > 1 else 0.0))
        if typical is not None:
            out[-1]["typicality"] = float(typical[i])
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def typicality(features: np.ndarray, neighbours: int = DENSITY_NEIGHBOURS) -> np.ndarray:
    """How typical each text is of the pool, in (0, 1]: the inverse of its mean cosine distance to its
    `neighbours` nearest other texts (by their embeddings `features`), over the largest such value. Weighing
    uncertainty by it (information density, Settles & Craven 2008) passes over unsure outliers (a one-word
    text, a text in another language) whose labels teach the model little about the texts it will meet."""
    count = len(features)
    if count < 2:
        return np.ones(count)
    from sklearn.neighbors import NearestNeighbors

    k = min(neighbours, count - 1)
    distances, _ = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(features).kneighbors(features)
    density = 1.0 / (np.clip(distances[:, 1:], 0.0, None).mean(axis=1) + 1e-6)
    return density / density.max()


def _probabilities(predictor: Any, texts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, len(predictor.labels)))
    if hasattr(predictor, "probabilities"):
        return np.asarray(predictor.probabilities(texts), dtype=np.float64)
    answers = predictor.predict(texts)
    return np.asarray([[a["scores"][name] for name in predictor.labels] for a in answers], dtype=np.float64)


def _uncertainty(probs: np.ndarray, kind: str) -> np.ndarray:
    """Higher = less sure: minus the margin between the top two probabilities, or the entropy."""
    if kind == "margin":
        top = -np.sort(-probs, axis=1)
        return -(top[:, 0] - top[:, 1]) if probs.shape[1] > 1 else -top[:, 0]
    from scipy.stats import entropy

    return entropy(np.clip(probs, 1e-12, 1.0), axis=1)


def _one_per_cluster(order: np.ndarray, features: np.ndarray, n: int, seed: int) -> list[tuple[int, int | None]]:
    """k-means with `n` clusters over the candidates (ordered most uncertain first); each cluster gives its
    first (most uncertain) member, the picks in order of uncertainty. A cluster left empty (repeated
    embeddings) is made up with the next most uncertain texts."""
    from sklearn.cluster import KMeans

    clusters = KMeans(n_clusters=n, n_init=3, random_state=seed).fit_predict(_unit(features))
    picks, taken = [], set()
    for position, cluster in enumerate(clusters):
        if int(cluster) not in taken:
            taken.add(int(cluster))
            picks.append(position)
    for position in range(len(order)):
        if len(picks) >= n:
            break
        if position not in picks:
            picks.append(position)
    return [(int(order[p]), int(clusters[p])) for p in sorted(picks[:n])]


def class_quotas(available: list[int], n: int) -> list[int]:
    """`n` picks shared as equally as the classes allow: a class with fewer `available` texts than its
    share gives all it has, and the rest is shared among the others (the earlier classes take a remainder)."""
    quotas, left = [0] * len(available), n
    open_ = [c for c, a in enumerate(available) if a > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for position, c in enumerate(list(open_)):
            take = min(share + (position < extra), available[c] - quotas[c])
            quotas[c] += take
            left -= take
        open_ = [c for c in open_ if quotas[c] < available[c]]
    return quotas


def _balanced_picks(predictor: Any, texts: list[str], order: np.ndarray, probs: np.ndarray, n: int,
                    seed: int, embedded: np.ndarray | None = None,
                    diverse: bool = True) -> list[tuple[int, int | None]]:
    """balanced-margin: `n` picks shared equally among the predicted classes (`class_quotas`), each class's
    share the most uncertain of its CLASS_POOL_FACTOR x share most uncertain texts spread by k-means; so a
    skewed pool still yields texts the model takes for its rare classes, which macro-F1 weighs as much as
    the common ones. Cluster numbers count on across the classes. `embedded`: the texts' sentence embeddings
    when already computed (a committee's)."""
    predicted = probs.argmax(axis=1)
    by_class = [order[predicted[order] == c] for c in range(probs.shape[1])]
    quotas = class_quotas([len(members) for members in by_class], n)
    place = {int(i): p for p, i in enumerate(order)}
    if not diverse:  # balanced-density: each class's share is its first texts in `order`
        picks = [(int(i), None) for members, q in zip(by_class, quotas) for i in members[:q]]
        return sorted(picks, key=lambda pick: place[pick[0]])
    shortlists = [members[: CLASS_POOL_FACTOR * q] for members, q in zip(by_class, quotas)]
    wanted = [int(i) for short, q in zip(shortlists, quotas) if q > 0 for i in short]
    if embedded is None:
        features = dict(zip(wanted, sentence_embeddings(predictor, [texts[i] for i in wanted])))
    else:
        features = {i: embedded[i] for i in wanted}
    picks, offset = [], 0
    for short, q in zip(shortlists, quotas):
        if q == 0:
            continue
        if len(short) > q:
            chosen = _one_per_cluster(short, np.stack([features[int(i)] for i in short]), q, seed)
        else:
            chosen = [(int(i), 0) for i in short]
        picks += [(i, None if c is None else c + offset) for i, c in chosen]
        offset += q
    return sorted(picks, key=lambda pick: place[pick[0]])  # most uncertain first


def _committee(predictor: Any, texts: list[str], probs: np.ndarray,
               gold: tuple[list[str], list[str]]) -> tuple[np.ndarray, np.ndarray | None]:
    """The committee's probabilities for `texts`: the model's (`probs`) averaged with a probe's, a class-
    balanced logistic regression fitted on the unit-length sentence embeddings of the run's labelled rows
    `gold`; and the texts' embeddings. Few labels leave a fine-tuned head weak and its probabilities flat
    (at 100 rotten-tomatoes labels, held-out macro-F1 about 0.53), while a linear probe on the encoder's
    mean-pooled embeddings learns faster (about 0.62 there), so its margin can tell unsure texts apart where
    the model's cannot. Measured against balanced-margin and random in the README (no clear winner). Without
    two labelled classes that the model knows, or with no embeddings (the classical baseline), the model's
    probabilities stay as they are."""
    from sklearn.linear_model import LogisticRegression

    labels = list(predictor.labels)
    place = {str(name): c for c, name in enumerate(labels)}
    pairs = [(t, place[str(y).strip()]) for t, y in zip(*gold) if str(y).strip() in place]
    if len({c for _, c in pairs}) < 2:
        return probs, None
    inner = predictor
    while hasattr(inner, "inner"):
        inner = inner.inner
    if getattr(inner, "model", None) is None or not hasattr(inner.model, "parameters"):
        return probs, None
    vectors = sentence_embeddings(predictor, [t for t, _ in pairs] + texts)
    unit = _unit(vectors)
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(unit[: len(pairs)], [c for _, c in pairs])
    probed = np.zeros_like(probs)
    probed[:, probe.classes_] = probe.predict_proba(unit[len(pairs):])
    return (probs + probed) / 2, unit[len(pairs):]


def sentence_embeddings(predictor: Any, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """(texts, features): the mean over tokens of the model's last hidden layer, as the run reads a text
    (a text read as chunks: the mean of its chunks). A predictor with no network (the classical baseline)
    gives its class probabilities instead."""
    inner = predictor
    while hasattr(inner, "inner"):  # CalibratedPredictor
        inner = inner.inner
    model, tokenizer = getattr(inner, "model", None), getattr(inner, "tokenizer", None)
    if model is None or tokenizer is None or not hasattr(model, "parameters"):
        return _probabilities(predictor, texts)
    import torch

    from .models.built import pool_chunks, text_indices
    from .tasks.classification import pad_batch

    encode, max_length = getattr(inner, "encode", None), getattr(inner, "max_length", None) or 512
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(texts), batch_size):
        part = texts[start: start + batch_size]
        if encode is None:
            enc = tokenizer(part, truncation=True, max_length=max_length)
            encodings = [{k: enc[k][i] for k in enc.keys()} for i in range(len(part))]
        else:
            encodings = encode(part, max_length)
        rows = []
        for first in range(0, len(encodings), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(tokenizer, encodings[first: first + batch_size]).items()}
            with torch.no_grad():
                out = model(**batch, output_hidden_states=True)
            hidden = getattr(out, "hidden_states", None)
            if not hidden:
                return _probabilities(predictor, texts)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden[-1].dtype)
            rows.append(((hidden[-1] * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy())
        parts.append(pool_chunks(np.concatenate(rows), text_indices(encodings), len(part)))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


# --- reading the pool and the run's data ----------------------------------------------------------------

def _pool_rows(pool: str | Path | list[str], text_column: str | None) -> list[tuple[int, str]]:
    """(row, text) for each non-blank text of the pool, rows counted from 0 (a table's data rows, a text
    file's lines, a list's items)."""
    if not isinstance(pool, (str, Path)):
        return [(i, str(t)) for i, t in enumerate(pool) if str(t).strip()]
    p = Path(pool).expanduser()
    if not p.is_file():
        raise WorkbenchError(f"pool file {str(pool)!r} not found: give a CSV/TSV/JSONL/Parquet file or a text "
                             "file with one text per line")
    if _table_format(p) is None:
        lines = _decode(p.read_bytes()).splitlines()
        return [(i, line) for i, line in enumerate(lines) if line.strip()]
    df, _ = read_file(p)
    df = df.rename(columns=str)
    column = text_column or _text_column(df, str(pool))
    if column not in df.columns:
        raise WorkbenchError(f"text column {column!r} not found in the pool {str(pool)!r}: columns found are "
                             f"{', '.join(df.columns)} (set the text column)")
    values = [_as_text(v) for v in df[column].tolist()]
    return [(i, unicodedata.normalize("NFC", t)) for i, t in enumerate(values) if t.strip()]


def _table_format(p: Path) -> str | None:
    name = p.name.lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def _text_column(df: Any, source: str) -> str:
    """A pool's text column when none is named: a usual name (text, review, ...), else the longest strings."""
    lower = {c.lower(): c for c in df.columns}
    named = next((lower[n] for n in TEXT_NAMES if n in lower), None)
    if named is not None:
        return named
    texts = [c for c in df.columns if df[c].dtype == object]
    if not texts:
        raise WorkbenchError(f"no text column among {', '.join(df.columns)} in the pool {source!r}: set the text "
                             "column")
    return max(texts, key=lambda c: df[c].astype(str).str.len().mean())


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):  # a column of words
        return " ".join(str(v) for v in value)
    return str(value)


def _decode(raw: bytes) -> str:
    """A text file's bytes as text: UTF-8 (BOM or not), UTF-16 with a BOM, else the detected encoding."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(raw[:1_000_000]).best()
        return raw.decode(best.encoding if best is not None else "latin-1", errors="replace")


def _labelled_rows(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The texts and labels of the run's data source and eval source."""
    data = (record.get("config") or {}).get("data") or {}
    texts: list[str] = []
    labels: list[str] = []
    for source in (data.get("source"), data.get("eval_source")):
        if source:
            more, answers, _ = load_labelled(str(source), data.get("text_column"), data.get("label_column"))
            texts += [str(t) for t in more]
            labels += [str(y) for y in answers]
    return texts, labels


# --- appending labels, and undo -------------------------------------------------------------------------

def journal_path(dataset_path: str | Path) -> Path:
    """Where the rows labelling appended to `dataset_path` are recorded (beside it, hidden)."""
    p = Path(dataset_path).expanduser()
    return p.with_name(f".{p.name}.labels-journal.json")


def append_labels(dataset_path: str | Path, rows: list[dict[str, str]], text_column: str | None = None,
                  label_column: str | None = None) -> int:
    """Append `rows` ({"text", "label"}) to a CSV, TSV or JSON Lines dataset file, atomically, in the file's
    encoding, delimiter, line ending and columns (other columns left empty); returns the file's data rows
    appended by labelling so far (what `remove_last` can undo). Columns left out are detected as training
    detects them."""
    p = Path(dataset_path).expanduser()
    layout = _layout(p, text_column, label_column)
    raw = p.read_bytes()
    pieces = []
    for row in rows:
        text, label = str(row.get("text", "")), str(row.get("label", "")).strip()
        if not text.strip() or not label:
            raise WorkbenchError(f"a labelled row needs a text and a label, got text={text[:40]!r} "
                                 f"label={label!r}: answer with one of the classes")
        pieces.append((text, label, _encode_row(layout, text, label, p.name)))
    if not pieces:
        return len(_journal(p, len(raw), raw))
    lead = b"" if raw.endswith(layout["newline_bytes"]) or not raw else layout["newline_bytes"]
    entries = _journal(p, len(raw), raw)
    position, added = len(raw), bytearray(lead)
    for i, (text, label, data) in enumerate(pieces):
        chunk = (lead if i == 0 else b"") + data
        entries.append({"text": text, "label": label, "start": position, "end": position + len(chunk),
                        "sha256": hashlib.sha256(chunk).hexdigest()})
        position += len(chunk)
        added += data
    # the journal first: a crash before the data is written leaves an entry the reconciliation drops
    _write_journal(p, entries[-JOURNAL_DEPTH:])
    _atomic_write(p, raw + bytes(added))
    return len(entries[-JOURNAL_DEPTH:])


def remove_last(dataset_path: str | Path, k: int = 1) -> list[dict[str, str]]:
    """Remove the last `k` rows that labelling appended (undo), atomically; returns them ({"text", "label"}),
    the last one first. Refused when the file changed after them, or fewer were appended."""
    p = Path(dataset_path).expanduser()
    if not p.is_file():
        raise WorkbenchError(f"dataset file {str(dataset_path)!r} not found: nothing to undo")
    raw = p.read_bytes()
    entries = _journal(p, len(raw), raw)
    if k < 1:
        raise WorkbenchError(f"k = {k!r} rows to undo is not allowed: 1 or more")
    if entries and entries[-1]["end"] != len(raw):
        raise WorkbenchError(f"dataset file {p.name!r} changed after the last labelled row (it is "
                             f"{len(raw) - entries[-1]['end']} bytes longer): undo removes only rows labelling "
                             "appended; edit the file by hand")
    if len(entries) < k:
        raise WorkbenchError(f"only {len(entries)} labelled rows can be undone in {p.name!r}, not {k}: undo "
                             "removes rows labelling appended, nothing older")
    removed = entries[-k:]
    # the data first: a crash before the journal is rewritten leaves entries the reconciliation drops
    _atomic_write(p, raw[: removed[0]["start"]])
    _write_journal(p, entries[:-k])
    return [{"text": e["text"], "label": e["label"]} for e in reversed(removed)]


def appended_rows(dataset_path: str | Path) -> list[dict[str, str]]:
    """The rows labelling appended to the file that are still in it, oldest first ({"text", "label"})."""
    p = Path(dataset_path).expanduser()
    if not p.is_file():
        return []
    raw = p.read_bytes()
    return [{"text": e["text"], "label": e["label"]} for e in _journal(p, len(raw), raw)]


def _layout(p: Path, text_column: str | None, label_column: str | None) -> dict[str, Any]:
    """How a row is written to the file: format, encoding, delimiter, line ending, header and columns."""
    if not p.is_file():
        raise WorkbenchError(f"dataset file {str(p)!r} not found: labels are appended to an existing CSV, TSV or "
                             "JSONL file with a header (text and label columns)")
    fmt = _table_format(p)
    if fmt not in APPENDABLE or p.name.lower().endswith(COMPRESSIONS):
        raise WorkbenchError(f"dataset file {p.name!r} is not plain CSV, TSV or JSONL: labels are appended to "
                             "one of those; save the dataset as .csv first")
    df, encoding = read_file(p)
    text, label = detect_columns(df.rename(columns=str), text_column, label_column)
    raw = p.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16-le" if raw[:2] == b"\xff\xfe" else "utf-16-be"
    elif encoding == "utf-16":
        encoding = "utf-16-le"
    sample = raw[:65536].decode(encoding, errors="ignore").lstrip("\ufeff")
    if fmt == "jsonl" and sample.lstrip()[:1] == "[":
        raise WorkbenchError(f"dataset file {p.name!r} is one JSON array: labels are appended to JSON Lines (one "
                             "object per line); rewrite it as .jsonl")
    newline = "\r\n" if "\r\n" in sample.split("\n", 1)[0] + "\n" else "\n"
    header_line = sample.splitlines()[0] if sample else ""
    delimiter = "\t" if fmt == "tsv" else _delimiter(header_line)
    header = next(csv.reader([header_line], delimiter=delimiter)) if fmt != "jsonl" else []
    return {"format": fmt, "encoding": encoding, "newline": newline, "newline_bytes": newline.encode(encoding),
            "delimiter": delimiter, "header": header, "text": text, "label": label}


def _delimiter(header: str) -> str:
    """',' unless the header row clearly uses ';', tab or '|' (as the data reader decides)."""
    counts = {d: header.count(d) for d in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > counts[","] else ","


def _encode_row(layout: dict[str, Any], text: str, label: str, name: str) -> bytes:
    if layout["format"] == "jsonl":
        line = json.dumps({layout["text"]: text, layout["label"]: label}, ensure_ascii=False) + layout["newline"]
    else:
        values = {layout["text"]: text, layout["label"]: label}
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=layout["delimiter"], lineterminator=layout["newline"]).writerow(
            [values.get(column, "") for column in layout["header"]])
        line = buffer.getvalue()
    try:
        return line.encode(layout["encoding"])
    except UnicodeEncodeError:
        raise WorkbenchError(f"dataset file {name!r} is written in {layout['encoding']}, which cannot hold a "
                             f"character of the text {text[:40]!r}: save the dataset as UTF-8") from None


def _journal(p: Path, size: int, raw: bytes) -> list[dict[str, Any]]:
    """The journal's entries that still match the file: trailing entries a crash left unmatched (beyond
    the end, or other bytes in their place) are dropped."""
    path = journal_path(p)
    try:
        entries = json.loads(path.read_text(encoding="utf-8")).get("entries", []) if path.is_file() else []
    except (OSError, ValueError, AttributeError):
        entries = []  # a damaged journal: nothing can be undone, the data is untouched
    while entries and (entries[-1]["end"] > size or
                       hashlib.sha256(raw[entries[-1]["start"]: entries[-1]["end"]]).hexdigest()
                       != entries[-1]["sha256"]):
        entries.pop()
    return entries


def _write_journal(p: Path, entries: list[dict[str, Any]]) -> None:
    _atomic_write(journal_path(p), json.dumps({"dataset": p.name, "entries": entries},
                                              ensure_ascii=False).encode("utf-8"))


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a temporary file in the same folder, fsync it, rename it over `path`, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems: the rename is still atomic
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# --- the learning curve ---------------------------------------------------------------------------------

def curve_file(dataset_path: str | Path) -> Path:
    """Where a learning curve measured for `dataset_path` is kept (beside it, hidden)."""
    p = Path(dataset_path).expanduser()
    return p.with_name(f".{p.name}.{CURVE_FILE}")


def learning_curve(config: Config, pool: str | Path | list[dict[str, str]], test_source: str | Path, *,
                   start: int = 100, rounds: int = 3, per_round: int = 50,
                   strategies: tuple[str, ...] = ("balanced-density", "random"), seed: int = 0,
                   home: str | Path | None = None, workdir: str | Path | None = None, out: str | Path | None = None,
                   on_point: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Labels vs macro-F1 per strategy: `start` labelled rows drawn at random (with `seed`) from `pool` (a
    labelled file, or rows {"text", "label"} whose labels stand for the person answering), then `rounds`
    rounds of `per_round` rows picked by each strategy, their labels revealed, and a new training.

    Every training is `config` (model, method, epochs, max_length, baseline, ensemble, calibration ...) on
    the labelled rows so far, trained afresh with train.seed = `seed` as a user would run it: a share of the
    labelled rows (data.eval_fraction) is held out to pick the checkpoint, stop early, calibrate and decide
    the ensemble. The run's predictor is then scored once on `test_source` (rows of the pool found there are
    dropped, so it stays disjoint): nothing is chosen on the test set. The start run is shared by all strategies. Runs go to `home`
    (default store), training files to `workdir` (a new temporary folder); `out` receives the result as JSON
    (written atomically); `on_point(strategy, point)` hears each point as it is measured.
    """
    for name in strategies:
        _strategy(name)
    began = time.perf_counter()
    rows, test_count = _curve_rows(config, pool, test_source)
    needed = start + rounds * per_round
    if start < 2 or rounds < 1 or per_round < 1:
        raise WorkbenchError(f"start={start}, rounds={rounds}, per_round={per_round}: a curve needs a start of 2 "
                             "or more labels, 1 or more rounds and 1 or more labels a round")
    if len(rows) < needed:
        raise WorkbenchError(f"the pool has {len(rows)} usable labelled rows (after dropping repeats and test "
                             f"rows), fewer than the {needed} a curve of start {start} + {rounds} x {per_round} "
                             "needs: lower them or give a larger pool")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    first = [rows[i] for i in order[:start]]
    if len({r["label"] for r in first}) < 2:
        raise WorkbenchError(f"the {start} start rows drawn with seed {seed} hold one class: raise start or "
                             "change the seed")
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="active-curve-"))
    folder.mkdir(parents=True, exist_ok=True)
    store = RunStore(home)

    test_texts, test_labels, _ = load_labelled(str(test_source), config.data.text_column, config.data.label_column)

    def train_on(labelled: list[dict[str, str]], name: str) -> tuple[dict[str, Any], Any]:
        return _train_point(config, labelled, folder / f"{name}-{len(labelled)}.csv", (test_texts, test_labels),
                            seed, store)

    start_point, start_predictor = train_on(first, "start")
    curves: dict[str, list[dict[str, Any]]] = {name: [start_point] for name in strategies}
    state = {name: (list(first), [rows[i] for i in order[start:]], start_predictor) for name in strategies}
    if on_point is not None:
        for name in strategies:
            on_point(name, start_point)
    for round_ in range(rounds):  # round by round, so a stopped curve has every strategy at the same count
        for name in strategies:
            labelled, remaining, predictor = state[name]
            picked = suggest(curves[name][-1]["run"], [r["text"] for r in remaining], per_round, store.home,
                             strategy=name, seed=seed * 1000 + round_, predictor=predictor)
            chosen = {row["index"] for row in picked}
            labelled = labelled + [remaining[i] for i in sorted(chosen)]
            remaining = [r for i, r in enumerate(remaining) if i not in chosen]
            point, predictor = train_on(labelled, name)
            point["round"] = round_ + 1
            curves[name].append(point)
            state[name] = (labelled, remaining, predictor)
            if on_point is not None:
                on_point(name, point)
    result = {"start": start, "rounds": rounds, "per_round": per_round, "seed": seed, "pool_rows": len(rows),
              "test_rows": test_count, "metric": "f1_macro", "model": config.model, "method": config.method.name,
              "strategies": curves, "titles": {name: STRATEGIES[name].title for name in strategies},
              "final": {name: points[-1]["f1_macro"] for name, points in curves.items()},
              "seconds": round(time.perf_counter() - began, 1)}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(out), json.dumps(result, indent=1).encode("utf-8"))
    return result


def _curve_rows(config: Config, pool: str | Path | list[dict[str, str]],
                test_source: str | Path) -> tuple[list[dict[str, str]], int]:
    """The pool's labelled rows, each text once, none of them in the test file; and the test file's size."""
    if isinstance(pool, (str, Path)):
        texts, labels, _ = load_labelled(str(pool), config.data.text_column, config.data.label_column)
        pool = [{"text": t, "label": y} for t, y in zip(texts, labels)]
    test_texts, _, _ = load_labelled(str(test_source), config.data.text_column, config.data.label_column)
    seen = {normalise(t) for t in test_texts}
    rows = []
    for row in pool:
        key = normalise(row["text"])
        if key and key not in seen and str(row["label"]).strip():
            seen.add(key)
            rows.append({"text": str(row["text"]), "label": str(row["label"]).strip()})
    return rows, len(test_texts)


def _train_point(config: Config, labelled: list[dict[str, str]], path: Path, test: tuple[list[str], list[str]],
                 seed: int, store: RunStore) -> tuple[dict[str, Any], Any]:
    """Train `config` on `labelled` (written to `path`) as a user would: its own held-out share of the
    labelled rows (data.eval_fraction) picks the checkpoint, stops early, calibrates and decides the
    ensemble; then the run's predictor is scored once on the `test` (texts, labels). Returns the point and
    the loaded predictor."""
    from sklearn.metrics import accuracy_score, f1_score

    from .loop import train  # torch loads here
    from .predict import load_predictor

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["text", "label"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(labelled)
    _atomic_write(path, buffer.getvalue().encode("utf-8"))
    raw = config.to_dict()
    raw["data"].update({"source": str(path), "eval_source": None, "text_column": "text", "label_column": "label",
                        "max_train_samples": None, "max_eval_samples": None})
    raw["train"].update({"seed": seed})
    began = time.perf_counter()
    record = train(Config.from_dict(raw), store)
    if record["status"] != "completed" or not record.get("metrics"):
        raise WorkbenchError(f"the learning-curve run on {len(labelled)} labels ended {record['status']}"
                             f"{': ' + str(record.get('error')) if record.get('error') else ''}: see "
                             f"`workbench runs show {record['id']}`")
    predictor = load_predictor(record["id"], store.home)
    labels = list(predictor.labels)
    guessed = [labels[int(i)] for i in _probabilities(predictor, test[0]).argmax(axis=1)]
    point = {"labels": len(labelled), "f1_macro": float(f1_score(test[1], guessed, average="macro")),
             "accuracy": float(accuracy_score(test[1], guessed)),
             "eval_f1_macro": float(record["metrics"].get("f1_macro", float("nan"))),
             "best_step": record["metrics"].get("best_step"), "run": record["id"],
             "seconds": round(time.perf_counter() - began, 1)}
    return point, predictor
