"""What a request body may hold before any of it reaches a tokenizer: JSON of bounded depth and number size,
and texts that every tokenizer can encode.

`parse_json` runs before FastAPI sees a body (app.py's route class); `text_problem` is the check the request
models (bodies.py) run on every text. A problem is a message naming the field and the fix; the server answers
it with 422.

Why these: a lone UTF-16 surrogate (`"\\ud800"`) is valid JSON and a valid Python `str`, but no UTF-8 encoder
takes it, so a fast tokenizer raises on it (a TypeError from `tokenizers`); a NUL byte cuts a text short in
C-based tokenizers (sentencepiece). JSON nested 100,000 deep raises RecursionError in `json.loads`, and an
integer of more than 4,300 digits raises ValueError (CPython's int-to-str limit): both were 500s.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # objects and lists inside each other; a chat request needs 4 (body, messages, message, parts)
MAX_INT_DIGITS = 32  # no field takes an integer this long; the parser refuses before converting it
SURROGATE = re.compile("[\ud800-\udfff]")
FORBIDDEN_CONTROL = re.compile("[\x00]")  # NUL: tabs, newlines and other controls are normal in pasted text


class InputError(ValueError):
    """A body or field the server refuses (422); the message names the field and what to send instead."""


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise InputError(f"the body holds an integer of {len(digits.lstrip('-'))} digits, more than "
                         f"{MAX_INT_DIGITS}: send numbers no field needs more than that for")
    return int(digits)


def _constant(name: str) -> Any:
    raise InputError(f"the body holds {name}, which is not JSON: send a finite number")


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The body as a JSON object: UTF-8, at most `max_depth` levels of nesting, integers of bounded length."""
    try:
        data = json.loads(raw, parse_int=_int, parse_constant=_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"the body is not valid JSON ({type(exc).__name__} at position "
                         f"{getattr(exc, 'pos', getattr(exc, 'start', 0))}): send a JSON object") from None
    except RecursionError:
        raise InputError(f"the body is nested deeper than {max_depth} levels: send a flat JSON object") from None
    if not isinstance(data, dict):
        raise InputError(f"the body is a JSON {type(data).__name__}: send a JSON object")
    if nesting_depth(data, max_depth) > max_depth:
        raise InputError(f"the body is nested deeper than {max_depth} levels: send a flat JSON object")
    return data


def nesting_depth(value: Any, limit: int) -> int:
    """How deep lists and objects go inside `value` (iterative: no recursion); stops counting past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def text_problem(text: str) -> str | None:
    """What keeps a tokenizer from taking `text` (to follow the field's name in a message), or None."""
    bad = SURROGATE.search(text)
    if bad:
        return (f"holds an unpaired UTF-16 surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}: it is "
                "not text any encoder accepts; send valid Unicode (UTF-8)")
    bad = FORBIDDEN_CONTROL.search(text)
    if bad:
        return f"holds a NUL character at character {bad.start()}: remove it (binary data is not text)"
    return None


def check_text(text: str, field: str) -> str:
    """`text` unchanged when every tokenizer can take it; else InputError naming `field` and the position."""
    problem = text_problem(text)
    if problem:
        raise InputError(f"{field} {problem}")
    return text
