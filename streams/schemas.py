
"""Message schemas of the topics the workers write (docs/TOPICS.md has examples).

``texts.in`` has no Record: producers write plain JSON that
:func:`pgkd.inference.parse_input` reads from the raw bytes, so undecodable
input reaches the dead-letter topic instead of failing inside Faust.

Records are plain JSON (``include_metadata=False``: no ``__faust`` field), so
any Kafka client can read them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, Optional, TypeVar

import faust

from pgkd.data import utf8_encodable
from pgkd.inference import load_json


class LabelOut(faust.Record, serializer="json", include_metadata=False):
    """``labels.out``, key = id: the answer for one text. The student answers
    first; a low-confidence text later gets a second record with the same key
    and ``source="teacher"``."""

    id: str
    label: str
    confidence: float
    top_k: list  # [[label, probability], ...], best first
    model_version: str  # the student version that answered (or routed, for teacher records)
    source: str  # "student" | "teacher"
    needs_review: bool
    ts: float  # timestamp of the texts.in message (epoch seconds): redeliveries give the same record
    extra: dict  # the input's other fields, untouched
    teacher_model: Optional[str] = None  # set on teacher records


class TeacherRequest(faust.Record, serializer="json", include_metadata=False):
    """``teacher.requests``, key = id: a low-confidence text for the teacher."""

    id: str
    text: str
    student_label: str
    student_confidence: float
    top_k: list
    model_version: str
    ts: float  # of the texts.in message
    extra: dict

    @classmethod
    def parse(cls, raw: bytes | None) -> TeacherRequest | str:
        """A teacher.requests value -> the Record, or why it cannot be read (a dead letter)."""
        request = _decode(cls, raw, "teacher request")
        if isinstance(request, str):
            return request
        if not isinstance(request.id, str) or not isinstance(request.text, str) or not request.text.strip():
            return "a teacher request needs a string id and a non-empty text"
        return _check_types(request, "teacher request")


class TeacherLabel(faust.Record, serializer="json", include_metadata=False):
    """``teacher.labels``, key = id: the teacher's label, a training sample for distillation."""

    id: str
    text: str
    label: str
    teacher_model: str
    usage: dict  # this text's share of its request: prompt_tokens, completion_tokens, cost_usd, cached
    student_label: str
    student_confidence: float
    model_version: str
    ts: float  # of the texts.in message
    labelled_at: float  # when the teacher answered (a cached answer keeps its first time)

    @classmethod
    def parse(cls, raw: bytes | None) -> TeacherLabel | str:
        """A teacher.labels value -> the Record, or why it cannot be read (the curator counts it)."""
        record = _decode(cls, raw, "teacher label")
        if isinstance(record, str):
            return record
        if not all(isinstance(v, str) and v for v in (record.id, record.text, record.label)):
            return "a teacher label needs a string id, text and label"
        return _check_types(record, "teacher label")


class RetrainRequest(faust.Record, serializer="json", include_metadata=False):
    """``retrain.requests``, key = request_id: a closed batch of samples, for the trainer."""

    request_id: str
    round: int  # from the registry's round counter
    samples_upto: str  # the trainer trains on the seed set + every accepted sample up to this sample-stream id
    since: str  # this batch's samples follow this sample-stream id ("0-0": the first batch)
    trigger: str  # "size" | "window" | "drift"
    counts: dict  # teacher / generated: in this batch; total_teacher / total_generated: accepted so far
    target_classes: list  # the weakest classes the generation aimed at
    generation: dict  # requested, accepted, rejected (by reason), cost_usd, skipped (why no samples were asked; null)
    model_version: Optional[str]  # the serving version the batch was judged against
    ts: float  # when the batch closed

    @classmethod
    def parse(cls, raw: bytes | None) -> RetrainRequest | str:
        """A retrain.requests value -> the Record, or why it cannot be read."""
        request = _decode(cls, raw, "retrain request")
        if isinstance(request, str):
            return request
        if not isinstance(request.request_id, str) or not request.request_id:
            return "a retrain request needs a string request_id"
        return _check_types(request, "retrain request")


class DeadLetter(faust.Record, serializer="json", include_metadata=False):
    """``texts.dlq``, key = id when known, else ``topic:partition:offset``."""

    stage: str  # "parse" | "inference" | "teacher"
    reason: str  # a fixed name per stage (metric label); see docs/TOPICS.md
    error: str  # one line for a human
    topic: str
    partition: int
    offset: int
    id: Optional[str]
    original_b64: str  # the original message value, base64 (cut to dlq_max_original_bytes)
    original_size: int  # its full size in bytes
    original_truncated: bool
    ts: float  # of the original message

    @classmethod
    def of(
        cls,
        *,
        stage: str,
        reason: str,
        error: str,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None,
        ts: float,
        max_original_bytes: int,
        id: str | None = None,  # noqa: A002  # the field's name
    ) -> DeadLetter:
        raw = value or b""
        return cls(
            stage=stage,
            reason=reason,
            error=error[:1000],
            topic=topic,
            partition=partition,
            offset=offset,
            id=id,
            original_b64=base64.b64encode(raw[:max_original_bytes]).decode("ascii"),
            original_size=len(raw),
            original_truncated=len(raw) > max_original_bytes,
            ts=ts,
        )

    def key(self) -> str:
        return self.id if self.id is not None else f"{self.topic}:{self.partition}:{self.offset}"


R = TypeVar("R", bound=faust.Record)

# The declared field types (annotations are strings here) -> the JSON values that fit.
# faust does not check types on from_data: an unchecked ts="soon" or extra=[...]
# would fail later, inside the worker, instead of here as a dead letter.
_FITS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "Optional[str]": lambda v: v is None or isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),  # load_json: finite
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def _decode(cls: type[R], raw: bytes | None, what: str) -> R | str:
    """The Record of a raw value, or a one-line reason it cannot be read."""
    try:
        obj = load_json(raw or b"")
    except ValueError as err:  # not JSON, not UTF-8, NaN/Infinity, nested too deep
        return _one_line(f"unreadable {what}: {type(err).__name__}: {err}")
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if b"\\u" in (raw or b"") and not utf8_encodable(json.dumps(obj, ensure_ascii=False)):
        return f"unreadable {what}: the JSON holds a lone surrogate escape (\\ud800-\\udfff)"
    try:
        return cls.from_data(obj)
    except (ValueError, TypeError, KeyError) as err:  # e.g. a missing field
        return _one_line(f"unreadable {what}: {type(err).__name__}: {err}")


def _check_types(record: R, what: str) -> R | str:
    """The record when every declared field holds a value of its type, else the first misfit."""
    for name, kind in type(record).__annotations__.items():
        value = getattr(record, name)
        if not _FITS[kind](value):
            return f"a {what} needs {name} as {kind}, got {type(value).__name__}"
    return record



def _one_line(text: str, width: int = 300) -> str:
    flat = " ".join(text.split())
    return flat[:width] + ("..." if len(flat) > width else "")


def to_plain(record: faust.Record) -> dict[str, Any]:
    """The record as the JSON object consumers see."""
    return record.asdict()
