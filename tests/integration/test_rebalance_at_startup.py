"""A rebalance while a worker's agent is still starting skips no input.

Found by the chaos test under load (2026-11-30; it lost 229 of 3,000): Faust
drops a batch fetched while its flow is stopped and seeks back to the committed
offsets, which aiokafka does not do on a partition with nothing committed yet,
so the batch was skipped. streams.transport fixes it; this module holds the
regression tests.

The end-to-end test reproduces the incident with a plain Faust app on the
product's App class and run_batches: worker A (its agent waits 25 s, like a
model load) owns half the partitions; B joins, is SIGKILLed, C joins; paced
traffic meanwhile. Without the fix it lost 276-280 of 1,400 inputs, all on A's
partitions from their first offset, in 6 of 16 runs (it depends on when a fetch
returns during the second rebalance); with it, none in 6 traced runs, among them
one where the rewind undid a skip of 138 records per partition. The seek test below
is the deterministic check of the fix itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.transport import seek_to_committed_or_reset

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
N, RATE = 1400, 35.0


async def _produce(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    started = time.monotonic()
    try:
        for i in range(N):
            await producer.send(topic, f"m{i}".encode(), partition=i % 4)
            await asyncio.sleep(max(0.0, started + (i + 1) / RATE - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(bootstrap: str, topic: str, timeout_s: float) -> set[str]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < N and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                got |= {r.value.decode() for r in records}
    finally:
        await consumer.stop()
    return got


@pytest.mark.parametrize("committed", [None, 5], ids=["nothing-committed", "offset-5-committed"])
def test_seek_back_rewinds_a_partition_with_nothing_committed_to_its_first_offset(
        kafka_bootstrap, kafka_create_topics, unique_topic, committed):
    """What Faust's "seek back to the committed offsets" does on a partition after
    a batch was fetched (and dropped): aiokafka's own seek leaves the position
    after the batch when nothing is committed; the fix rewinds it to offset 0,
    and still seeks to the committed offset where there is one."""
    topic = unique_topic()

    async def scenario() -> tuple[int, int]:
        await kafka_create_topics([topic], partitions=1)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait(topic, f"m{i}".encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=unique_topic("group"),
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        tp = TopicPartition(topic, 0)
        try:
            fetched = 0
            while fetched < 20:  # the batch that Faust would drop
                fetched += sum(len(r) for r in (await consumer.getmany(timeout_ms=1000)).values())
            if committed is not None:
                await consumer.commit({tp: committed})
            await consumer.seek_to_committed()  # aiokafka alone
            aiokafka_position = await consumer.position(tp)
            await seek_to_committed_or_reset(consumer, "earliest")
            return aiokafka_position, await consumer.position(tp)
        finally:
            await consumer.stop()

    aiokafka_position, fixed_position = asyncio.run(scenario())
    if committed is None:
        # aiokafka's own behaviour, the reason for the fix: if this starts failing,
        # aiokafka seeks uncommitted partitions itself and streams.transport can go
        assert aiokafka_position == 20
        assert fixed_position == 0
    else:
        assert aiokafka_position == fixed_position == committed


@pytest.mark.slow
def test_a_rebalance_while_the_agent_starts_skips_no_input(kafka_bootstrap, kafka_create_topics, unique_topic,
                                                             tmp_path):
    names = {"in": unique_topic("in"), "out": unique_topic("out"), "app": unique_topic("app")}
    asyncio.run(kafka_create_topics([names["in"], names["out"]]))
    workers: list[subprocess.Popen] = []

    def start(name: str, delay_s: float) -> subprocess.Popen:
        env = {**os.environ, "R_APP": names["app"], "R_BROKER": f"kafka://{kafka_bootstrap}",
               "R_DATADIR": str(tmp_path / name), "R_IN": names["in"], "R_OUT": names["out"],
               "R_DELAY_S": str(delay_s), "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1])])}
        with (tmp_path / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "faust", "-A", "rebalance_app", "worker", "-l", "info",
                                     "--without-web"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
        workers.append(proc)
        return proc

    def wait_ready(name: str) -> None:
        deadline = time.monotonic() + 120
        while "Worker]: Ready" not in (tmp_path / f"{name}.log").read_text(errors="replace"):
            assert time.monotonic() < deadline and workers[-1].poll() is None, (tmp_path / f"{name}.log").read_text()
            time.sleep(0.2)

    try:
        start("a", 25)
        wait_ready("a")
        b = start("b", 0)
        wait_ready("b")
        producer = threading.Thread(target=lambda: asyncio.run(_produce(kafka_bootstrap, names["in"])))
        producer.start()
        time.sleep(6)
        b.send_signal(signal.SIGKILL)
        b.wait(30)
        start("c", 0)
        got = asyncio.run(_collect(kafka_bootstrap, names["out"], timeout_s=75))  # ~50 s when nothing is lost
        producer.join()
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in workers:
            proc.wait(30)
    missing = sorted({f"m{i}" for i in range(N)} - got, key=lambda m: int(m[1:]))
    assert not missing, f"{len(missing)} of {N} inputs never answered, by partition " \
        f"{ {p: sum(int(m[1:]) % 4 == p for m in missing) for p in range(4)} }: {missing[:5]} ... {missing[-3:]}"
