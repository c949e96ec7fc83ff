"""Masking personal data in what the workbench stores or shows about texts.

`mask_text("write to ann@example.org or +1 415 555 0100")` -> "write to [EMAIL] or [PHONE]". What is found:
e-mail addresses and IP addresses (v4, v6) by pattern, checked by the standard library's `ipaddress`;
phone numbers by Google's libphonenumber (`phonenumbers`, lenient matching, any region when a number is
written with its country code, else the `region` given); payment card numbers by pattern and the Luhn
checksum. Names are masked when a recogniser is given (`mask_text(..., names=callable)` returning character
spans), e.g. a named-entity run's predictor.

`mask_value` walks JSON-like values (dicts, lists, strings) and masks every string: what a run writes about its
data goes through it before it reaches a file.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable, Iterable

__all__ = ["PLACEHOLDERS", "find_personal", "mask_text", "mask_value", "stored_text"]

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "ip": "[IP]", "name": "[NAME]"}

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_CARD = re.compile(r"(?<!\d)(?:\d[ \-]?){12,18}\d(?!\d)")
_DEFAULT_REGION = "US"

Span = tuple[int, int, str]


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
                ipaddress.ip_address(m.group())
            except ValueError:
                continue
            yield m.start(), m.end(), "ip"


def _cards(text: str) -> Iterable[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _luhn(digits):
            yield m.start(), m.end(), "card"


def _phones(text: str, region: str) -> Iterable[Span]:
    import phonenumbers

    if not any(ch.isdigit() for ch in text):
        return
    leniency = phonenumbers.Leniency.POSSIBLE
    for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=leniency):
        yield match.start, match.end, "phone"


def find_personal(text: str, region: str = _DEFAULT_REGION,
                  names: Callable[[str], Iterable[tuple[int, int]]] | None = None) -> list[Span]:
    """The (start, end, kind) character spans of personal data in `text`, left to right, none overlapping
    (the earlier, then the longer span wins)."""
    spans: list[Span] = [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
    spans += list(_ips(text))
    spans += list(_cards(text))
    spans += list(_phones(text, region))
    if names is not None:
        spans += [(s, e, "name") for s, e in names(text)]
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    kept: list[Span] = []
    for span in spans:
        if kept and span[0] < kept[-1][1]:
            continue
        kept.append(span)
    return kept


def mask_text(text: str, region: str = _DEFAULT_REGION,
              names: Callable[[str], Iterable[tuple[int, int]]] | None = None) -> str:
    """`text` with each piece of personal data replaced by its placeholder ([EMAIL], [PHONE], [CARD], [IP],
    [NAME])."""
    if not isinstance(text, str) or not text:
        return text
    out, at = [], 0
    for start, end, kind in find_personal(text, region, names):
        out.append(text[at:start])
        out.append(PLACEHOLDERS[kind])
        at = end
    out.append(text[at:])
    return "".join(out)


def mask_value(value: Any, region: str = _DEFAULT_REGION) -> Any:
    """A copy of a JSON-like value with every string masked (dict keys included)."""
    if isinstance(value, str):
        return mask_text(value, region)
    if isinstance(value, dict):
        return {mask_value(k, region) if isinstance(k, str) else k: mask_value(v, region) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_value(v, region) for v in value]
    return value


def stored_text(text: str, mode: str = "stored") -> str:
    """A data text as the run stores or shows it under `data.mask_personal` = `mode`: masked unless "off"."""
    return text if mode == "off" else mask_text(text)
