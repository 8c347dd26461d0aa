"""KNOWN BUG (found by the chaos test under load, 2026-11-30; docs/RELIABILITY.md,
"Not covered, or known limits"): a worker whose agent has not started taking
from its stream yet (the classifier loads its model first) and that keeps its
partitions through a rebalance skips what was fetched before the rebalance,
when the group has committed nothing on those partitions yet. Nothing is
committed past the skipped messages by them: the worker starts at a later
offset, so those inputs never get an answer.

Reproduced here with a plain Faust app and the product's run_batches: worker A
(its agent waits 25 s) owns half the partitions; B joins, is SIGKILLed, C
joins; paced traffic meanwhile. Seen: 278-280 of 1,400 inputs never answered,
all on A's partitions from their first offset, in 4 of 5 runs; in the fifth (the
full suite, 2026-11-30) nothing was lost: it depends on timing. Marked xfail
(not strict) until it is fixed."""

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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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


@pytest.mark.xfail(reason="known bug: inputs fetched before a rebalance at start-up are skipped (module docstring)",
                   strict=False)
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
