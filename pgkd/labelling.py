"""The teacher worker's batch logic, without Kafka or Redis: which texts of a
batch need a teacher call (one per distinct text), how big a request is for
the rate limiter, each text's share of a request's usage, and a bounded name
for why a request failed (a metric label and dead-letter reason).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TypeVar

from pgkd.errors import BudgetExhausted
from pgkd.prompts import build_label_messages, estimate_tokens
from pgkd.teacher import Usage
from pgkd.teacher_cache import text_hash

T = TypeVar("T")

COMPLETION_TOKENS_PER_TEXT = 16  # '{"i": 12, "label": "card_payment_fee_charged"},' is about 15 tokens

# Teacher failure reasons (dead-letter reason at stage "teacher", metric label).
# Pinned by tests; matched against the last try's message of pgkd.teacher.
TEACHER_ERROR_REASONS = (
    "budget_exhausted",
    "invalid_json",  # the answer is not the JSON asked for
    "outside_taxonomy",  # labels missing or not in the taxonomy
    "empty_answer",
    "timeout",
    "connection",
    "rate_limited",  # HTTP 429 on the last try
    "server_error",  # HTTP 5xx on the last try
    "refused",  # 4xx other than 429: the same request fails the same way
    "bad_request",  # a teacher.requests record we cannot read
    "other",
)

_PATTERNS = (
    ("invalid_json", re.compile(r"invalid_json")),
    ("outside_taxonomy", re.compile(r"no label from the taxonomy")),
    ("empty_answer", re.compile(r"empty answer")),
    ("timeout", re.compile(r"timed out")),
    ("connection", re.compile(r"connection error")),
    ("rate_limited", re.compile(r"HTTP 429\b")),
    ("server_error", re.compile(r"HTTP 5\d\d\b")),
    ("refused", re.compile(r"(rejected|refused) the request")),
)


def error_reason(err: Exception) -> str:
    """A name from :data:`TEACHER_ERROR_REASONS` for a teacher failure.

    >>> from pgkd.errors import TeacherError
    >>> error_reason(TeacherError("teacher 'm' failed after 5 tries: HTTP 503: overloaded"))
    'server_error'
    >>> error_reason(TeacherError("teacher 'm' failed after 5 tries: timed out after 2s"))
    'timeout'
    """
    if isinstance(err, BudgetExhausted):
        return "budget_exhausted"
    # The last try's reason follows "tries:"; an earlier part may quote the model name.
    text = str(err).rpartition("tries:")[2] or str(err)
    for reason, pattern in _PATTERNS:
        if pattern.search(text):
            return reason
    return "other"


def distinct_texts(texts: Sequence[str], taxonomy_hash: str) -> tuple[list[str], list[int]]:
    """The first text of each cache key, and for every input the index of its
    distinct text: the same (normalised) text is asked once per batch.

    >>> distinct_texts(["Hi there", "bye", "hi  THERE"], "t")
    (['Hi there', 'bye'], [0, 1, 0])
    """
    first: dict[str, int] = {}
    unique: list[str] = []
    index: list[int] = []
    for text in texts:
        key = text_hash(text, taxonomy_hash)
        if key not in first:
            first[key] = len(unique)
            unique.append(text)
        index.append(first[key])
    return unique, index


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """Consecutive pieces of at most ``size`` items.

    >>> list(chunks([1, 2, 3, 4, 5], 2))
    [[1, 2], [3, 4], [5]]
    """
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def request_tokens(texts: Sequence[str], taxonomy: Sequence[str]) -> int:
    """Tokens one label request for ``texts`` will cost, prompt and answer (an
    estimate at ~4 characters a token, as the rate limiter needs it before the call)."""
    prompt = sum(estimate_tokens(m["content"]) for m in build_label_messages(texts, taxonomy))
    return prompt + COMPLETION_TOKENS_PER_TEXT * len(texts)


def usage_share(delta: Usage, n_texts: int) -> dict[str, float | int | bool]:
    """One text's share of a request's usage (the ``usage`` of a teacher.labels record).

    >>> usage_share(Usage(calls=1, prompt_tokens=101, completion_tokens=30, cost_usd=0.003), 2)
    {'prompt_tokens': 50, 'completion_tokens': 15, 'cost_usd': 0.0015, 'cached': False}
    """
    n = max(1, n_texts)
    return {
        "prompt_tokens": delta.prompt_tokens // n,
        "completion_tokens": delta.completion_tokens // n,
        "cost_usd": round(delta.cost_usd / n, 8),
        "cached": False,
    }


CACHED_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "cached": True}
