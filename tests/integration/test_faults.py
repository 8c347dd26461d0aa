"""Faults on real services (issue 7): the broker and Redis crash and come back
mid-stream, and every worker type is SIGKILLed at random while thousands of
texts flow through the whole loop. Workers are never restarted by the test
unless the test killed them: they must ride out a broker or Redis outage
themselves.

Each test prints its figures (duplicates, longest gap, kills, rounds); the
numbers in docs/RELIABILITY.md come from these prints.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaProducer
from streaming_support import (
    Collected,
    LocalService,
    StreamEnv,
    banking,
    collect_sync,
    metric_sum,
    text_message,
)

from pgkd.registry import Registry
from pgkd.simulator import SimulatorServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# --- helpers ---------------------------------------------------------------------------


class Producer(threading.Thread):
    """Produces ``messages`` at ``rate_per_s`` on a thread of its own and keeps
    going through a broker outage: a send that fails is sent again (so an id may
    reach ``texts.in`` twice; counted in ``resent``)."""

    def __init__(self, bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate_per_s: float):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.messages, self.rate = bootstrap, topic, messages, rate_per_s
        self.sent = 0
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as err:  # noqa: BLE001 - reported by join()
            self.error = err

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                    linger_ms=5, request_timeout_ms=10_000, retry_backoff_ms=250)
        await producer.start()
        try:
            step = 10
            started = time.monotonic()
            for i in range(0, len(self.messages), step):
                chunk = self.messages[i : i + step]
                while chunk:
                    futures = [await producer.send(self.topic, key=k, value=v) for k, v in chunk]
                    results = await asyncio.gather(*futures, return_exceptions=True)
                    failed = [m for m, r in zip(chunk, results, strict=True) if isinstance(r, BaseException)]
                    self.resent += len(failed)
                    chunk = failed
                    if failed:
                        await asyncio.sleep(0.5)
                self.sent = i + step
                await asyncio.sleep(max(0.0, started + (i + step) / self.rate - time.monotonic()))
        finally:
            await producer.stop()

    def finish(self, timeout_s: float = 300) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), "the producer did not finish"
        if self.error is not None:
            raise self.error


def student_answers(got: Collected, topic: str) -> list[dict]:
    return [r for r in got.of(topic) if r["source"] == "student"]


def duplicates_and_gap(got: Collected, topic: str) -> tuple[int, float]:
    """Student records beyond one per id (redeliveries), and the longest gap (s)
    between consecutive records on ``topic`` by broker timestamp."""
    answers = [(ts, r) for ts, r in got.stamped(topic) if r["source"] == "student"]
    per_id = Counter(r["id"] for _, r in answers)
    stamps = sorted(ts for ts, _ in answers)
    gap = max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)
    return sum(n - 1 for n in per_id.values()), gap


def assert_redeliveries_identical(records: list[dict]) -> None:
    """At least once: a redelivered input yields the very same record."""
    seen: dict[str, dict] = {}
    for r in records:
        assert seen.setdefault(r["id"], r) == r, (seen[r["id"]], r)


def stream_env(bootstrap: str, redis_url: str, unique_topic, tmp_path: Path, model_dir: Path, **overrides) -> StreamEnv:
    return StreamEnv.make(bootstrap, redis_url, unique_topic, tmp_path, model_dir, kafka_session_timeout_s=10,
                          **overrides)


@pytest.fixture
def own_kafka(tmp_path):
    """A broker of this test's own, so stopping it disturbs no other test."""
    broker = LocalService("kafka", tmp_path / "kafka")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def own_redis(tmp_path):
    server = LocalService("redis", tmp_path / "redis")
    server.start()
    yield server
    server.stop()


# --- the broker crashes and comes back ------------------------------------------------------


def test_broker_crash_and_restart_mid_stream_loses_no_id(own_kafka, redis_db_url, unique_topic, tmp_path,
                                                          tiny_student):
    n, rate = 3000, 100.0
    env = stream_env(own_kafka.address, redis_db_url, unique_topic, tmp_path, tiny_student, batch_size=32)
    t = env.topics
    try:
        worker = env.start("classify")
        worker.wait_ready()
        ids = [f"b{i}" for i in range(n)]
        producer = Producer(env.bootstrap, t["texts_in"],
                            [text_message(i, f"my card {i} has not arrived yet") for i in ids], rate)
        producer.start()
        collect_sync(env.bootstrap, [t["labels_out"]], lambda g: len(g.of(t["labels_out"])) >= 600,
                     timeout_s=120, workers=[worker])
        own_kafka.kill()
        down_at = time.time()
        time.sleep(5)
        own_kafka.start()
        up_at = time.time()
        producer.finish()
        got = collect_sync(env.bootstrap, [t["labels_out"]],
                           lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids),
                           timeout_s=300, workers=[worker], linger_s=3)
        assert worker.alive(), "the worker did not ride out the broker crash"
    finally:
        env.stop_all()
        print(env.logs())
    records = student_answers(got, t["labels_out"])
    assert {r["id"] for r in records} == set(ids)
    assert_redeliveries_identical(records)
    dups, gap = duplicates_and_gap(got, t["labels_out"])
    print(f"RELIABILITY broker-crash: {n} ids, 0 lost, {dups} duplicate answers (redeliveries), "
          f"{producer.resent} producer resends, broker down {up_at - down_at:.1f}s, "
          f"longest gap between answers {gap:.1f}s")
    assert gap >= up_at - down_at - 1  # the outage is visible: this really ran across it


# --- Redis crashes and comes back ----------------------------------------------------------


def test_redis_crash_and_restart_degrades_and_recovers(kafka_bootstrap, own_redis, unique_topic, tmp_path,
                                                        tiny_student, sim_pool):
    n, rate = 1200, 40.0
    url = f"{own_redis.address}/0"
    with SimulatorServer(sim_pool) as sim:
        env = stream_env(kafka_bootstrap, url, unique_topic, tmp_path, tiny_student, teacher_base_url=sim.url,
                         low_conf_threshold=1.0, redis_timeout_s=0.5, teacher_batch_within_s=0.3)
        t = env.topics
        try:
            classify, teacher = env.start("classify"), env.start("teacher")
            classify.wait_ready()
            teacher.wait_ready()
            ids = [f"r{i}" for i in range(n)]
            # a third of the texts repeat: the teacher cache (Redis) answers those while it is up
            texts = [f"I was charged twice for payment {i % 800}" for i in range(n)]
            producer = Producer(env.bootstrap, t["texts_in"], [text_message(i, x) for i, x in zip(ids, texts)], rate)
            producer.start()
            collect_sync(env.bootstrap, [t["labels_out"]], lambda g: len(g.of(t["labels_out"])) >= 300,
                         timeout_s=120, workers=[classify, teacher])
            own_redis.kill()
            down_at = time.time()
            time.sleep(10)
            during = collect_sync(env.bootstrap, [t["labels_out"]], lambda g: True, timeout_s=30)
            own_redis.start()
            up_at = time.time()
            producer.finish()

            def done(g: Collected) -> bool:
                out = g.of(t["labels_out"])
                return ({r["id"] for r in out if r["source"] == "student"} >= set(ids)
                        and {r["id"] for r in out if r["source"] == "teacher"} >= set(ids))

            got = collect_sync(env.bootstrap, [t["labels_out"], t["dlq"]], done, timeout_s=300,
                               workers=[classify, teacher], linger_s=2)
            m_classify, m_teacher = classify.metrics(), teacher.metrics()
            keys_after = redis.Redis.from_url(url).dbsize()
        finally:
            env.stop_all()
            print(env.logs())
    assert got.of(t["dlq"]) == []
    # classification went on while Redis was down
    answered_while_down = [ts for ts, r in during.stamped(t["labels_out"])
                           if r["source"] == "student" and down_at + 1 < ts < up_at]
    assert answered_while_down, "no answer while Redis was down"
    assert metric_sum(m_teacher, "pgkd_redis_errors_total") > 0  # the outage was seen, counted, survived
    assert keys_after > 0  # the cache and spend ledger are written again after the restart
    print(f"RELIABILITY redis-crash: {n} ids, 0 lost, all answered by student and teacher, "
          f"Redis down {up_at - down_at:.1f}s, {len(answered_while_down)} student answers meanwhile, "
          f"redis errors counted: classify {metric_sum(m_classify, 'pgkd_redis_errors_total'):.0f}, "
          f"teacher {metric_sum(m_teacher, 'pgkd_redis_errors_total'):.0f}; {keys_after} keys after restart")
