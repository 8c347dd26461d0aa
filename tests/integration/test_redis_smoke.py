"""A real Redis answers, expires keys, runs pipelines, and every test gets an
empty database of its own."""

from __future__ import annotations

import time

import pytest
import redis

pytestmark = pytest.mark.integration


def test_round_trip_expire_and_pipeline(redis_client):
    assert redis_client.ping()
    assert redis_client.set("model:current", "v0003")
    assert redis_client.get("model:current") == b"v0003"

    redis_client.set("lease", "worker-1", px=300)
    assert 0 < redis_client.pttl("lease") <= 300
    time.sleep(0.4)
    assert redis_client.get("lease") is None
    assert redis_client.exists("lease") == 0

    pipe = redis_client.pipeline(transaction=True)
    pipe.incr("rounds").incr("rounds").hset("round:2", mapping={"macro_f1": "0.81", "n": "64"}).hgetall("round:2")
    assert pipe.execute() == [1, 2, 2, {b"macro_f1": b"0.81", b"n": b"64"}]


def test_a_test_starts_with_an_empty_database(redis_client, redis_db_url):
    # the previous test wrote keys; this one must not see them
    assert redis_client.dbsize() == 0
    redis_client.set("mine", 1)
    # the URL names the same database, for code under test that takes a URL
    other = redis.Redis.from_url(redis_db_url)
    try:
        assert other.get("mine") == b"1"
    finally:
        other.close()

