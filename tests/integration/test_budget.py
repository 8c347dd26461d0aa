"""The teacher budget is never exceeded, by any number of concurrent callers:
each call's worst-case cost is booked in the shared Redis ledger before it is
made and replaced by its real cost after (pgkd.teacher SpendGate, pgkd.teacher_cache.SpendLedger).
The teacher is the simulator over real HTTP; the ledger is a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from pgkd.errors import BudgetExhausted
from pgkd.prompts import build_label_messages
from pgkd.simulator import SimulatorServer
from pgkd.teacher import LABEL_MAX_TOKENS, OpenAITeacher, max_prompt_tokens
from pgkd.teacher_cache import SpendLedger, connect

pytestmark = pytest.mark.integration


def test_three_workers_with_four_calls_in_flight_each_never_spend_past_the_budget(sim_pool, redis_db_url):
    budget = 0.05
    taxonomy = sorted(set(sim_pool.labels))
    texts = list(sim_pool.texts[:2000])

    async def main():
        clients, teachers = [], []
        for _ in range(3):  # three teacher workers sharing one ledger
            client = connect(redis_db_url, 2.0)
            clients.append(client)
            ledger = SpendLedger(client, budget, "t")
            teachers.append(OpenAITeacher(sim.url, "teacher-sim", "k", taxonomy, concurrency=4, batch_size=8,
                                          max_retries=0, spend=ledger))

        async def drain(teacher: OpenAITeacher, part: list[str]) -> int:
            calls = 0
            for i in range(0, len(part), 8):
                try:
                    await teacher.alabel(part[i : i + 8])
                except BudgetExhausted:
                    return calls
                calls += 1
            return calls

        # 4 requests in flight per worker: 12 racing for the last dollars
        jobs = [drain(t, texts[k::12]) for k in range(12) for t in [teachers[k % 3]]]
        calls = await asyncio.gather(*jobs)
        spent = await SpendLedger(clients[0], budget, "t").spent()
        used = sum(t.usage.cost_usd for t in teachers)
        for teacher in teachers:
            await teacher.aclose()
        for client in clients:
            await client.aclose()
        return sum(calls), spent, used

    with SimulatorServer(sim_pool) as sim:
        calls, spent, used = asyncio.run(main())
    one_call = (max_prompt_tokens(build_label_messages(texts[:8], taxonomy)) * 3.0
                + (LABEL_MAX_TOKENS[0] + LABEL_MAX_TOKENS[1] * 8) * 15.0) / 1e6
    print(f"{calls} calls, spent ${spent:.5f} of ${budget}, worst case of one call ${one_call:.5f}")
    assert spent <= budget  # never past it
    assert spent == pytest.approx(used, abs=1e-9)  # every booking was settled to the real cost
    assert budget - spent < 12 * one_call  # and it was used up, not refused early
    assert calls * 8 < len(texts)  # the budget, not the texts, stopped the callers


def test_redis_down_books_against_the_local_total(free_port):
    async def main():
        client = connect(f"redis://127.0.0.1:{free_port()}/0", 0.2)
        ledger = SpendLedger(client, 1.0, "t")
        assert await ledger.reserve(0.6) is True
        await ledger.settle(0.6, 0.5)
        assert await ledger.spent() == pytest.approx(0.5)
        assert await ledger.reserve(0.6) is False  # 0.5 + 0.6 > 1.0
        assert await ledger.reserve(0.4) is True
        await client.aclose()

    asyncio.run(main())
