"""The drift alarm record in a real Redis: what the curator reads, the shared
cool-down across workers, and a Redis outage that costs nothing but a metric."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import REGISTRY

from pgkd.teacher_cache import connect
from streams.drift_metrics import alarm_key, alarm_stream, publish_alarm

pytestmark = pytest.mark.integration


def _record(worker: str, ts: float) -> dict:
    return {"ts": ts, "psi": 0.42, "psi_class": 0.42, "psi_confidence": 0.1, "kl_class": 0.3,
            "kl_confidence": 0.05, "threshold": 0.2, "window": 2000, "model_version": "v0002", "worker": worker}


def test_alarm_is_published_once_per_cooldown_across_workers(redis_db_url, redis_client):
    async def run() -> list[bool]:
        client = connect(redis_db_url)
        try:
            first = await publish_alarm(client, "pfx", _record("w1", 1.0), cooldown_s=0.5)
            second = await publish_alarm(client, "pfx", _record("w2", 2.0), cooldown_s=0.5)  # another worker, same burst
            await asyncio.sleep(0.7)
            third = await publish_alarm(client, "pfx", _record("w2", 3.0), cooldown_s=0.5)
            return [first, second, third]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == [True, False, True]
    last = json.loads(redis_client.get(alarm_key("pfx")))
    assert last["ts"] == 3.0 and last["psi"] == 0.42 and last["worker"] == "w2"
    entries = redis_client.xrange(alarm_stream("pfx"))
    assert [json.loads(fields[b"record"])["ts"] for _id, fields in entries] == [1.0, 3.0]


def test_redis_down_is_counted_not_raised(free_port):
    def errors() -> float:
        return REGISTRY.get_sample_value("pgkd_redis_errors_total", {"op": "drift_alarm"}) or 0.0

    async def run() -> bool:
        client = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        try:
            return await publish_alarm(client, "pfx", _record("w1", 1.0), cooldown_s=10)
        finally:
            await client.aclose()

    before = errors()
    assert asyncio.run(run()) is False
    assert errors() == before + 1
