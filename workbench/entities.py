"""Named-entity data: sentences as tokens with a tag each, read, checked and scored.

- Files: CoNLL (one token per line, then whitespace or a tab, then its tag, extra columns between them
  ignored, a blank line between sentences, `-DOCSTART-` lines skipped), and JSON Lines or Parquet
  ({"tokens": [...], "tags": [...]}; `tokens` may be one string of Chinese characters, a tag each).
- Schemes: IOB2 (also called BIO) and BIOES (IOBES). BILOU is read as BIOES (L = E, U = S); an I- tag that
  begins an entity (IOB1, or a slip in an IOB2 file) is read as B-, and the reader says how many it changed.
- Text: a sentence reads as its tokens joined by single spaces, except that tokens of CJK characters (and
  punctuation next to them, and full-width punctuation on both sides) are joined with no space, so Chinese
  reads as written. Character offsets of
  entities refer to that text; a raw string is split into words by whitespace (punctuation at a word's
  edges is a word of its own) and CJK characters one word each.
- Figures: seqeval's entity-level precision, recall and F1 (an entity counts when its type and both ends
  match), micro over entities and per type, token accuracy, and a confusion over entity types.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import WorkbenchError

SCHEMES = ("IOB2", "BIOES")
PREFIXES = {"IOB2": ("B", "I"), "BIOES": ("B", "I", "E", "S")}
OUTSIDE = "O"
MISSED = "O"  # the confusion's last row and column: no entity there
TAG = re.compile(r"^([BIESLU])-(\S.*)$")
TOKEN_KEYS = ("tokens", "words")
TAG_KEYS = ("tags", "ner_tags", "labels", "ner")
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
MAX_FILE_BYTES = 512 * 1024 * 1024
_CJK = ("\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f")
WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


@dataclass
class Sentence:
    """One sentence: its tokens, a tag per token, and where it starts (`file:line`) for messages."""

    tokens: list[str]
    tags: list[str]
    where: str = ""


@dataclass
class NerFile:
    """The sentences of a file, their scheme, and what reading them changed."""

    sentences: list[Sentence]
    scheme: str
    notes: list[str] = field(default_factory=list)


# --- reading -----------------------------------------------------------------------------------------------

def read_sentences(source: str | Path, tokens_column: str | None = None,
                   tags_column: str | None = None) -> NerFile:
    """Every sentence of a CoNLL, JSON Lines or Parquet file, its tags checked and in one scheme."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise WorkbenchError(f"data file {str(source)!r} not found: give a CoNLL file (token and tag per line) or "
                             "a JSONL file of {\"tokens\": [...], \"tags\": [...]}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise WorkbenchError(f"data file {str(source)!r} is over {MAX_FILE_BYTES >> 20} MB: split it")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        sentences = _parquet_sentences(path, tokens_column, tags_column)
    elif suffix in TABLE_SUFFIXES:
        sentences = _jsonl_sentences(path, _decoded(path), tokens_column, tags_column)
    else:
        sentences = conll_sentences(_decoded(path), str(source))
    if not sentences:
        raise WorkbenchError(f"data file {str(source)!r} holds no sentence: put one token and its tag on each "
                             "line, a blank line between sentences")
    return normalise(sentences)


def _decoded(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(raw[:1_000_000]).best()
        return raw.decode(best.encoding if best is not None else "latin-1", errors="replace")


def conll_sentences(text: str, name: str = "<text>") -> list[Sentence]:
    """Sentences of CoNLL text: a token and a tag per line (the token first, the tag last), blank lines
    between sentences."""
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if tokens:
                sentences.append(Sentence(tokens, tags, f"{name}:{start}"))
            tokens, tags = [], []
            continue
        parts = line.rstrip().split("\t") if "\t" in line else line.split()
        parts = [p.strip() for p in parts]
        if len(parts) < 2 or not parts[0] or not parts[-1]:
            raise WorkbenchError(f"{name}:{number}: expected a token and its tag separated by a tab or a space, "
                                 f"found {line[:60]!r}: put one token and its tag on each line, a blank line "
                                 "between sentences")
        check_tag(parts[-1], f"{name}:{number}")
        if not tokens:
            start = number
        tokens.append(parts[0])
        tags.append(parts[-1])
    if tokens:
        sentences.append(Sentence(tokens, tags, f"{name}:{start}"))
    return sentences


def _jsonl_sentences(path: Path, text: str, tokens_column: str | None, tags_column: str | None) -> list[Sentence]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array of records
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        numbered = [(i + 1, r) for i, r in enumerate(records)]
        unit = "record"
    else:
        numbered, unit = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"{path}:{number}: not valid JSON ({exc.msg}): one object per line, "
                                     "{\"tokens\": [...], \"tags\": [...]}") from None
    return [record_sentence(r, f"{path}:{number}" if unit == "line" else f"{path} record {number}",
                            tokens_column, tags_column) for number, r in numbered]


def _parquet_sentences(path: Path, tokens_column: str | None, tags_column: str | None) -> list[Sentence]:
    import pandas as pd

    df = pd.read_parquet(path)
    return [record_sentence({k: _plain(v) for k, v in row.items()}, f"{path} row {i + 1}", tokens_column,
                            tags_column) for i, row in enumerate(df.to_dict("records"))]


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _key(record: dict[str, Any], wanted: str | None, names: tuple[str, ...], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in record:
            raise WorkbenchError(f"{where}: no {wanted!r} field (found {', '.join(map(str, record)) or 'none'}): "
                                 f"set data.{'text' if what == 'tokens' else 'label'}_column to the {what} field")
        return wanted
    found = next((n for n in names if n in record), None)
    if found is None:
        raise WorkbenchError(f"{where}: no {what} field among {', '.join(map(str, record)) or 'none'}: name it "
                             f"{names[0]!r} or set data.{'text' if what == 'tokens' else 'label'}_column")
    return found


def record_sentence(record: Any, where: str, tokens_column: str | None = None,
                    tags_column: str | None = None) -> Sentence:
    """One {"tokens": [...], "tags": [...]} record as a sentence; `tokens` may be a string of characters
    (Chinese: one tag per character) or of words separated by spaces."""
    if not isinstance(record, dict):
        raise WorkbenchError(f"{where}: expected an object {{\"tokens\": [...], \"tags\": [...]}}, found "
                             f"{type(record).__name__}")
    tokens = record[_key(record, tokens_column, TOKEN_KEYS, "tokens", where)]
    tags = record[_key(record, tags_column, TAG_KEYS, "tags", where)]
    if isinstance(tags, str):
        tags = tags.split()
    if isinstance(tokens, str):
        tokens = list(tokens) if len(tokens) == len(tags) and " " not in tokens else tokens.split()
    if not isinstance(tokens, list) or not isinstance(tags, list):
        raise WorkbenchError(f"{where}: tokens and tags must be lists of strings")
    if any(isinstance(t, (int, float)) for t in tags):
        raise WorkbenchError(f"{where}: tags are numbers ({tags[:3]}): give tag names (O, B-PER, I-PER), not ids")
    tokens, tags = [str(t) for t in tokens], [str(t).strip() for t in tags]
    check_sentence(tokens, tags, where)
    return Sentence(tokens, tags, where)


def check_sentence(tokens: list[str], tags: list[str], where: str) -> None:
    """Refuse an empty sentence, a blank token, a tag count that differs from the token count, a bad tag."""
    if not tokens:
        raise WorkbenchError(f"{where}: the sentence has no tokens: drop it or give its tokens and tags")
    if len(tokens) != len(tags):
        raise WorkbenchError(f"{where}: {len(tokens)} tokens but {len(tags)} tags: give one tag per token")
    blank = next((i for i, t in enumerate(tokens) if not t.strip()), None)
    if blank is not None:
        raise WorkbenchError(f"{where}: token {blank + 1} is blank: drop it (and its tag) or give its text")
    for tag in tags:
        check_tag(tag, where)


def check_tag(tag: str, where: str) -> None:
    if tag != OUTSIDE and not TAG.match(tag):
        raise WorkbenchError(f"{where}: tag {tag!r} is not in a known scheme: use O, B-TYPE and I-TYPE (BIO / IOB2), "
                             "or add E-TYPE and S-TYPE (BIOES)")


# --- schemes -----------------------------------------------------------------------------------------------

def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER"; ("O", "") for "O"."""
    match = TAG.match(tag)
    return (match.group(1), match.group(2)) if match else (OUTSIDE, "")


def detect_scheme(tag_lists: list[list[str]]) -> str:
    """BIOES when any tag is E-, S-, L- or U-; else IOB2."""
    prefixes = {split_tag(t)[0] for tags in tag_lists for t in tags}
    return "BIOES" if prefixes & {"E", "S", "L", "U"} else "IOB2"


def normalise(sentences: list[Sentence]) -> NerFile:
    """The sentences in IOB2 or BIOES: BILOU renamed to BIOES, an I- that begins an entity read as B- (IOB2)."""
    scheme, notes = detect_scheme([s.tags for s in sentences]), []
    if scheme == "BIOES":
        renamed = sum(t[:1] in ("L", "U") and t[1:2] == "-" for s in sentences for t in s.tags)
        if renamed:
            for s in sentences:
                s.tags = [{"L": "E", "U": "S"}.get(t[:1], t[:1]) + t[1:] if t[1:2] == "-" else t for t in s.tags]
            notes.append(f"read {renamed} BILOU tags (L-, U-) as BIOES (E-, S-)")
        return NerFile(sentences, scheme, notes)
    began = 0
    for s in sentences:
        fixed = begin_with_b(s.tags)
        began += sum(a != b for a, b in zip(fixed, s.tags))
        s.tags = fixed
    if began:
        notes.append(f"{began} entities began with an I- tag (IOB1): read as B-")
    return NerFile(sentences, scheme, notes)


def begin_with_b(tags: list[str]) -> list[str]:
    """IOB2 tags: an I-X that does not follow B-X or I-X becomes B-X."""
    out, previous = [], ""
    for tag in tags:
        prefix, kind = split_tag(tag)
        if prefix == "I" and previous != kind:
            tag = f"B-{kind}"
        out.append(tag)
        previous = kind if prefix in ("B", "I") else ""
    return out


def convert(tags: list[str], scheme: str) -> list[str]:
    """The same entities in `scheme` (IOB2 or BIOES; BIO and IOBES are their other names)."""
    scheme = {"BIO": "IOB2", "IOBES": "BIOES"}.get(scheme.upper(), scheme.upper())
    if scheme not in SCHEMES:
        raise WorkbenchError(f"scheme {scheme!r} is unknown: choose IOB2 (BIO) or BIOES (IOBES)")
    out = [OUTSIDE] * len(tags)
    for kind, first, last in entity_tuples(tags):
        if scheme == "BIOES" and first == last:
            out[first] = f"S-{kind}"
            continue
        out[first] = f"B-{kind}"
        for i in range(first + 1, last + 1):
            out[i] = f"I-{kind}"
        if scheme == "BIOES":
            out[last] = f"E-{kind}"
    return out


def tag_set(types: list[str], scheme: str) -> list[str]:
    """Every tag of `types` in `scheme`: O first, then each type's prefixes (the head's outputs)."""
    return [OUTSIDE] + [f"{p}-{kind}" for kind in sorted(types) for p in PREFIXES[scheme]]


def types_of(tags: list[str]) -> list[str]:
    """The entity types among tags, sorted."""
    return sorted({split_tag(t)[1] for t in tags if t != OUTSIDE})


def entity_tuples(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first token, last token) of each entity, as seqeval reads them (default mode)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [(kind, first, last) for kind, first, last in get_entities(list(tags))]


# --- text and character offsets ------------------------------------------------------------------------------

def is_cjk(token: str) -> bool:
    """A token of CJK characters only (Chinese, Japanese kana): written with no spaces around it."""
    return bool(token) and all(re.match(f"[{_CJK}]", c) for c in token)


def is_punctuation(token: str) -> bool:
    return bool(token) and all(unicodedata.category(c).startswith("P") for c in token)


def is_wide_punctuation(token: str) -> bool:
    """CJK or full-width punctuation (，。、！？「」): written with no space on either side."""
    return is_punctuation(token) and all("\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" for c in token)


def glued(previous: str, token: str) -> bool:
    """Whether two tokens are written with no space between them."""
    if is_wide_punctuation(previous) or is_wide_punctuation(token):
        return True
    return (is_cjk(previous) and (is_cjk(token) or is_punctuation(token))) or (
        is_cjk(token) and is_punctuation(previous))


def sentence_text(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The sentence as text, and each token's (start, end) character offsets in it."""
    parts: list[str] = []
    offsets: list[tuple[int, int]] = []
    position = 0
    for i, token in enumerate(tokens):
        if i and not glued(tokens[i - 1], token):
            parts.append(" ")
            position += 1
        offsets.append((position, position + len(token)))
        parts.append(token)
        position += len(token)
    return "".join(parts), offsets


def words_of(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """A raw string's words and their offsets: split at whitespace, each CJK character a word, and
    punctuation at a word's edges a word of its own ("Paris," -> "Paris", ","; "@user" and "U.S" stay)."""
    words: list[str] = []
    offsets: list[tuple[int, int]] = []
    for match in WORD.finditer(text):
        start, end = match.span()
        lead = start
        while lead < end - 1 and unicodedata.category(text[lead]).startswith("P") and text[lead] not in "@#":
            lead += 1
        trail = end
        while trail > lead + 1 and unicodedata.category(text[trail - 1]).startswith("P"):
            trail -= 1
        pieces = [(start + k, start + k + 1) for k in range(lead - start)] + [(lead, trail)] + [
            (k, k + 1) for k in range(trail, end)]
        for a, b in pieces:
            words.append(text[a:b])
            offsets.append((a, b))
    return words, offsets


def spans_of(tags: list[str], offsets: list[tuple[int, int]], text: str,
             scores: list[float] | None = None) -> list[dict[str, Any]]:
    """Each entity of `tags` as {"type", "start", "end", "text"} (character offsets into `text`), with its
    "score" (the mean of its tokens' tag probabilities) when `scores` are given."""
    spans = []
    for kind, first, last in entity_tuples(tags):
        start, end = offsets[first][0], offsets[last][1]
        span: dict[str, Any] = {"type": kind, "start": start, "end": end, "text": text[start:end]}
        if scores is not None:
            span["score"] = round(sum(scores[first: last + 1]) / (last - first + 1), 6)
        spans.append(span)
    return spans


def sentence_spans(tokens: list[str], tags: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """A sentence's text and its entities' spans."""
    text, offsets = sentence_text(tokens)
    return text, spans_of(tags, offsets, text)


# --- figures -------------------------------------------------------------------------------------------------

def entity_figures(gold: list[list[str]], predicted: list[list[str]],
                   types: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """seqeval's figures (default mode): micro entity F1, precision, recall, and token accuracy; the payload
    a viewer reads: per-type figures and the confusion over entity types (rows gold, columns predicted)."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    if not gold:
        raise WorkbenchError("no sentences to score: give sentences with tags")
    types = sorted(set(types) | {k for tags in gold + predicted for k, *_ in entity_tuples(tags)})
    metrics = {"f1": float(f1_score(gold, predicted, zero_division=0)),
               "precision": float(precision_score(gold, predicted, zero_division=0)),
               "recall": float(recall_score(gold, predicted, zero_division=0)),
               "accuracy": float(accuracy_score(gold, predicted))}
    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    zero = {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0}
    per_type = {kind: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                       "f1": float(r["f1-score"]), "support": int(r["support"])}
                for kind in types for r in [report.get(kind, zero)]}
    payload = {"labels": types, "per_type": per_type, "confusion_matrix": type_confusion(gold, predicted, types),
               "confusion_labels": [*types, MISSED]}
    return metrics, payload


def type_confusion(gold: list[list[str]], predicted: list[list[str]], types: list[str]) -> list[list[int]]:
    """Rows: gold entities by type; columns: the type of the predicted span with exactly its ends ("O": none
    there, a missed entity). The last row counts predicted spans that match no gold entity's ends."""
    index = {kind: i for i, kind in enumerate(types)}
    none = len(types)
    matrix = [[0] * (none + 1) for _ in range(none + 1)]
    for gold_tags, predicted_tags in zip(gold, predicted):
        truth = {(first, last): kind for kind, first, last in entity_tuples(gold_tags)}
        guess = {(first, last): kind for kind, first, last in entity_tuples(predicted_tags)}
        for ends, kind in truth.items():
            matrix[index[kind]][index[guess[ends]] if ends in guess else none] += 1
        for ends, kind in guess.items():
            if ends not in truth:
                matrix[none][index[kind]] += 1
    return matrix


def figures_lines(payload: dict[str, Any]) -> list[str]:
    """One console line per entity type: precision, recall, F1 and support."""
    per_type = payload.get("per_type") or {}
    width = max((len(k) for k in per_type), default=0)
    return [f"  {kind:<{width}}  precision {f['precision']:.3f}  recall {f['recall']:.3f}  f1 {f['f1']:.3f}  "
            f"support {f['support']}" for kind, f in per_type.items()]
