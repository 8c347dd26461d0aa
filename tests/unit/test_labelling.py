"""The teacher worker's batch logic: failure reasons, per-batch de-duplication,
request size for the rate limiter, usage shares."""

import pytest

from pgkd.errors import BudgetExhausted, TeacherError
from pgkd.labelling import (
    TEACHER_ERROR_REASONS,
    distinct_texts,
    error_reason,
    request_tokens,
    usage_share,
)
from pgkd.teacher import Usage


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("teacher 'm' failed after 5 tries: HTTP 500: simulated failure", "server_error"),
        ("teacher 'm' failed after 5 tries: HTTP 503: overloaded", "server_error"),
        ("teacher 'm' failed after 5 tries: HTTP 429: slow down", "rate_limited"),
        ("teacher 'm' failed after 5 tries: timed out after 2s", "timeout"),
        ("teacher 'm' failed after 5 tries: connection error: ConnectError: refused", "connection"),
        ("teacher 'm' failed after 5 tries: invalid_json: answer is not a JSON object: I'm sorry", "invalid_json"),
        ("teacher 'm' failed after 5 tries: no label from the taxonomy for 3 of 16 texts: {...}", "outside_taxonomy"),
        ("teacher 'm' failed after 5 tries: empty answer", "empty_answer"),
        ("teacher 'm' refused the request: HTTP 401: bad key", "refused"),
        ("teacher 'm' rejected the request: HTTP 400: bad", "refused"),
        ("something new", "other"),
        # a model name that looks like a reason does not fool it
        ("teacher 'timed out' failed after 2 tries: HTTP 502: bad gateway", "server_error"),
    ],
)
def test_teacher_error_reasons_are_pinned(message, reason):
    assert error_reason(TeacherError(message)) == reason
    assert reason in TEACHER_ERROR_REASONS


def test_budget_exhausted_has_its_own_reason():
    assert error_reason(BudgetExhausted("teacher budget of $1 is spent")) == "budget_exhausted"


def test_distinct_texts_maps_every_input_to_its_first_spelling():
    unique, index = distinct_texts(["Card lost", "refund", "card  LOST", "refund", "new"], "tax")
    assert unique == ["Card lost", "refund", "new"]
    assert index == [0, 1, 0, 1, 2]
    assert [unique[i] for i in index][2] == "Card lost"


def test_request_tokens_grow_with_the_texts():
    taxonomy = ["a", "b"]
    small = request_tokens(["hi"], taxonomy)
    assert request_tokens(["hi", "x" * 400], taxonomy) >= small + 100
    assert small > 0


def test_usage_share_splits_one_request():
    share = usage_share(Usage(calls=2, prompt_tokens=100, completion_tokens=40, cost_usd=0.001, retries=1), 4)
    assert share == {"prompt_tokens": 25, "completion_tokens": 10, "cost_usd": 0.00025, "cached": False}
