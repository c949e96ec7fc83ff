"""Masking personal data in what the workbench stores or shows about texts.

`mask_text("write to ann@example.org or +1 415 555 0100")` -> "write to [EMAIL] or [PHONE]". What is found:

- e-mail addresses, by pattern;
- IP addresses (v4, v6) by pattern, checked by the standard library's `ipaddress`; loopback and unspecified
  addresses (127.0.0.1, ::1, 0.0.0.0) name no one and are kept, as is a dotted number after "v" or "version";
- phone numbers by Google's libphonenumber (`phonenumbers`, lenient matching: any region when a number is
  written with its country code, else national formats of `region`, US by default). A candidate without a
  country code is dropped when it reads as something else: a fraction or season ("12000/24000", "2005/06"),
  sports scores (mostly one-digit groups: "6-1 3-1 0-30"), or a bare digit run that is no valid number
  (a count "1234567", a timestamp "1733243491");
- payment card numbers: 13-19 digits (in one run, or in the groups cards are printed in, 4-4-4-4 or 4-6-5,
  spaces or hyphens between) that start as issuers' numbers do and pass the Luhn checksum; a digit run glued
  to a word or a path (a run id, a file name) is none;
- names, only when a recogniser is given: `names=` takes any callable from a text to (start, end) character
  spans. `names_from_predictor(load_predictor(run))` makes one of a token-classification run (its PER /
  PERSON entities); the workbench ships no such model, so names are masked only where a run is named.

Years, ratings ("3.5/10"), prices, counts and dates are not masked (tests/test_privacy.py pins them).

`mask_value` walks JSON-like values (dicts, lists, strings) and masks every string: what a run writes about
its data goes through it before it reaches a file. `MaskingFilter` masks log records (messages, arguments
and tracebacks) on the handlers it is added to (`mask_logging`).

A text with no digit skips every number search, and libphonenumber reads only the runs of digits and
separators long enough to be a phone number, not a whole article.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any, Callable, Iterable

__all__ = ["MASK_MODES", "PLACEHOLDERS", "MaskingFilter", "count_personal", "find_personal", "mask_logging",
           "mask_text", "mask_tokens", "mask_value", "names_from_predictor", "stored_text"]

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "ip": "[IP]", "name": "[NAME]"}
MASK_MODES = ("stored", "all", "off")  # data.mask_personal: what is masked (see config.DataConfig)
NAME_TYPES = ("PER", "PERSON")  # entity types a recogniser's predictor gives to people

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_VERSION = re.compile(r"(?:\bv|\bversion\s?)$", re.IGNORECASE)
_IN_NUMBER_BEFORE = re.compile(r"(?:\d\.|[eE][+\-])$")  # the candidate continues a decimal or an exponent
_IN_NUMBER_AFTER = re.compile(r"[.,]\d")
# 1234.5, 12.99, 1337.6167 (a perplexity): one point makes a decimal, not a phone group (415.555.0100 has two)
_DECIMAL = re.compile(r"^\(?\d+\.\d+\)?[.,;:]?$")
# a card number as people write it: 13-19 digits in one run, or the issuers' groups (4-4-4-4, 4-4-4-4-3,
# Amex 4-6-5, Diners 4-6-4) split by spaces or hyphens; not glued to a word, a path or another number: a run
# id or a date-time (20261203-172049-4bce) is none
_CARD = re.compile(r"(?<![\w\-/.])(?:\d{13,19}|\d{4}([ \-])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ \-])\d{6}\2\d{4,5})"
                   r"(?![\w\-/]|\.\d)")
_DIGIT = re.compile(r"\d")
_PHONE_RUN = re.compile(r"[+(]?\d[\d \t().\-/]{5,}\d\)?")  # where a phone number may be written
_DEFAULT_REGION = "US"

Span = tuple[int, int, str]
NameFinder = Callable[[str], Iterable[tuple[int, int]]]


def _luhn(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ips(text: str) -> Iterable[Span]:
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            try:
                address = ipaddress.ip_address(m.group())
            except ValueError:
                continue
            if address.is_loopback or address.is_unspecified or not any(ch.isdigit() for ch in m.group()):
                continue
            if pattern is _IPV4 and _VERSION.search(text[max(0, m.start() - 8): m.start()]):
                continue
            yield m.start(), m.end(), "ip"


def _issued_prefix(digits: str) -> bool:
    """Whether a number starts as payment cards do: 3 (Amex, JCB, Diners), 4 (Visa), 5 (Mastercard, Maestro),
    6 (Discover, UnionPay, Maestro), or 2221-2720 (Mastercard)."""
    return digits[0] in "3456" or (digits[0] == "2" and 2221 <= int(digits[:4]) <= 2720)


def _cards(text: str) -> Iterable[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _issued_prefix(digits) and _luhn(digits):
            yield m.start(), m.end(), "card"


def _reads_as_phone(text: str, match: Any) -> bool:
    """Whether a libphonenumber candidate is a phone number rather than part of a decimal or scientific
    number ("5.00e-04 1234.5"), or, written without a country code, a fraction, a season, sports scores or
    a bare count."""
    import phonenumbers

    raw, before, after = match.raw_string, text[max(0, match.start - 2): match.start], text[match.end: match.end + 2]
    if _IN_NUMBER_BEFORE.search(before) or _IN_NUMBER_AFTER.match(after):
        return False
    if raw.lstrip("( ").startswith("+"):
        return True
    if "/" in raw or any(_DECIMAL.match(piece) for piece in raw.split()):
        return False
    groups = re.findall(r"\d+", raw)
    if 2 * sum(len(g) == 1 for g in groups) >= len(groups):
        return False
    return len(groups) > 1 or phonenumbers.is_valid_number(match.number)


def _phones(text: str, region: str) -> Iterable[Span]:
    """libphonenumber's matches, looked for in each run of digits and separators long enough to be a number
    (with two characters of context either side): a long text is not scanned whole (3x faster on news)."""
    import phonenumbers

    for run in _PHONE_RUN.finditer(text):
        if len(_DIGIT.findall(run.group())) < 7:
            continue
        first, last = max(0, run.start() - 2), min(len(text), run.end() + 2)
        window = text[first:last]
        for match in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.POSSIBLE):
            if _reads_as_phone(window, match):
                yield first + match.start, first + match.end, "phone"


def find_personal(text: str, region: str = _DEFAULT_REGION, names: NameFinder | None = None) -> list[Span]:
    """The (start, end, kind) character spans of personal data in `text`, left to right, none overlapping
    (the earlier, then the longer span wins). `names` finds names (see `names_from_predictor`)."""
    spans: list[Span] = [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)] if "@" in text else []
    digits = len(_DIGIT.findall(text)) if _DIGIT.search(text) else 0  # most texts have none: no number to find
    if digits:
        spans += list(_ips(text))
    if digits >= 13:
        spans += list(_cards(text))
    if digits >= 7:  # no phone number is shorter
        spans += list(_phones(text, region))
    if names is not None:
        spans += [(int(s), int(e), "name") for s, e in names(text)]
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    kept: list[Span] = []
    for span in spans:
        if kept and span[0] < kept[-1][1]:
            continue
        kept.append(span)
    return kept


def mask_text(text: str, region: str = _DEFAULT_REGION, names: NameFinder | None = None) -> str:
    """`text` with each piece of personal data replaced by its placeholder ([EMAIL], [PHONE], [CARD], [IP],
    [NAME]); anything that is not a non-empty string is returned as it is."""
    if not isinstance(text, str) or not text:
        return text
    out, at = [], 0
    for start, end, kind in find_personal(text, region, names):
        out.append(text[at:start])
        out.append(PLACEHOLDERS[kind])
        at = end
    out.append(text[at:])
    return "".join(out)


def count_personal(texts: Iterable[str], region: str = _DEFAULT_REGION,
                   names: NameFinder | None = None) -> tuple[list[str], dict[str, int]]:
    """The texts masked, and how many items of each kind were masked in them ({} when none)."""
    masked, counts = [], {}
    for text in texts:
        spans = find_personal(text, region, names) if isinstance(text, str) and text else []
        for *_, kind in spans:
            counts[kind] = counts.get(kind, 0) + 1
        masked.append(mask_text(text, region, names) if spans else text)
    return masked, counts


def mask_tokens(tokens: list[str], text: str | None = None, offsets: list[tuple[int, int]] | None = None,
                region: str = _DEFAULT_REGION) -> list[str]:
    """A sentence's tokens with every token that overlaps personal data replaced by its placeholder: the
    token count stays the same (a tag per token still lines up). The tokens are read as one text, so a phone
    number split over several tokens is found: `text` and each token's (start, end) `offsets` in it when
    given (entities.sentence_text glues punctuation), else the tokens joined by spaces."""
    if text is None or offsets is None:
        offsets, at = [], 0
        for token in tokens:
            offsets.append((at, at + len(token)))
            at += len(token) + 1
        text = " ".join(tokens)
    spans = find_personal(text, region)
    if not spans:
        return list(tokens)
    out = list(tokens)
    for i, (start, end) in enumerate(offsets):
        kind = next((k for s, e, k in spans if s < end and start < e), None)
        if kind is not None:
            out[i] = PLACEHOLDERS[kind]
    return out


def mask_value(value: Any, region: str = _DEFAULT_REGION, keep: tuple[str, ...] = ()) -> Any:
    """A copy of a JSON-like value with every string masked (dict keys included); numbers, booleans and None
    are kept, and so are the values under the dict keys named in `keep` (file paths a reader opens)."""
    if isinstance(value, str):
        return mask_text(value, region)
    if isinstance(value, dict):
        return {mask_value(k, region) if isinstance(k, str) else k: v if k in keep else mask_value(v, region, keep)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_value(v, region, keep) for v in value]
    return value


def stored_text(text: str, mode: str = "stored") -> str:
    """A data text as the run stores or shows it under `data.mask_personal` = `mode`: masked unless "off"."""
    return text if mode == "off" else mask_text(text)


def names_from_predictor(predictor: Any, types: tuple[str, ...] = NAME_TYPES) -> NameFinder:
    """A name finder for `mask_text(..., names=...)` from a token-classification predictor (what
    `workbench.predict.load_predictor` gives for a named-entity run): the character spans of its entities
    of the given types (people: PER, PERSON)."""
    wanted = {t.upper() for t in types}

    def names(text: str) -> list[tuple[int, int]]:
        answer = predictor.predict([text])[0]
        return [(e["start"], e["end"]) for e in answer["entities"] if str(e["type"]).upper() in wanted]

    return names


class MaskingFilter(logging.Filter):
    """A logging filter that masks each record's message (its arguments merged in) and its traceback text.

    Added to a handler it masks everything that handler writes, from every logger that reaches it."""

    def __init__(self, region: str = _DEFAULT_REGION) -> None:
        super().__init__()
        self.region = region

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = mask_text(record.getMessage(), self.region), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text, self.region)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info, self.region)
        return True


def mask_logging(*loggers: str) -> None:
    """Add a MaskingFilter to every handler of the root logger and of the loggers named (once each)."""
    for name in ("", *loggers):
        for handler in logging.getLogger(name or None).handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(MaskingFilter())
