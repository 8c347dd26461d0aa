"""OpenAITeacher: the real openai client against the teacher simulator over HTTP."""

import asyncio
import logging
import random
import socket
import time
from pathlib import Path

import pytest

from pgkd.data import LabelledTexts, load_labelled
from pgkd.errors import BudgetExhausted, TeacherError
from pgkd.mining import Example, Mined
from pgkd.report import classification_report
from pgkd.settings import load_settings
from pgkd.simulator import SimulatorServer
from pgkd.teacher import GenerationResult, OpenAITeacher, Teacher, Usage

BANKING77 = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "banking77" / "train.csv"
FAKE_KEY = "sk-test-PGKD-FAKE-KEY-0123456789"


@pytest.fixture(scope="module")
def banking() -> LabelledTexts:
    if not BANKING77.is_file():
        pytest.skip(f"Banking77 not found at {BANKING77}")
    data = load_labelled(BANKING77, ["text"], "category")
    rows = list(range(len(data)))
    random.Random(0).shuffle(rows)
    return data.subset(rows[:1500])


def make_teacher(sim, taxonomy, **kw) -> OpenAITeacher:
    kw = {"backoff_base_s": 0.01, "max_retries": 3, "seed": 0, **kw}
    return OpenAITeacher(sim.url, "teacher-sim", FAKE_KEY, taxonomy, **kw)


def mined_from(data: LabelledTexts) -> Mined:
    ex = [Example(t, y, y, 0.9) for t, y in zip(data.texts[:4], data.labels[:4])]
    return Mined(correct=ex, misclassified=ex[:2], hard_negatives=ex[2:])


def test_is_a_teacher(banking):
    with SimulatorServer(banking) as sim:
        assert isinstance(make_teacher(sim, banking.classes()), Teacher)


def test_labels_match_gold_without_noise(banking):
    texts, gold = list(banking.texts[:100]), list(banking.labels[:100])
    with SimulatorServer(banking) as sim:
        teacher = make_teacher(sim, banking.classes(), batch_size=16, concurrency=4)
        assert teacher.label(texts) == gold
        assert sim.stats["requests"] == {"label": 7}  # ceil(100 / 16) batches
        assert sim.stats["max_in_flight"] <= 4


def test_label_noise_gives_about_that_share_wrong(banking):
    texts, gold = list(banking.texts[:400]), list(banking.labels[:400])
    with SimulatorServer(banking, label_noise=0.3, seed=7) as sim:
        teacher = make_teacher(sim, banking.classes(), batch_size=50)
        labels = teacher.label(texts)
        assert teacher.label(texts) == labels  # seeded per text: the same answers again
    wrong = sum(a != b for a, b in zip(labels, gold)) / len(gold)
    assert 0.22 <= wrong <= 0.38
    assert set(labels) <= set(banking.classes())


def test_usage_and_cost_are_accounted_per_call(banking):
    with SimulatorServer(banking) as sim:
        teacher = make_teacher(sim, banking.classes(), price_prompt_per_mtok=2.0, price_completion_per_mtok=10.0)
        teacher.label(list(banking.texts[:40]))
        u = teacher.usage
        assert u.calls == sim.stats["chat_requests"] == 3 and u.errors == u.retries == 0
        assert u.prompt_tokens > 0 and u.completion_tokens > 0
        assert u.cost_usd == pytest.approx((u.prompt_tokens * 2.0 + u.completion_tokens * 10.0) / 1e6)
        assert u.as_dict() == {"calls": 3, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                               "cost_usd": round(u.cost_usd, 6), "errors": 0, "retries": 0}
        before = u.copy()
        teacher.label(list(banking.texts[40:41]))
        delta = teacher.usage - before
        assert delta.calls == 1 and delta.prompt_tokens > 0


def test_generation_returns_unseen_pool_examples_of_the_targets_only(banking):
    targets = ["card_arrival", "lost_or_stolen_card", "request_refund"]
    report = classification_report(banking.labels[:50], banking.labels[:50], banking.classes())
    seen: set[str] = set()
    with SimulatorServer(banking) as sim:
        teacher = make_teacher(sim, banking.classes())
        for _ in range(3):
            result = teacher.generate(report, mined_from(banking), targets, n=9)
            assert isinstance(result, GenerationResult)
            assert (result.requested, result.accepted, result.rejected) == (9, 9, {})
            assert sorted(result.samples.labels) == sorted(targets * 3)  # round-robin over the targets
            for text, label in zip(result.samples.texts, result.samples.labels):
                assert banking.labels[banking.texts.index(text)] == label  # a gold pool example
            assert not seen & set(result.samples.texts)  # never repeated across calls
            seen |= set(result.samples.texts)


def test_generation_drops_known_texts(banking):
    target = "card_arrival"
    known = {t.upper() for t, y in zip(banking.texts, banking.labels) if y == target}
    with SimulatorServer(banking) as sim:
        result = make_teacher(sim, banking.classes()).generate("report", mined_from(banking), [target], 5, known)
    assert result.accepted == 0 and result.rejected == {"known_text": 5}


def test_generation_rejects_a_target_outside_the_taxonomy(banking):
    with SimulatorServer(banking) as sim:
        teacher = make_teacher(sim, banking.classes())
        with pytest.raises(ValueError, match="^target class 'pizza' is not in the teacher's taxonomy$"):
            teacher.generate("report", mined_from(banking), ["pizza"], 5)
        assert sim.stats["chat_requests"] == 0


def test_retries_on_429_honour_retry_after(banking):
    with SimulatorServer(banking, rate_limit_every=2, retry_after_s=0.3) as sim:
        teacher = make_teacher(sim, banking.classes(), concurrency=1, backoff_base_s=0.001)
        started = time.perf_counter()
        assert teacher.label(list(banking.texts[:32])) == list(banking.labels[:32])
        assert time.perf_counter() - started >= 0.3  # waited what the server asked, not the tiny backoff
        assert teacher.usage.retries == sim.stats["faults"]["http_429"] == 1
        assert teacher.usage.calls == sim.stats["chat_requests"] == 3


def test_retries_on_500_succeed(banking):
    with SimulatorServer(banking, fail_rate=0.4, seed=3) as sim:
        teacher = make_teacher(sim, banking.classes(), max_retries=8, batch_size=8)
        assert teacher.label(list(banking.texts[:64])) == list(banking.labels[:64])
        failures = sim.stats["faults"]["http_500"]
        assert failures > 0 and teacher.usage.retries == teacher.usage.errors == failures


@pytest.mark.parametrize(
    "faults, reason",
    [
        ({"fail_rate": 1.0}, "HTTP 500: simulated server error"),
        ({"garbage_rate": 1.0}, "invalid_json: answer is not a JSON object: "),
        ({"outside_taxonomy_rate": 1.0}, "no label from the taxonomy for 2 of 2 texts"),
    ],
)
def test_persistent_failure_raises_a_one_line_teacher_error(banking, faults, reason):
    with SimulatorServer(banking, **faults) as sim:
        teacher = make_teacher(sim, banking.classes(), max_retries=2)
        with pytest.raises(TeacherError) as info:
            teacher.label(list(banking.texts[:2]))
        assert sim.stats["chat_requests"] == 3  # the first try and 2 retries
    message = str(info.value)
    assert message.startswith(f"teacher 'teacher-sim' failed after 3 tries: {reason}")
    assert "\n" not in message
    assert teacher.usage.errors == 3 and teacher.usage.retries == 2


def test_timeout_is_retried_then_raised(banking):
    with SimulatorServer(banking, delay_s=0.5) as sim:
        teacher = make_teacher(sim, banking.classes(), timeout_s=0.1, max_retries=1)
        with pytest.raises(TeacherError, match=r"^teacher 'teacher-sim' failed after 2 tries: timed out after 0.1s$"):
            teacher.label(["hello"])


def test_connection_error_is_retried_then_raised(banking):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", "m", FAKE_KEY, banking.classes(), max_retries=1,
                            backoff_base_s=0.01)
    with pytest.raises(TeacherError, match=r"^teacher 'm' failed after 2 tries: connection error: "):
        teacher.label(["hello"])


def test_response_format_falls_back_when_the_server_rejects_it(banking):
    with SimulatorServer(banking, supported_formats=()) as sim:
        teacher = make_teacher(sim, banking.classes())
        assert teacher.label(list(banking.texts[:16])) == list(banking.labels[:16])  # answer fenced in prose
        assert sim.stats["faults"] == {"format_rejected": 2}  # json_schema, then json_object
        teacher.label(list(banking.texts[16:32]))
        assert sim.stats["faults"] == {"format_rejected": 2}  # the fallback is remembered
        assert teacher.usage.errors == 0
    with SimulatorServer(banking, supported_formats=("json_object",)) as sim:
        teacher = make_teacher(sim, banking.classes())
        assert teacher.label(list(banking.texts[:4])) == list(banking.labels[:4])
        assert sim.stats["faults"] == {"format_rejected": 1}


def test_budget_stops_calls_before_they_are_made(banking):
    with SimulatorServer(banking) as sim:
        teacher = make_teacher(sim, banking.classes(), budget_usd=1e-9, concurrency=1)
        with pytest.raises(BudgetExhausted, match=r"^teacher budget of \$1e-09 is spent \(\$0\.\d{4} used\); raise"):
            teacher.label(list(banking.texts[:32]))  # the first batch is paid for, the second is refused
        assert sim.stats["chat_requests"] == 1
        with pytest.raises(BudgetExhausted):
            teacher.generate("report", mined_from(banking), ["card_arrival"], 4)
        assert sim.stats["chat_requests"] == 1
    with SimulatorServer(banking) as sim:
        with pytest.raises(BudgetExhausted):
            make_teacher(sim, banking.classes(), budget_usd=0.0).label(["x"])
        assert sim.stats["chat_requests"] == 0


def test_api_key_never_in_repr_errors_or_logs(banking, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the openai client's included
    with SimulatorServer(banking, api_key="the-right-key") as sim:  # echoes a wrong key in its 401 message
        teacher = make_teacher(sim, banking.classes())
        with pytest.raises(TeacherError) as info:
            teacher.label(["where is my card?"])
        assert sim.stats["chat_requests"] == 1  # a 401 is not retried
    assert str(info.value) == "teacher 'teacher-sim' refused the request: HTTP 401: Incorrect API key provided: ***"
    with SimulatorServer(banking, fail_rate=1.0) as sim:
        failing = make_teacher(sim, banking.classes(), max_retries=1)
        with pytest.raises(TeacherError) as info2:
            failing.label(["where is my card?"])
    for text in (repr(teacher), str(teacher), repr(vars(teacher)), str(info.value), repr(info.value),
                 str(info2.value), caplog.text):
        assert FAKE_KEY not in text
    assert "teacher try 1/2 failed (HTTP 500: simulated server error)" in caplog.text  # the logs did run


def test_async_core_runs_in_an_event_loop_and_sync_wrappers_refuse_to(banking):
    async def main(teacher):
        labels = await teacher.alabel(list(banking.texts[:40]))
        result = await teacher.agenerate("report", mined_from(banking), ["request_refund"], 2)
        with pytest.raises(RuntimeError, match="called inside a running event loop; await alabel/agenerate"):
            teacher.label(["x"])
        await teacher.aclose()
        return labels, result

    with SimulatorServer(banking, delay_s=0.05) as sim:
        teacher = make_teacher(sim, banking.classes(), batch_size=5, concurrency=2)
        labels, result = asyncio.run(main(teacher))
        assert labels == list(banking.labels[:40]) and result.accepted == 2
        assert sim.stats["max_in_flight"] == 2  # 8 batches, never more than 2 at once


def test_from_settings(banking):
    settings = load_settings(teacher_base_url="http://127.0.0.1:9/v1", teacher_model="m", teacher_batch_size=8,
                             teacher_concurrency=2, teacher_budget_usd=1.5, teacher_max_retries=1)
    teacher = OpenAITeacher.from_settings(settings, banking.classes())
    assert (teacher.base_url, teacher.model, teacher.batch_size, teacher.concurrency, teacher.budget_usd,
            teacher.max_retries) == ("http://127.0.0.1:9/v1", "m", 8, 2, 1.5, 1)
    assert teacher.price_prompt_per_mtok == settings.teacher_price_prompt_per_mtok


def test_usage_add():
    u = Usage()
    u.add(calls=2, prompt_tokens=10, cost_usd=0.5)
    u.add(errors=1, retries=1)
    assert u.as_dict() == {"calls": 2, "prompt_tokens": 10, "completion_tokens": 0, "cost_usd": 0.5,
                           "errors": 1, "retries": 1}
