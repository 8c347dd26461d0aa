"""A Faust worker runs against the real broker: an agent reads one topic and
writes another, and every input comes out transformed exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

pytestmark = pytest.mark.integration

N_MESSAGES = 200
HERE = Path(__file__).parent


async def produce(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(N_MESSAGES):
            # key/value bytes exactly as Faust's json serializer expects them
            value = {"id": i, "text": f"message {i}", "__faust": {"ns": "faust_smoke_app.Text"}}
            await producer.send(topic, key=json.dumps(f"k{i}").encode(), value=json.dumps(value).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def collect(bootstrap: str, topic: str, worker: subprocess.Popen, timeout_s: float = 60) -> dict[int, dict]:
    out: dict[int, dict] = {}
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < N_MESSAGES:
                assert worker.poll() is None, f"the worker exited with {worker.returncode}"
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        value = json.loads(r.value)
                        assert value["id"] not in out, f"id {value['id']} delivered twice"
                        assert json.loads(r.key) == f"k{value['id']}"
                        out[value["id"]] = value
            # nothing beyond the N expected outputs arrives
            extra = await consumer.getmany(timeout_ms=1000)
            assert not any(extra.values()), f"unexpected extra outputs: {extra}"
    finally:
        await consumer.stop()
    return out


def test_faust_worker_transforms_every_message(
    kafka_bootstrap, faust_broker, kafka_topic, unique_topic, free_port, tmp_path
):
    topic_in, topic_out = kafka_topic("in"), kafka_topic("out")
    asyncio.run(produce(kafka_bootstrap, topic_in))

    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "SMOKE_APP_ID": unique_topic("smoke-app"),
        "SMOKE_BROKER": faust_broker,
        "SMOKE_IN": topic_in,
        "SMOKE_OUT": topic_out,
        "SMOKE_DATADIR": str(tmp_path / "faust-data"),
    }
    cmd = [sys.executable, "-m", "faust", "-A", "faust_smoke_app", "worker", "-l", "info",
           "--web-bind", "127.0.0.1", "--web-host", "127.0.0.1", "--web-port", str(free_port())]
    with log.open("wb") as log_file:
        worker = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        out = asyncio.run(collect(kafka_bootstrap, topic_out, worker))
    except BaseException:
        print(log.read_text()[-6000:])  # the worker's own account, shown with the failure
        raise
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    assert sorted(out) == list(range(N_MESSAGES))
    for i, value in out.items():
        assert value["text"] == f"MESSAGE {i}"
        assert value["length"] == len(f"message {i}")
