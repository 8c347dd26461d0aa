"""The teacher's Redis state: cache keys, and that a Redis outage degrades to
misses and local spend accounting instead of raising."""

import asyncio
import socket

import pytest

from pgkd.teacher_cache import CachedLabel, SpendLedger, TeacherCache, connect, taxonomy_hash, text_hash

TAXONOMY = ["card_arrival", "card_lost", "refund"]


def free_port() -> int:
    """A port nothing listens on: Redis there refuses the connection at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cache_key_normalises_whitespace_and_case():
    t = taxonomy_hash(TAXONOMY)
    assert text_hash("  Where is MY\tcard? ", t) == text_hash("where is my card?", t)
    assert text_hash("where is my card?", t) != text_hash("where is my card", t)


def test_cache_key_depends_on_the_taxonomy_set_not_its_order():
    assert taxonomy_hash(TAXONOMY) == taxonomy_hash(list(reversed(TAXONOMY)))
    other = taxonomy_hash([*TAXONOMY, "top_up"])
    assert text_hash("x", taxonomy_hash(TAXONOMY)) != text_hash("x", other)


def test_cache_key_is_namespaced_and_opaque():
    cache = TeacherCache(client=None, taxonomy=TAXONOMY, prefix="run7")  # type: ignore[arg-type]
    key = cache.key("my card PIN 1234")
    assert key.startswith("run7:teacher:cache:")
    assert "1234" not in key and len(key.rsplit(":", 1)[1]) == 64


def test_redis_down_is_a_miss_and_a_skipped_write():
    errors: list[str] = []

    async def main():
        client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        cache = TeacherCache(client, TAXONOMY, on_error=errors.append)
        hits = await cache.get_many(["a", "b"])
        await cache.put_many([("a", CachedLabel("refund", "m", 1.0))])
        await client.aclose()
        return hits

    assert asyncio.run(main()) == [None, None]
    assert errors == ["cache_get", "cache_set"]


def test_redis_down_spend_is_counted_locally():
    errors: list[str] = []

    async def main():
        client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        ledger = SpendLedger(client, budget_usd=1.0, on_error=errors.append)
        await ledger.add(0.75)
        await ledger.add(0.5)
        remaining = await ledger.remaining()
        await ledger.record_status(True, "spent")
        await client.aclose()
        return remaining

    assert asyncio.run(main()) == pytest.approx(-0.25)
    assert "spend_add" in errors and "spend_get" in errors and "budget_status" in errors


@pytest.mark.integration
def test_cache_round_trip_and_ttl(redis_db_url, redis_client):
    async def main():
        client = connect(redis_db_url)
        cache = TeacherCache(client, TAXONOMY, ttl_s=60, prefix="p")
        await cache.put_many([("Where is my card?", CachedLabel("card_arrival", "gpt-x", 123.0))])
        hits = await cache.get_many(["where is  my card?", "something else"])
        await client.aclose()
        return hits, cache.key("where is my card?")

    (hit, miss), key = asyncio.run(main())
    assert hit == CachedLabel("card_arrival", "gpt-x", 123.0) and miss is None
    assert 0 < redis_client.ttl(key) <= 60


@pytest.mark.integration
def test_cache_ignores_unreadable_or_foreign_entries(redis_db_url, redis_client):
    cache = TeacherCache(None, TAXONOMY, prefix="p")  # type: ignore[arg-type]
    redis_client.set(cache.key("a"), b"not json")
    redis_client.set(cache.key("b"), b'{"label": "not_in_taxonomy", "teacher_model": "m", "ts": 1}')

    async def main():
        client = connect(redis_db_url)
        hits = await TeacherCache(client, TAXONOMY, prefix="p").get_many(["a", "b"])
        await client.aclose()
        return hits

    assert asyncio.run(main()) == [None, None]


@pytest.mark.integration
def test_spend_is_shared_and_the_budget_can_be_raised_in_redis(redis_db_url, redis_client):
    async def main():
        a, b = connect(redis_db_url), connect(redis_db_url)
        one, two = SpendLedger(a, 1.0, prefix="p"), SpendLedger(b, 1.0, prefix="p")
        await one.add(0.6)
        await two.add(0.6)
        spent = await one.spent()
        before = await two.remaining()
        redis_client.set("p:teacher:budget_usd", "5")
        after = await two.remaining()
        await one.record_status(True, "spent")
        await a.aclose()
        await b.aclose()
        return spent, before, after

    spent, before, after = asyncio.run(main())
    assert spent == pytest.approx(1.2)
    assert before == pytest.approx(-0.2) and after == pytest.approx(3.8)
    assert b'"exhausted": true' in redis_client.get("p:teacher:budget_status")


def test_a_refused_booking_never_shows_in_the_shared_total(redis_db_url, redis_client):
    # a refused booking leaves the total as it was; the check and the booking are one
    # script, so no reader (dashboards, the budget hold) sees it in between either
    async def main():
        client = connect(redis_db_url)
        ledger = SpendLedger(client, 0.03, prefix="q")
        booked = [await ledger.reserve(0.012), await ledger.reserve(0.012), await ledger.reserve(0.012)]
        seen = float(redis_client.get("q:teacher:spent_usd"))
        await ledger.settle(0.012, 0.004)  # one call came back cheaper: room for another booking
        again = await ledger.reserve(0.012)
        await client.aclose()
        return booked, seen, again

    booked, seen, again = asyncio.run(main())
    assert booked == [True, True, False]
    assert seen == pytest.approx(0.024)  # the refused third booking left no trace
    assert again is True and float(redis_client.get("q:teacher:spent_usd")) == pytest.approx(0.028)
