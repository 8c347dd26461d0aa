"""PGKD_INFERENCE_PROCESS=true on the real broker and Redis: a classify worker
serves each version from a child process; the child killed under traffic is
restarted and nothing is lost or answered twice; a child that stops answering
(SIGSTOP) is killed by the watchdog after PGKD_INFERENCE_TIMEOUT_S and its batch
retried, again with nothing lost; a promotion loads the new
version in a new child, the rollback finds the old one still running; stopping
the worker stops its children (the serving ones and the spare)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest
from streaming_support import collect_sync, metric_sum, produce, producing, text_message

from pgkd.registry import Registry
from pgkd.settings import Settings
from streams.announce import announce_model_update

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def children(pid: int) -> set[int]:
    """The live (not zombie) inference processes of the worker ``pid`` (multiprocessing
    also starts a resource tracker: not one of them)."""
    out = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out |= {int(c) for c in path.read_text().split()}
        except OSError:
            continue
    return {c for c in out if _state(c) not in ("Z", "X", None) and b"spawn_main" in _cmdline(c)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def serving_pid(worker, version: str) -> int:
    """The process that serves ``version`` now, from the worker's log (the last one it named)."""
    found = re.findall(rf"inference process (\d+) serves {version}\b", worker.tail(10**7))
    assert found, worker.tail()
    return int(found[-1])


def wait_for(predicate, timeout_s: float, what: str, worker) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert worker.alive(), worker.tail()
        assert time.monotonic() < deadline, f"{what} not seen in {timeout_s}s:\n{worker.tail()}"
        time.sleep(0.1)


def test_a_worker_serving_from_child_processes_survives_their_death_and_swaps_versions(stream, tiny_student,
                                                                                       tmp_path, redis_db_url):
    from pgkd.student import Student

    env = stream(tiny_student, model_store=tmp_path / "models", model_poll_s=0, inference_process=True,
                 batch_size=16, inference_timeout_s=3)
    t = env.topics
    registry = Registry(tmp_path / "models", redis_db_url, namespace=env.env["PGKD_APP_ID_PREFIX"])
    student = Student.load(tiny_student, device="cpu")
    v1 = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
    student.model.classifier.reset_parameters()
    v2 = registry.publish(student, parent=v1, round=1, data={}, metrics={}, settings={}, graphs=("int8",))
    registry.promote(v1, reason="seed")
    worker = env.start("classify")
    worker.wait_ready()
    first = serving_pid(worker, v1)
    assert first in children(worker.proc.pid)

    n = 600
    ids = [f"p{i}" for i in range(n)]
    messages = [text_message(i, f"my transfer number {i} has not arrived yet") for i in ids]
    with producing(env.bootstrap, t["texts_in"], messages, rate_per_s=100):
        time.sleep(2)
        os.kill(first, signal.SIGKILL)  # as the OOM killer would, mid-stream
        wait_for(lambda: "restarted the inference process" in worker.tail(10**7), 60, "a restart", worker)
        restarted = serving_pid(worker, v1)
        assert restarted != first and restarted in children(worker.proc.pid)
    got = collect_sync(env.bootstrap, [t["labels_out"], t["dlq"]],
                       lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids),
                       timeout_s=120, workers=[worker], linger_s=2)
    answered = [r["id"] for r in got.of(t["labels_out"])]
    assert sorted(answered) == sorted(ids)  # every text once: none lost with the process, none answered twice
    assert got.of(t["dlq"]) == []  # the batch in flight was retried, not dead-lettered
    assert metric_sum(worker.metrics(), "pgkd_inference_process_restarts_total", model_version=v1) == 1
    took = re.search(rf"restarted the inference process of {v1} in ([0-9.]+)s", worker.tail(10**7))[1]
    print(f"RELIABILITY inference-process-kill: {n} ids, 0 lost, 0 duplicate answers, 0 dead letters; "
          f"restarted with {v1} in {took} s; the worker kept running")

    # a child that stops answering (a hang): the watchdog kills it after PGKD_INFERENCE_TIMEOUT_S
    hung_ids = [f"h{i}" for i in range(300)]
    messages = [text_message(i, f"why was my card {i} declined") for i in hung_ids]
    with producing(env.bootstrap, t["texts_in"], messages, rate_per_s=100):
        time.sleep(1)
        os.kill(restarted, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: "killing its inference process" in worker.tail(10**7), 30, "the watchdog's kill", worker)
        killed_after = time.monotonic() - stopped
    got = collect_sync(env.bootstrap, [t["labels_out"], t["dlq"]],
                       lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(hung_ids),
                       timeout_s=120, workers=[worker], linger_s=2)
    assert sorted(r["id"] for r in got.of(t["labels_out"]) if r["id"] in set(hung_ids)) == sorted(hung_ids)
    assert got.of(t["dlq"]) == []  # the batch the stopped process held was retried text by text
    assert 3 <= killed_after < 10
    assert metric_sum(worker.metrics(), "pgkd_inference_hung_total", model_version=v1) == 1
    assert metric_sum(worker.metrics(), "pgkd_inference_process_restarts_total", model_version=v1) == 2
    restarted = serving_pid(worker, v1)
    print(f"RELIABILITY inference-process-hang: {len(hung_ids)} ids, 0 lost, 0 duplicate answers, 0 dead letters; "
          f"the stopped process killed {killed_after:.1f} s after SIGSTOP (PGKD_INFERENCE_TIMEOUT_S=3)")

    # a promotion: v2 loads in a new child; v1's child stays for the rollback, which loads nothing
    settings = Settings(**{k.removeprefix("PGKD_").lower(): v for k, v in env.env.items()})
    announce_model_update(settings, registry.promote(v2, reason="test"))
    wait_for(lambda: f"swapped {v1} -> {v2} (loaded and warmed" in worker.tail(10**7), 60, "the swap", worker)
    assert {serving_pid(worker, v2), restarted} <= children(worker.proc.pid)
    announce_model_update(settings, registry.rollback(reason="test"))
    wait_for(lambda: f"swapped {v2} -> {v1} (kept in memory" in worker.tail(10**7), 60, "the rollback", worker)

    tail = [f"q{i}" for i in range(50)]
    asyncio.run(produce(env.bootstrap, t["texts_in"], [text_message(i, f"top up {i} failed") for i in tail]))
    got = collect_sync(env.bootstrap, [t["labels_out"]], lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(tail),
                       timeout_s=120, workers=[worker])
    assert {r["model_version"] for r in got.of(t["labels_out"]) if r["id"] in set(tail)} == {v1}

    serving = children(worker.proc.pid)
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()
    deadline = time.monotonic() + 10
    while any(_state(pid) not in (None, "Z", "X") for pid in serving):
        assert time.monotonic() < deadline, f"inference processes left running: {serving}"
        time.sleep(0.1)
