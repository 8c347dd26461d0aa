"""The classifier's per-record logic, without Kafka: parse one raw ``texts.in``
message, and route one prediction (top-k, confidence, needs the teacher or not).

The stream agent (:mod:`streams.classify`) only decodes, calls these and sends.
A rejected input becomes a dead letter whose ``reason`` is one of
:data:`REJECT_REASONS`: a small fixed set, so it can be a metric label.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pgkd.data import utf8_encodable
# Why an input was rejected (dead-letter reason, stage "parse"). Pinned by tests;
# dashboards and alerts group by these names, so do not rename them.
REJECT_REASONS = (
    "empty_message",  # no value at all (a tombstone)
    "not_utf8",  # the bytes are not UTF-8
    "malformed_json",  # not JSON
    "not_object",  # JSON, but not an object
    "missing_id",
    "bad_id",  # id not a string, empty, or longer than max_id_chars
    "missing_text",
    "bad_text",  # text not a string
    "empty_text",  # text empty or only whitespace
    "text_too_long",  # more than max_text_chars characters
)

# What our outputs can encode bounds what an input may hold: outputs carry ``extra``
# on inside another record, and Faust encodes records with orjson (at most 255
# levels, integers of 64 bits) or, without it, with the stdlib encoder, whose
# recursion CPython 3.11 counts against the same limit as the worker's Python
# frames. An input past these would parse here and fail to encode there.
MAX_JSON_DEPTH = 64
INT_RANGE = (-(2**63), 2**64 - 1)  # orjson's: a larger int raises "Integer exceeds 64-bit range"


@dataclass(frozen=True)
class TextIn:
    """A valid input: its id, its text and every other field, carried through untouched."""

    id: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejected:
    """An invalid input: a reason from :data:`REJECT_REASONS` and a one-line detail."""

    reason: str
    detail: str
    id: str | None = None  # the id, when the record had a usable one


def parse_input(raw: bytes | None, max_text_chars: int, max_id_chars: int = 256) -> TextIn | Rejected:
    """One ``texts.in`` value -> :class:`TextIn`, or :class:`Rejected` with the reason.

    >>> parse_input(b'{"id": "a1", "text": "my card is lost", "lang": "en"}', 100)
    TextIn(id='a1', text='my card is lost', extra={'lang': 'en'})
    >>> parse_input(b'{"id": "a1"}', 100).reason
    'missing_text'
    >>> parse_input(b'\\xff\\xfe', 100).reason
    'not_utf8'
    """
    if raw is None or len(raw) == 0:
        return Rejected("empty_message", "the message has no value")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejected("not_utf8", f"value is not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})")
    try:
        obj = load_json(decoded)
    except ValueError as err:
        return Rejected("malformed_json", f"value is not JSON: {err}")
    if not isinstance(obj, dict):
        return Rejected("not_object", f"expected a JSON object with id and text, got {type(obj).__name__}")
    if "\\u" in decoded and not utf8_encodable(json.dumps(obj, ensure_ascii=False)):
        # "\\ud800"-style escapes decode to lone surrogates: no tokenizer or UTF-8 consumer can take them.
        # Checked before any field is read, so a rejected record never carries such an id as its key.
        return Rejected("not_utf8", "the JSON holds a lone surrogate escape (\\ud800-\\udfff)")
    ident = obj.get("id")
    if "id" not in obj:
        return Rejected("missing_id", 'the object has no "id"')
    if not isinstance(ident, str) or not ident or len(ident) > max_id_chars:
        shown = type(ident).__name__ if not isinstance(ident, str) else f"{len(ident)} characters"
        return Rejected("bad_id", f'"id" must be a non-empty string of at most {max_id_chars} characters, got {shown}')
    if "text" not in obj:
        return Rejected("missing_text", 'the object has no "text"', ident)
    text = obj["text"]
    if not isinstance(text, str):
        return Rejected("bad_text", f'"text" must be a string, got {type(text).__name__}', ident)
    if not text.strip():
        return Rejected("empty_text", '"text" is empty', ident)
    if len(text) > max_text_chars:
        return Rejected("text_too_long", f'"text" has {len(text)} characters, the limit is {max_text_chars}', ident)
    extra = {k: v for k, v in obj.items() if k not in ("id", "text")}
    return TextIn(ident, text, extra)


def load_json(raw: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON: only what our own outputs can carry on as valid JSON.

    Raises ValueError (one line) for text that is not JSON, for ``NaN`` and
    ``Infinity``, for numbers that overflow a float (``1e999`` would become
    ``inf``), for integers outside :data:`INT_RANGE`, and for nesting deeper
    than ``max_depth`` levels.

    >>> load_json('{"a": [1, 2.5]}')
    {'a': [1, 2.5]}
    >>> load_json('[1e999]')
    Traceback (most recent call last):
    ...
    ValueError: number 1e999 is out of range
    >>> load_json('[[[]]]', max_depth=2)
    Traceback (most recent call last):
    ...
    ValueError: nested deeper than 2 levels
    """
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if _deeper_than(value, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def _no_constant(name: str) -> Any:
    # NaN/Infinity are not JSON; carried in ``extra`` they would make our outputs invalid JSON too.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)  # more than 4300 digits: ValueError from int() itself
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise ValueError(f"number {text[:32]}{'...' if len(text) > 32 else ''} is out of range")
    return value


def _deeper_than(value: Any, max_depth: int) -> bool:
    # Iterative: the point is to measure nesting without recursing into it.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False



@dataclass(frozen=True)
class Routing:
    """Thresholds that send a prediction to the teacher. A threshold of 0 is off."""

    low_conf_threshold: float = 0.5  # max probability below this -> teacher
    margin_threshold: float = 0.0  # top1 - top2 below this -> teacher
    top_k: int = 3

    @classmethod
    def from_settings(cls, settings: Any) -> Routing:
        return cls(settings.low_conf_threshold, settings.margin_threshold, settings.top_k)


@dataclass(frozen=True)
class Routed:
    """The student's answer for one text."""

    label: str
    confidence: float
    top_k: list[tuple[str, float]]  # best first
    needs_review: bool  # low confidence: the teacher should look at it


def route(probs: np.ndarray, labels: Sequence[str], routing: Routing) -> Routed:
    """One row of probabilities -> label, confidence, top-k and whether the teacher
    should review it (max probability below ``low_conf_threshold`` or top-1/top-2
    margin below ``margin_threshold``). Ties go to the lower label index, as argmax.

    >>> route(np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], Routing(0.5, 0.0, 2))
    Routed(label='b', confidence=0.6, top_k=[('b', 0.6), ('c', 0.3)], needs_review=False)
    >>> route(np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], Routing(0.5, 0.4, 2)).needs_review
    True
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or len(p) != len(labels):
        raise ValueError(f"expected one probability per label ({len(labels)}), got shape {p.shape}")
    # A stable sort on -p keeps equal probabilities in label order, so the top-1
    # is exactly np.argmax (what Student.predict returns).
    order = np.argsort(-p, kind="stable")
    top1 = float(p[order[0]])
    top2 = float(p[order[1]]) if len(order) > 1 else 0.0
    needs_review = top1 < routing.low_conf_threshold or (top1 - top2) < routing.margin_threshold
    k = min(routing.top_k, len(labels))
    top_k = [(labels[i], round(float(p[i]), 6)) for i in order[:k]]
    return Routed(labels[order[0]], round(top1, 6), top_k, bool(needs_review))
