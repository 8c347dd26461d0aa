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
import itertools
import json
import os
import random
import signal
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
    TORCH_SERVING,
    StreamEnv,
    banking,
    collect_sync,
    produce_sync,
    metric_sum,
    text_message,
)

from pgkd.curation import sample_hash
from pgkd.data import write_labelled
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
    gap = max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)
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


@pytest.mark.parametrize("fault", ["crash", "freeze"])
def test_broker_crash_and_restart_mid_stream_loses_no_id(own_kafka, redis_db_url, unique_topic, tmp_path,
                                                          tiny_student, fault):
    """crash: SIGKILL, down 5 s, restarted on the same data dir. freeze: SIGSTOP for
    15 s (past the group's 10 s session timeout), then SIGCONT: the broker's
    sockets stay open and nothing answers, as behind a network partition."""
    n, rate = 3000, 100.0
    # fp32: a redelivery repeats the very record (int8 quantizes activations per pass: docs/RELIABILITY.md)
    env = stream_env(own_kafka.address, redis_db_url, unique_topic, tmp_path, tiny_student, batch_size=32,
                     **TORCH_SERVING)
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
        if fault == "crash":
            own_kafka.kill()
            down_at = time.time()
            time.sleep(5)
            own_kafka.start()
        else:
            own_kafka.freeze()
            down_at = time.time()
            time.sleep(15)
            own_kafka.thaw()
        up_at = time.time()
        producer.finish()
        got = collect_sync(env.bootstrap, [t["labels_out"]],
                           lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids),
                           timeout_s=300, workers=[worker], linger_s=3)
        assert worker.alive(), f"the worker did not ride out the broker {fault}"
    finally:
        env.stop_all()
        print(env.logs())
    records = student_answers(got, t["labels_out"])
    assert {r["id"] for r in records} == set(ids)
    assert_redeliveries_identical(records)
    dups, gap = duplicates_and_gap(got, t["labels_out"])
    print(f"RELIABILITY broker-{fault}: {n} ids, 0 lost, {dups} duplicate answers (redeliveries), "
          f"{producer.resent} producer resends, broker down {up_at - down_at:.1f}s, "
          f"longest gap between answers {gap:.1f}s")
    assert gap >= up_at - down_at - 1  # the outage is visible: this really ran across it


# --- a rolling restart of the classifiers --------------------------------------------------


def test_rolling_restart_of_the_classifiers_loses_nothing_and_answers_nothing_twice(kafka_bootstrap, redis_db_url,
                                                                                     unique_topic, tmp_path,
                                                                                     tiny_student):
    """A deploy: two classifiers under paced traffic; each in turn gets SIGTERM
    (docker stop), exits, and a new one is started. A graceful stop finishes and
    commits what the worker holds, so nothing is answered twice, and the traffic
    waits only for the rebalances (the new one loads its model before joining)."""
    n, rate = 2400, 80.0
    env = stream_env(kafka_bootstrap, redis_db_url, unique_topic, tmp_path, tiny_student, batch_size=32,
                     **TORCH_SERVING)
    t = env.topics
    try:
        workers = [env.start("classify"), env.start("classify")]
        for worker in workers:
            worker.wait_ready()
        ids = [f"d{i}" for i in range(n)]
        producer = Producer(env.bootstrap, t["texts_in"],
                            [text_message(i, f"where is my card {i}") for i in ids], rate)
        producer.start()
        collect_sync(env.bootstrap, [t["labels_out"]], lambda g: len(g.of(t["labels_out"])) >= 400,
                     timeout_s=120, workers=workers)
        exits = []
        for old in list(workers):
            old.proc.send_signal(signal.SIGTERM)
            exits.append(old.proc.wait(timeout=60))
            new = env.start("classify")
            new.wait_ready()
            workers = [w for w in workers if w is not old] + [new]
            time.sleep(3)
        producer.finish()
        got = collect_sync(env.bootstrap, [t["labels_out"]],
                           lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids),
                           timeout_s=300, workers=workers, linger_s=3)
        group = [w.metrics() for w in workers]  # the two new workers: both joined, the second saw a rebalance
    finally:
        env.stop_all()
        print(env.logs())
    assert sum(metric_sum(m, "pgkd_assigned_partitions") for m in group) == 4  # texts.in has 4 partitions
    assert [metric_sum(m, "pgkd_rebalances_total") >= 1 for m in group] == [True, True], group
    records = student_answers(got, t["labels_out"])
    dups, gap = duplicates_and_gap(got, t["labels_out"])
    print(f"RELIABILITY rolling-restart: {n} ids, 2 classifiers replaced one by one, exit codes {exits}, "
          f"{len({r['id'] for r in records} ^ set(ids))} lost, {dups} duplicate answers, "
          f"longest gap between answers {gap:.1f}s")
    assert exits == [0, 0]
    assert {r["id"] for r in records} == set(ids)
    # 200 and 293 before streams.transport committed before a revoke (every rebalance redelivered
    # the acks since the last commit); 0 in 7 of 8 runs since (docs/RELIABILITY.md). Allowed: what
    # a commit cut short could leave, two batches per stop
    assert dups <= 2 * 2 * 32, dups


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


# --- every worker type SIGKILLed at random, over the whole loop -----------------------------

CANARY_KEY = "sk-test-CANARY-7f3e9a1c5b2d"  # the teacher API key of the chaos run: must appear nowhere


class PointerWatch(threading.Thread):
    """Reads the registry's current pointer every 0.3 s and verifies the version
    it names (every file against the manifest): a partial version would fail."""

    def __init__(self, registry: Registry):
        super().__init__(daemon=True)
        self.registry = registry
        self.checks = 0
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                version = self.registry.current()
                if version is not None:
                    self.registry.verify(version)
                    if not self.versions or self.versions[-1] != version:
                        self.versions.append(version)
                self.checks += 1
            except Exception as err:  # noqa: BLE001 - collected, asserted empty
                self.failures.append(f"{type(err).__name__}: {err}")


def test_random_sigkills_of_every_worker_type_lose_nothing_and_run_no_round_twice(
        stream, tiny_student, sim_pool, tmp_path, redis_db_url):
    rng = random.Random(int(os.environ.get("PGKD_TEST_CHAOS_SEED", "7")))  # other seeds: other kill schedules
    train, test = banking("train"), banking("test")
    per_class: dict[str, list[int]] = {}
    for i, label in enumerate(train.labels):
        per_class.setdefault(label, []).append(i)
    seed_rows = [i for rows in per_class.values() for i in rows[:3]]
    val_rows = [i for rows in per_class.values() for i in rows[3:6]]
    seed_train = write_labelled(tmp_path / "seed_train.csv", train.subset(seed_rows))
    seed_val = write_labelled(tmp_path / "seed_val.csv", train.subset(val_rows))
    n = 3000
    ids = [f"c{i}" for i in range(n)]
    messages = [text_message(i, x) for i, x in zip(ids, test.texts[:n], strict=True)]

    sim = SimulatorServer(sim_pool, api_key=CANARY_KEY)
    env = stream(tiny_student, model_store=tmp_path / "models", teacher_base_url=sim.url,
                 teacher_api_key=CANARY_KEY, low_conf_threshold=1.0, seed_train=seed_train, seed_val=seed_val,
                 curator_batch_size=500, curator_batch_window_s=0, curator_drift_trigger="false",
                 curator_generate=8, curator_target_classes=4, trainer_mode="head", trainer_epochs=20,
                 trainer_patience=5, trainer_lock_ttl_s=3, trainer_max_attempts=3, model_poll_s=5,
                 gate_min_macro_f1_gain=-1, gate_max_accuracy_drop=1, gate_max_class_f1_drop=1, **TORCH_SERVING)
    t, prefix = env.topics, env.env["PGKD_APP_ID_PREFIX"]
    registry = Registry(tmp_path / "models", redis_db_url, namespace=prefix)
    seed_version = registry.import_dir(tiny_student)
    registry.promote(seed_version, reason="seed", round=0)
    watch = PointerWatch(registry)
    slots = ["classify", "classify", "teacher", "curator", "trainer"]
    live = {slot: env.start(role) for slot, role in enumerate(slots)}
    for worker in live.values():
        worker.wait_ready()
    watch.start()
    producer = Producer(env.bootstrap, t["texts_in"], messages, rate_per_s=35)
    producer.start()
    # every slot killed at least 4 times, in random order, 2-5 s apart
    schedule = [s for s in range(len(slots)) for _ in range(4)] + [rng.randrange(len(slots)) for _ in range(2)]
    rng.shuffle(schedule)
    kills: Counter[str] = Counter()
    try:
        for slot in schedule:
            time.sleep(rng.uniform(2, 5))
            live[slot].kill()
            kills[slots[slot]] += 1
            live[slot] = env.start(slots[slot])
        producer.finish()
        workers = list(live.values())

        def answered(g: Collected) -> bool:
            out = g.of(t["labels_out"])
            return ({r["id"] for r in out if r["source"] == "student"} >= set(ids)
                    and {r["id"] for r in out if r["source"] == "teacher"} >= set(ids))

        got = collect_sync(env.bootstrap, [t["labels_out"], t["dlq"], t["retrain_requests"]], answered,
                           timeout_s=420, workers=workers)
        # every retrain request the curator made ends recorded (the trainer may still be busy); the
        # curator first takes in every teacher label (it commits a batch of labels only after closing
        # the training batch they complete, generation included, and publishing its request)
        deadline = time.monotonic() + 300
        while True:
            curator_lag = asyncio.run(group_lag(env.bootstrap, f"{prefix}-curator", t["teacher_labels"]))
            requests = collect_sync(env.bootstrap, [t["retrain_requests"]], lambda g: True, timeout_s=30,
                                    linger_s=1).of(t["retrain_requests"])
            pending = {r["request_id"] for r in requests} - {r["request_id"] for r in registry.rounds(1000)}
            if not pending and requests and curator_lag == 0:
                break
            assert time.monotonic() < deadline, f"retrain requests never recorded: {sorted(pending)}"
            for worker in workers:
                assert worker.alive(), f"{worker.role} exited:\n{worker.tail()}"
            time.sleep(2)
        everything = collect_sync(env.bootstrap, list(t.values()), lambda g: True, timeout_s=60, linger_s=2)
        scraped = "\n".join(urllib_get(f"http://127.0.0.1:{w.metrics_port}/metrics") for w in workers)
    finally:
        watch.stop.set()
        sim.close()
    watch.join(5)
    env.stop_all()

    # zero ids lost, by the student and by the teacher
    out = got.of(t["labels_out"])
    student = [r for r in out if r["source"] == "student"]
    assert {r["id"] for r in student} == set(ids)
    assert {r["id"] for r in out if r["source"] == "teacher"} == set(ids)
    assert [r for r in got.of(t["dlq"]) if r["stage"] != "teacher"] == []
    by_version: dict[tuple[str, str], dict] = {}
    for r in student:  # a redelivery by the same model version repeats the very same record
        assert by_version.setdefault((r["id"], r["model_version"]), r) == r
    dups = len(student) - n

    # the pointer never named a partial version; every stored version is complete
    assert watch.failures == [] and watch.checks > 100, (watch.failures[:3], watch.checks)
    for version in registry.versions():
        registry.verify(version)
    leftovers = sorted(p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp"))

    # no retrain round ran twice to completion: one record per request, one request per batch
    rounds = registry.rounds(1000)
    per_request = Counter(r["request_id"] for r in rounds)
    assert max(per_request.values()) == 1, per_request
    completed = [r for r in rounds if r["outcome"] in ("promoted", "rejected")]
    assert len(completed) >= 3, rounds
    windows = {}
    for r in requests:
        windows.setdefault(r["request_id"], (r["since"], r["samples_upto"]))
    assert len(set(windows.values())) == len(windows), windows  # a re-closed batch keeps its request id
    assert len(set(watch.versions)) >= 2  # promotions happened while workers died

    # the teacher key reached the teacher and nothing else
    assert sim.stats["requests"].get("unauthorized", 0) == 0 and sim.stats["chat_requests"] > 0
    haystacks = {"worker logs": env.logs(tail=10**9), "metrics": scraped,
                 "topics": json.dumps({k: v for k, v in everything.records.items()}),
                 "redis": _dump_redis(redis_db_url)}
    haystacks["manifests"] = "".join((tmp_path / "models" / v / "manifest.json").read_text()
                                     for v in registry.versions())
    leaked = [where for where, text in haystacks.items() if CANARY_KEY in text or CANARY_KEY[8:] in text]
    assert leaked == [], f"the teacher API key appears in {leaked}"

    print(f"RELIABILITY chaos (seed {os.environ.get('PGKD_TEST_CHAOS_SEED', '7')}): {n} ids, {sum(kills.values())} SIGKILLs {dict(kills)}, 0 lost "
          f"(student and teacher), {dups} duplicate student answers, {producer.resent} producer resends; "
          f"pointer checked {watch.checks} times, 0 partial, versions served {watch.versions}; "
          f"{len(rounds)} rounds recorded ({Counter(r['outcome'] for r in rounds)}), attempts "
          f"{[r.get('attempts') for r in rounds]}, none twice; {len(leftovers)} .tmp leftovers; "
          f"key found in none of {sorted(haystacks)} ({sum(len(v) for v in haystacks.values())} chars scanned)")


def urllib_get(url: str) -> str:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError as err:
        return f"(unreachable: {err})"


def _dump_redis(url: str) -> str:
    """Every key and value of the test's Redis database, as text."""
    client = redis.Redis.from_url(url)
    parts = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        value = {"string": lambda k: client.get(k), "list": lambda k: client.lrange(k, 0, -1),
                 "hash": lambda k: client.hgetall(k), "set": lambda k: client.smembers(k),
                 "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                 "stream": lambda k: client.xrange(k)}.get(kind, lambda k: b"")(key)
        parts.append(f"{key!r} {value!r}")
    client.close()
    return "\n".join(parts)


# --- the teacher misbehaves in every way ------------------------------------------------------


def test_every_teacher_fault_is_retried_a_bounded_number_of_times_then_dead_lettered(stream, tiny_student,
                                                                                     sim_pool):
    """8 texts per phase (one request, or more when they reach the teacher in more than
    one take), 2 tries per request (PGKD_TEACHER_MAX_RETRIES=1):
    the teacher answers 500, 429, labels outside the taxonomy, the prompt's own
    text, or nothing before the timeout. Each ends in the DLQ with its reason
    after exactly 2 HTTP calls per request, and the classifier answers as fast as when the
    teacher is healthy."""
    per_phase = 8
    phases = [  # (name, simulator faults, dead-letter reason)
        ("healthy", {}, None),
        ("http500", {"fail_rate": 1.0}, "server_error"),
        ("http429", {"rate_limit_every": 1, "retry_after_s": 0.2}, "rate_limited"),
        ("outside", {"outside_taxonomy_rate": 1.0}, "outside_taxonomy"),
        ("echo", {"echo_rate": 1.0}, "invalid_json"),
        ("hang", {"delay_s": 3.0}, "timeout"),
    ]
    sim = SimulatorServer(sim_pool)
    env = stream(tiny_student, teacher_base_url=sim.url, low_conf_threshold=1.0, teacher_max_retries=1,
                 teacher_timeout_s=1.0, teacher_batch_size=per_phase, teacher_concurrency=1,
                 teacher_batch_within_s=0.5)
    t = env.topics
    classify, teacher = env.start("classify"), env.start("teacher")
    classify.wait_ready()
    teacher.wait_ready()
    produce_sync(env.bootstrap, t["texts_in"], [text_message("warm-up", "card payment declined")])
    collect_sync(env.bootstrap, [t["labels_out"]], lambda g: len(g.of(t["labels_out"])) >= 2, timeout_s=60,
                 workers=[classify, teacher])  # the first batch of each worker pays for its warm-up
    figures = []
    try:
        for name, faults, reason in phases:
            for key, value in {"fail_rate": 0.0, "rate_limit_every": 0, "outside_taxonomy_rate": 0.0,
                               "echo_rate": 0.0, "delay_s": 0.0, **faults}.items():
                setattr(sim, key, value)
            before = sim.stats
            ids = [f"{name}-{i}" for i in range(per_phase)]
            sent = time.monotonic()
            produce_sync(env.bootstrap, t["texts_in"],
                         [text_message(i, f"my card {name} {i} was declined at the shop") for i in ids])
            collect_sync(env.bootstrap, [t["labels_out"]],
                         lambda g, ids=ids: {r["id"] for r in student_answers(g, t["labels_out"])} >= set(ids),
                         timeout_s=60, workers=[classify, teacher])
            student_s = time.monotonic() - sent
            target = t["labels_out"] if reason is None else t["dlq"]
            got = collect_sync(env.bootstrap, [target],
                               lambda g, ids=ids: {r["id"] for r in g.of(target)
                                                   if r.get("source", "teacher") == "teacher"} >= set(ids),
                               timeout_s=120, workers=[classify, teacher])
            after = sim.stats
            calls = after["chat_requests"] - before["chat_requests"]
            # The student's answers may reach the teacher in more than one take (a busy machine), so
            # the phase may make more than one request: count the tries of each one.
            tries = sorted(n - before["calls_by_prompt"].get(p, 0) for p, n in after["calls_by_prompt"].items()
                           if n != before["calls_by_prompt"].get(p, 0))
            assert sum(tries) == calls, (name, tries, calls)
            if reason is not None:
                letters = [r for r in got.of(t["dlq"]) if r["id"] in set(ids)]
                assert {r["reason"] for r in letters} == {reason}, letters[:2]
                assert all(r["stage"] == "teacher" for r in letters)
                assert all("after 2 tries" in r["error"] for r in letters)
                assert set(tries) == {2}, f"{name}: HTTP calls per request {tries}, with one retry each"
                answers = collect_sync(env.bootstrap, [t["labels_out"], t["teacher_labels"]], lambda g: True,
                                       timeout_s=30, linger_s=1)
                # no answer at all, so nothing of the prompt can leak into an output (the dead letter's
                # error quotes the start of the bad answer, for the operator)
                assert not [r for topic in (t["labels_out"], t["teacher_labels"]) for r in answers.of(topic)
                            if r["id"] in set(ids) and r.get("source", "teacher") == "teacher"]
            else:
                assert set(tries) == {1}, f"{name}: HTTP calls per request {tries}"
            figures.append((name, round(student_s, 1), tries))
    finally:
        sim.close()
    print("RELIABILITY teacher faults (phase, seconds to the student's answers, HTTP calls per request):",
          figures)
    baseline = figures[0][1]
    for name, seconds, _ in figures[1:]:
        assert seconds <= max(3 * baseline, baseline + 5), f"{name}: the classifier waited for the teacher"
    m = teacher.metrics()
    for _name, _faults, reason in phases[1:]:
        assert metric_sum(m, "pgkd_dlq_total", reason=reason, stage="teacher") == per_phase


# --- sustained load: memory stays flat, lag returns to zero ----------------------------------

SOAK_S = float(os.environ.get("PGKD_TEST_SOAK_S", "90"))  # docs/RELIABILITY.md quotes a longer run


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def group_lag(bootstrap: str, group: str, topic: str) -> int:
    """Messages of ``topic`` that ``group`` has not committed yet (all partitions)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        partitions = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic)
                                                         or await _partitions(consumer, topic))]
        ends = await consumer.end_offsets(partitions)
        return sum(end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
                   for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def _partitions(consumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public "describe"
    return consumer.partitions_for_topic(topic) or set()


def test_sustained_load_keeps_worker_memory_flat_and_lag_returns_to_zero(stream, tiny_student, sim_pool):
    rate = 50.0
    n = int(rate * SOAK_S)
    with SimulatorServer(sim_pool) as sim:
        # the teacher's budget and rate limits are not what this test is about (tested above): out of the way
        env = stream(tiny_student, teacher_base_url=sim.url, low_conf_threshold=0.5, teacher_budget_usd=10_000,
                     teacher_rpm=100_000, teacher_tpm=100_000_000)
        t, prefix = env.topics, env.env["PGKD_APP_ID_PREFIX"]
        workers = {role: env.start(role) for role in ("classify", "teacher")}
        for worker in workers.values():
            worker.wait_ready()
        # real texts, each once: no teacher-cache shortcut
        texts = list(sim_pool.texts)
        messages = [text_message(f"s{i}", texts[i % len(texts)] + ("" if i < len(texts) else f" ({i})"))
                    for i in range(n)]
        producer = Producer(env.bootstrap, t["texts_in"], messages, rate)
        started = time.monotonic()
        producer.start()
        samples: dict[str, list[tuple[float, float]]] = {role: [] for role in workers}
        while producer.is_alive():
            for role, worker in workers.items():
                assert worker.alive(), f"{role} exited:\n{worker.tail()}"
                samples[role].append((time.monotonic() - started, rss_mb(worker.proc.pid)))
            time.sleep(2)
        producer.finish()
        lags = {}
        deadline = time.monotonic() + 60
        while True:
            lags = {"classify": asyncio.run(group_lag(env.bootstrap, f"{prefix}-classify", t["texts_in"])),
                    "teacher": asyncio.run(group_lag(env.bootstrap, f"{prefix}-teacher", t["teacher_requests"]))}
            if not any(lags.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        drained_s = time.monotonic() - started - SOAK_S
        ids = {f"s{i}" for i in range(n)}
        # labels.out is compacted: a student answer may be gone behind the teacher's for the same id
        got = collect_sync(env.bootstrap, [t["labels_out"]], lambda g: {r["id"] for r in g.of(t["labels_out"])} >= ids,
                           timeout_s=180)
    assert lags == {"classify": 0, "teacher": 0}, lags
    assert {r["id"] for r in got.of(t["labels_out"])} == ids
    report = []
    for role, points in samples.items():
        # after warm-up (the first fifth of the run) vs the end: flat, within allocator noise
        warm = [mb for s, mb in points if s >= SOAK_S / 5]
        start_mb, end_mb, peak_mb = warm[0], warm[-1], max(warm)
        report.append(f"{role} RSS {start_mb:.0f} -> {end_mb:.0f} MB (peak {peak_mb:.0f})")
        assert end_mb <= start_mb * 1.10 + 16, f"{role} memory grew: {start_mb:.0f} -> {end_mb:.0f} MB"
    print(f"RELIABILITY soak: {n} texts at {rate:.0f}/s for {SOAK_S:.0f}s; {'; '.join(report)}; "
          f"lag 0 on both groups {drained_s:.1f}s after the last text was produced")


# --- a curator killed in the middle of closing a batch -----------------------------------------

CLOSE_LOCK_TTL_S = 6.0  # PGKD_CURATOR_CLOSE_LOCK_TTL_S of this test: the successor waits for it to lapse


def _curator_closing_round_1(stream, tiny_student, sim_pool, tmp_path: Path, redis_url: str, delay_s: float):
    """A curator set-up (not started) whose first close, of 20 teacher labels (round 1),
    waits ``delay_s`` per generation request. Returns (env, sim, 30 teacher-label
    messages, their texts)."""
    from streams.schemas import TeacherLabel

    train = banking("train")
    rows = {label: [i for i, y in enumerate(train.labels) if y == label][:4] for label in sorted(set(train.labels))}
    seed = [i for r in rows.values() for i in r[:2]]
    val = [i for r in rows.values() for i in r[2:4]]
    seed_train = write_labelled(tmp_path / "seed_train.csv", train.subset(seed))
    seed_val = write_labelled(tmp_path / "seed_val.csv", train.subset(val))
    sim = SimulatorServer(sim_pool, delay_s=delay_s)
    env = stream(tiny_student, model_store=tmp_path / "models", teacher_base_url=sim.url, teacher_timeout_s=120,
                 seed_train=seed_train, seed_val=seed_val, curator_batch_size=20, curator_batch_window_s=0,
                 curator_drift_trigger="false", curator_generate=8, curator_target_classes=4,
                 curator_close_lock_ttl_s=CLOSE_LOCK_TTL_S)
    registry = Registry(tmp_path / "models", redis_url, namespace=env.env["PGKD_APP_ID_PREFIX"])
    version = registry.import_dir(tiny_student)
    registry.promote(version, reason="seed", round=0)
    pool = [i for i in range(len(train)) if i not in set(seed) | set(val)][:30]
    now = time.time()
    labels = [(f"l{i}".encode(), TeacherLabel(id=f"l{i}", text=train.texts[i], label=train.labels[i],
                                               teacher_model="teacher-sim", usage={}, student_label=train.labels[0],
                                               student_confidence=0.2, model_version=version, ts=now,
                                               labelled_at=now).dumps()) for i in pool]
    return env, sim, labels, [train.texts[i] for i in pool]


def _wait_closing(curator, sim) -> None:
    """Until the curator closes round 1 and its generation request has reached the teacher."""
    deadline = time.monotonic() + 120
    while "closing batch for round 1" not in curator.tail(10**7) or sim.stats["chat_requests"] == 0:
        assert curator.alive() and time.monotonic() < deadline, curator.tail()
        time.sleep(0.5)


def test_a_curator_killed_mid_close_is_resumed_by_the_next_one_once(stream, tiny_student, sim_pool, tmp_path,
                                                                     redis_db_url):
    """The close waits for the teacher's generation (the simulator holds its answer),
    the curator is SIGKILLed there; the next curator resumes the same close once
    the lock lapses (PGKD_CURATOR_CLOSE_LOCK_TTL_S, here 6 s; renewed while a close
    runs): one retrain request, with the round number of the interrupted close."""
    env, sim, labels, pool_texts = _curator_closing_round_1(stream, tiny_student, sim_pool, tmp_path, redis_db_url,
                                                            delay_s=60.0)  # hangs until the test lets it go
    t, prefix = env.topics, env.env["PGKD_APP_ID_PREFIX"]
    try:
        first = env.start("curator")
        produce_sync(env.bootstrap, t["teacher_labels"], labels[:20])
        _wait_closing(first, sim)
        first.kill()  # mid-close: the request is not out yet, the generation is still waiting
        killed_at = time.time()
        sim.delay_s = 0.0
        second = env.start("curator")
        produce_sync(env.bootstrap, t["teacher_labels"], labels[20:])  # a new batch starts meanwhile
        got = collect_sync(env.bootstrap, [t["retrain_requests"]], lambda g: bool(g.of(t["retrain_requests"])),
                           timeout_s=150, workers=[second], linger_s=8)
        assert "a batch close was interrupted; resuming it" in second.tail(10**7)
        # the close may be published before the new curator has read the second batch's labels
        # (it resumes on its timer, while its consumer still waits for the dead one's session)
        deadline = time.monotonic() + 90
        while asyncio.run(group_lag(env.bootstrap, f"{prefix}-curator", t["teacher_labels"])) > 0:
            assert second.alive() and time.monotonic() < deadline, second.tail()
            time.sleep(0.5)
    finally:
        sim.close()
    ((published, request),) = got.stamped(t["retrain_requests"])
    resumed_s = published - killed_at
    # not before the lock lapsed (its last renewal was at most a third of its TTL before the kill),
    # and well before the default 30 s lock would have lapsed: the setting is the one in force
    assert CLOSE_LOCK_TTL_S * 2 / 3 < resumed_s < 20, resumed_s
    assert request["request_id"] == f"{prefix}-round-1" and request["round"] == 1
    assert request["counts"]["teacher"] == 20
    client = redis.Redis.from_url(redis_db_url)
    batch = client.hgetall(f"{prefix}:curator:batch")
    # the second batch's samples, counted once; a label whose text the resumed close's generation
    # had already added (when the close ran first) is a duplicate sample, not counted
    generated = {sample_hash(fields[b"text"].decode()) for _id, fields in client.xrange(f"{prefix}:curator:samples")
                 if fields[b"source"] == b"generated"}
    taken_by_generation = sum(sample_hash(text) in generated for text in pool_texts[20:])
    client.close()
    assert int(batch.get(b"teacher", 0)) == 10 - taken_by_generation
    print(f"RELIABILITY curator killed mid-close: the next curator published the same request "
          f"{resumed_s:.0f}s after the kill ({taken_by_generation} of the next batch's labels generated first)")

def test_a_curator_stopped_mid_close_finishes_the_close_then_exits(stream, tiny_student, sim_pool, tmp_path,
                                                                   redis_db_url):
    """SIGTERM (docker stop) while the close waits for the teacher's generation (5 s
    per request here): the curator finishes the close, publishes its retrain request
    and exits 0; the next curator finds nothing to resume."""
    env, sim, labels, _texts = _curator_closing_round_1(stream, tiny_student, sim_pool, tmp_path, redis_db_url,
                                                        delay_s=5.0)
    t, prefix = env.topics, env.env["PGKD_APP_ID_PREFIX"]
    try:
        first = env.start("curator")
        produce_sync(env.bootstrap, t["teacher_labels"], labels[:20])
        _wait_closing(first, sim)
        first.proc.send_signal(signal.SIGTERM)
        stopped_at = time.time()
        code = first.proc.wait(timeout=120)
        exited_at = time.time()
        second = env.start("curator")
        second.wait_ready()
        got = collect_sync(env.bootstrap, [t["retrain_requests"]], lambda g: bool(g.of(t["retrain_requests"])),
                           timeout_s=60, workers=[second], linger_s=8)
    finally:
        sim.close()
    assert code == 0, first.tail()
    ((published, request),) = got.stamped(t["retrain_requests"])  # exactly one
    assert stopped_at < published < exited_at, (stopped_at, published, exited_at)  # by the stopping curator
    assert request["request_id"] == f"{prefix}-round-1" and request["round"] == 1
    assert "a batch close was interrupted" not in second.tail(10**7)
    print(f"RELIABILITY curator stopped mid-close: it published the request {published - stopped_at:.1f}s after "
          f"the SIGTERM and exited {exited_at - stopped_at:.1f}s after it, code 0")

