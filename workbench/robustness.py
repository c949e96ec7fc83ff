"""Robustness of a finished run: how its answers change when a text is disturbed in ways that keep its meaning.

Each perturbation is a pure function `(text, seed) -> text`: the same text and seed always give the same
result, whatever other texts are perturbed beside it (its random generator is seeded with the seed and the
text). `PERTURBATIONS` is the table of them; `robustness_report` runs a predictor on the clean texts and on
each perturbed copy and gives, per perturbation, accuracy and macro-F1 (a regression run: RMSE), how many
texts it changed, and the share of answers that flip (a regression run: the mean absolute change) among the
changed texts. Its out-of-domain part compares the mean top-class probability on the in-domain texts with
that on texts the run was never meant to see (the ones given, else built-in word salad and chatterbot
questions), and how well that confidence separates the two (AUROC of the maximum softmax probability,
Hendrycks & Gimpel 2017: 0.5 = not at all, 1.0 = every out-of-domain text is less confident).
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import WorkbenchError

__all__ = ["PERTURBATIONS", "Perturbation", "typos", "upper_case", "lower_case", "title_case", "no_punctuation",
           "extra_punctuation", "whitespace", "swapped_words", "changed_numbers", "changed_names",
           "word_salad", "builtin_ood", "robustness_report"]

TYPO_RATE = 0.1  # share of the words longer than 3 letters that get a typo (at least one per text)
SWAP_RATE = 0.1  # share of neighbouring word pairs swapped (at least one per text of two words or more)
PUNCT_RATE = 0.15  # share of word ends that get a punctuation mark (at least one)
WHITESPACE_RATE = 0.3  # share of the gaps between words that become a double space, a tab or a newline
EXAMPLES_KEPT = 3  # flipped examples kept per perturbation (masked before they are written)
OOD_ROWS = 300  # rows of each built-in out-of-domain set
NAMES = ("Alice", "Bram", "Chen", "Dmitri", "Esther", "Fatima", "Giulia", "Hiroshi", "Ingrid", "Jamal", "Kofi",
         "Lucia", "Mateo", "Nadia", "Olu", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Valentina",
         "Wei", "Ximena", "Yusuf", "Zofia")
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)  # a run of letters
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")
_SENTENCE_END = ".!?\"'\u201d:;"  # what may end the sentence before a capitalised word at a sentence start
_MARKS = ("!", ",", "...", "?", ";", " -")


def _rng(text: str, seed: int) -> random.Random:
    return random.Random(f"{seed}\x00{text}")  # str seeds are hashed with SHA-512: the same in every process


def _chosen(n: int, rate: float, rng: random.Random) -> list[int]:
    """`rate` of `n` positions (at least one when there are any), in order."""
    if n <= 0:
        return []
    return sorted(rng.sample(range(n), max(1, round(rate * n))))


def _pairs(n: int, rate: float, rng: random.Random) -> list[int]:
    """`rate` of `n` neighbouring pairs (i, i + 1), at least one, no two sharing a word: each word moves once."""
    order = list(range(n))
    rng.shuffle(order)
    taken: set[int] = set()
    for i in order[:]:
        if len(taken) >= max(1, round(rate * n)):
            break
        if i - 1 not in taken and i + 1 not in taken:
            taken.add(i)
    return sorted(taken)


def typos(text: str, seed: int = 0) -> str:
    """About 10 % of the words longer than 3 letters (at least one) get a typo: two inner neighbouring letters
    swapped, or one inner letter dropped."""
    rng = _rng(text, seed)
    words = [m for m in _WORD.finditer(text) if len(m.group()) > 3]
    out, at = [], 0
    for i in _chosen(len(words), TYPO_RATE, rng):
        m = words[i]
        w = m.group()
        j = rng.randrange(1, len(w) - 2)  # inner letters only: the first and last stay
        typo = w[:j] + w[j + 1] + w[j] + w[j + 2:] if rng.random() < 0.5 and w[j] != w[j + 1] else w[:j] + w[j + 1:]
        out += [text[at:m.start()], typo]
        at = m.end()
    return "".join(out) + text[at:]


def upper_case(text: str, seed: int = 0) -> str:
    """The text in capitals."""
    return text.upper()


def lower_case(text: str, seed: int = 0) -> str:
    """The text in small letters."""
    return text.lower()


def title_case(text: str, seed: int = 0) -> str:
    """Each word capitalised: its first letter a capital, the others small ("don't" stays one word)."""
    return re.sub(r"(?<![\w'\u2019])([^\W\d_])([\w'\u2019]*)", lambda m: m[1].upper() + m[2].lower(), text)


def no_punctuation(text: str, seed: int = 0) -> str:
    """Every punctuation mark (Unicode category P) removed; the spaces left doubled are merged."""
    stripped = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return re.sub(r" {2,}", " ", stripped).strip() if stripped != text else text


def extra_punctuation(text: str, seed: int = 0) -> str:
    """About 15 % of the words (at least one) followed by a mark: '!', ',', '...', '?', ';' or ' -'."""
    rng = _rng(text, seed)
    words = list(re.finditer(r"\S+", text))
    out, at = [], 0
    for i in _chosen(len(words), PUNCT_RATE, rng):
        m = words[i]
        out += [text[at:m.end()], rng.choice(_MARKS)]
        at = m.end()
    return "".join(out) + text[at:]


def whitespace(text: str, seed: int = 0) -> str:
    """About 30 % of the gaps between words (at least one) become a double space, a tab or a newline, and the
    text is padded with a space before and a tab and newline after."""
    rng = _rng(text, seed)
    gaps = list(re.finditer(r"[ ]+", text.strip()))
    body = text.strip()
    out, at = [], 0
    for i in _chosen(len(gaps), WHITESPACE_RATE, rng):
        m = gaps[i]
        out += [body[at:m.start()], rng.choice(("  ", "\t", "\n"))]
        at = m.end()
    return " " + "".join(out) + body[at:] + "\t\n"


def swapped_words(text: str, seed: int = 0) -> str:
    """About 10 % of the neighbouring word pairs (at least one) swapped."""
    rng = _rng(text, seed)
    parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them at odd ones
    words = parts[0::2]
    if sum(1 for w in words if w) < 2:
        return text
    for i in _pairs(len(words) - 1, SWAP_RATE, rng):
        words[i], words[i + 1] = words[i + 1], words[i]
    parts[0::2] = words
    return "".join(parts)


def changed_numbers(text: str, seed: int = 0) -> str:
    """Each number replaced by another of as many digits (a text without numbers is left as it is)."""
    rng = _rng(text, seed)

    def other(m: re.Match[str]) -> str:
        digits = [ch for ch in m.group() if ch.isdigit()]
        while True:
            new = [str(rng.randrange(1 if i == 0 and len(digits) > 1 else 0, 10)) for i in range(len(digits))]
            if new != digits:
                break
        it = iter(new)
        return "".join(next(it) if ch.isdigit() else ch for ch in m.group())

    return _NUMBER.sub(other, text)


def changed_names(text: str, seed: int = 0) -> str:
    """Capitalised words that do not start a sentence (names, mostly) replaced from a fixed list of first
    names, the same word by the same name within a text (a text without such words is left as it is)."""
    rng = _rng(text, seed)
    chosen: dict[str, str] = {}

    def other(m: re.Match[str]) -> str:
        before = text[:m.start()].rstrip()
        if not before or before[-1] in _SENTENCE_END:
            return m.group()
        if m.group() not in chosen:
            chosen[m.group()] = rng.choice([n for n in NAMES if n != m.group()])
        return chosen[m.group()]

    return _CAPITALISED.sub(other, text)


@dataclass(frozen=True)
class Perturbation:
    """One way of disturbing a text: its name in reports, what it does, and the function."""

    name: str
    description: str
    apply: Callable[[str, int], str]


PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in [
    Perturbation("typos", "letters swapped or dropped in ~10 % of the longer words", typos),
    Perturbation("upper case", "the whole text in capitals", upper_case),
    Perturbation("lower case", "the whole text in small letters", lower_case),
    Perturbation("title case", "each word capitalised", title_case),
    Perturbation("no punctuation", "every punctuation mark removed", no_punctuation),
    Perturbation("extra punctuation", "marks added after ~15 % of the words", extra_punctuation),
    Perturbation("whitespace", "doubled spaces, tabs, newlines, padded ends", whitespace),
    Perturbation("swapped words", "~10 % of neighbouring word pairs swapped", swapped_words),
    Perturbation("changed numbers", "each number replaced by another", changed_numbers),
    Perturbation("changed names", "capitalised words inside a sentence replaced by other names", changed_names),
]}


# --- out of domain -------------------------------------------------------------------------------------------

def word_salad(texts: Sequence[str], seed: int = 0) -> list[str]:
    """The words of `texts` shuffled across all of them, each text keeping its number of words: the same
    vocabulary with no sentence left."""
    rng = random.Random(seed)
    split = [t.split() for t in texts]
    pool = [w for words in split for w in words]
    rng.shuffle(pool)
    out, at = [], 0
    for words in split:
        out.append(" ".join(pool[at:at + len(words)]))
        at += len(words)
    return [t for t in out if t]


def builtin_ood(texts: Sequence[str], seed: int = 0, rows: int = OOD_ROWS) -> tuple[dict[str, list[str]], list[str]]:
    """The built-in out-of-domain sets and notes: word salad of `rows` of `texts`, and `rows` questions of the
    packaged chatterbot corpus (English small talk: a chat set, no labels of any classification task)."""
    rng = random.Random(seed)
    sample = rng.sample(list(texts), min(rows, len(texts)))
    sets = {"word salad": word_salad(sample, seed)}
    notes = []
    try:
        from .data import load_chatterbot_pairs

        questions = sorted({p["text"] for p in load_chatterbot_pairs() if p["text"].strip()} - set(texts))
    except (WorkbenchError, OSError, ImportError) as exc:
        notes.append(f"chatterbot questions left out: the packaged corpus could not be read ({exc})")
    else:
        sets["chatterbot questions"] = rng.sample(questions, min(rows, len(questions)))
    return sets, notes


# --- the report ------------------------------------------------------------------------------------------------

def _probabilities(predictor: Any, texts: list[str]) -> np.ndarray:
    """(texts, classes) probabilities of a classification predictor, in its labels' order."""
    if hasattr(predictor, "probabilities"):
        return np.asarray(predictor.probabilities(texts), dtype=np.float64)
    answers = predictor.predict(texts)
    return np.asarray([[a["scores"][name] for name in predictor.labels] for a in answers], dtype=np.float64)


def _values(predictor: Any, texts: list[str]) -> np.ndarray:
    return np.asarray([float(a["value"]) for a in predictor.predict(texts)], dtype=np.float64)


def _classification_figures(y: np.ndarray, pred: np.ndarray, classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y, pred)),
            "f1_macro": float(f1_score(y, pred, labels=list(range(classes)), average="macro", zero_division=0))}


def _perturbed(texts: list[str], seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per perturbation: every text perturbed, and the positions it actually changed."""
    out = {}
    for name, p in PERTURBATIONS.items():
        new = [p.apply(t, seed) for t in texts]
        out[name] = new, np.flatnonzero([a != b for a, b in zip(new, texts)])
    return out


def _classification_report(predictor: Any, texts: list[str], y: np.ndarray, label_names: list[str], seed: int,
                           ood_texts: Sequence[str] | None) -> dict[str, Any]:
    k = len(label_names)
    clean_probs = _probabilities(predictor, texts)
    if clean_probs.shape != (len(texts), k):
        raise WorkbenchError(f"the predictor gave probabilities of shape {clean_probs.shape} for {len(texts)} texts "
                             f"and {k} labels: pass the run's label names in its labels' order")
    clean = clean_probs.argmax(axis=1)
    report: dict[str, Any] = {"kind": "classification", "seed": seed, "rows": len(texts), "labels": label_names,
                              "clean": {**_classification_figures(y, clean, k),
                                        "mean_confidence": float(clean_probs.max(axis=1).mean())},
                              "perturbations": []}
    for name, (new, changed) in _perturbed(texts, seed).items():
        probs = clean_probs.copy()
        if len(changed):
            probs[changed] = _probabilities(predictor, [new[i] for i in changed])
        pred = probs.argmax(axis=1)
        flipped = changed[pred[changed] != clean[changed]]
        row = {"name": name, "description": PERTURBATIONS[name].description, "changed": int(len(changed)),
               **_classification_figures(y, pred, k),
               "flips": int(len(flipped)), "flip_rate": float(len(flipped) / len(changed)) if len(changed) else None,
               "accuracy_changed": float(np.mean(pred[changed] == y[changed])) if len(changed) else None,
               "clean_accuracy_changed": float(np.mean(clean[changed] == y[changed])) if len(changed) else None,
               "mean_confidence": float(probs.max(axis=1).mean()),
               "examples": [{"clean": texts[i], "perturbed": new[i], "true": label_names[y[i]],
                             "clean_answer": label_names[clean[i]], "perturbed_answer": label_names[pred[i]]}
                            for i in flipped[:EXAMPLES_KEPT]]}
        row["accuracy_drop"] = report["clean"]["accuracy"] - row["accuracy"]
        report["perturbations"].append(row)
    report["ood"] = _ood(predictor, texts, clean_probs.max(axis=1), seed, ood_texts)
    return report


def _ood(predictor: Any, texts: list[str], confidence: np.ndarray, seed: int,
         ood_texts: Sequence[str] | None) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    if ood_texts is not None:
        given = [t for t in ood_texts if isinstance(t, str) and t.strip()]
        if not given:
            raise WorkbenchError("the out-of-domain file has no texts: give a file with one text per line or a "
                                 "text column")
        sets, notes, source = {"given": given}, [], "given"
    else:
        sets, notes = builtin_ood(texts, seed)
        source = "built-in"
    in_domain = float(confidence.mean())
    out = {"source": source, "in_domain_confidence": in_domain, "notes": notes, "sets": []}
    for name, ood in sets.items():
        ood_conf = _probabilities(predictor, list(ood)).max(axis=1)
        # in-domain as the positive class: 1.0 when every out-of-domain text is answered less confidently
        auroc = roc_auc_score(np.r_[np.ones(len(confidence)), np.zeros(len(ood_conf))], np.r_[confidence, ood_conf])
        out["sets"].append({"name": name, "rows": len(ood), "mean_confidence": float(ood_conf.mean()),
                            "shift": float(ood_conf.mean() - in_domain), "auroc": float(auroc),
                            "examples": list(ood[:EXAMPLES_KEPT])})
    return out


def _regression_report(predictor: Any, texts: list[str], y: np.ndarray, seed: int) -> dict[str, Any]:
    clean = _values(predictor, texts)

    def rmse(pred: np.ndarray) -> float:
        return float(np.sqrt(np.mean((pred - y) ** 2)))

    report: dict[str, Any] = {"kind": "regression", "seed": seed, "rows": len(texts), "clean": {"rmse": rmse(clean)},
                              "perturbations": [], "ood": None}
    for name, (new, changed) in _perturbed(texts, seed).items():
        pred = clean.copy()
        if len(changed):
            pred[changed] = _values(predictor, [new[i] for i in changed])
        change = np.abs(pred[changed] - clean[changed])
        worst = changed[np.argsort(-change)[:EXAMPLES_KEPT]] if len(changed) else changed
        report["perturbations"].append({
            "name": name, "description": PERTURBATIONS[name].description, "changed": int(len(changed)),
            "rmse": rmse(pred), "rmse_increase": rmse(pred) - report["clean"]["rmse"],
            "mean_abs_change": float(change.mean()) if len(changed) else None,
            "examples": [{"clean": texts[i], "perturbed": new[i], "true": float(y[i]), "clean_answer": float(clean[i]),
                          "perturbed_answer": float(pred[i])} for i in worst]})
    return report


def robustness_report(predictor: Any, texts: Sequence[str], labels_true: Sequence[Any],
                      label_names: Sequence[str] | None, seed: int = 0,
                      ood_texts: Sequence[str] | None = None) -> dict[str, Any]:
    """How `predictor` (anything with `.predict(texts)`, and `.probabilities(texts)` or `.labels`) answers
    `texts` clean and under each perturbation of `PERTURBATIONS`. Classification (`label_names` given,
    `labels_true` as names or indices): accuracy, macro-F1, flip rate among the changed texts, mean confidence,
    and the out-of-domain confidence shift. Regression (`label_names` None, `labels_true` numbers): RMSE and
    the mean absolute change of the changed texts' values. Examples are returned as they are: mask them before
    writing."""
    texts = list(texts)
    if not texts or len(texts) != len(labels_true):
        raise WorkbenchError(f"robustness needs texts and one true label per text, got {len(texts)} texts and "
                             f"{len(labels_true)} labels: pass the rows of a labelled file")
    if label_names is None:
        return _regression_report(predictor, texts, np.asarray(labels_true, dtype=np.float64), seed)
    names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    try:
        y = np.asarray([v if isinstance(v, (int, np.integer)) else index[v] for v in labels_true])
    except KeyError as exc:
        raise WorkbenchError(f"true label {exc.args[0]!r} is not among the run's labels ({', '.join(names)}): drop "
                             "those rows or evaluate a run trained on them") from None
    return _classification_report(predictor, texts, y, names, seed, ood_texts)
