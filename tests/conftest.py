"""Fixtures shared by every test: a real Kafka broker and a real Redis.

Where the services come from (first that applies, once per session):

1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` from the environment, e.g. the
   services of ``make services-up``. Tests flush the Redis databases they use,
   so point ``REDIS_URL`` only at a disposable Redis.
2. testcontainers, when a Docker engine answers a ping.
3. ``deploy/local/kafka`` and ``deploy/local/redis`` on free ports, with their
   data in pytest's temporary directory; stopped when the session ends.

Outside CI a missing service skips the tests that need it, with the reason.
Under ``CI=true`` it fails them instead, with the broker's log tail: CI must
never pass by skipping its integration tests.

Isolation: ``kafka_topic`` / ``unique_topic`` give every test fresh topic names,
and ``redis_client`` / ``redis_db_url`` give every test a flushed database of its
own. ``make test TEST_WORKERS=2`` runs the suite on two pytest-xdist workers: each
starts its own broker and Redis (3. above), and where they share one Redis (1. or
2.) each takes its own share of the database numbers (``redis_databases``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL = REPO_ROOT / "deploy" / "local"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
KAFKA_READY_TIMEOUT_S = 60
TOPIC_READY_TIMEOUT_S = 30


def _unavailable(what: str, detail: str = "") -> None:
    """Skip (developer machine) or fail (CI) a test whose service is missing."""
    message = f"{what}" + (f"\n{detail}" if detail else "")
    if IN_CI:
        pytest.fail(f"[CI=true: infrastructure must be available] {message}", pytrace=False)
    pytest.skip(what)


def _free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """``n`` different TCP ports free on 127.0.0.1 right now. Picked with every socket
    held open: two single picks can return the same port (a broker once got its
    listener and controller on one port and could not start)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _kafka_probe():
    spec = importlib.util.spec_from_file_location("kafka_probe", LOCAL / "kafka_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for_kafka(bootstrap: str, timeout_s: float = KAFKA_READY_TIMEOUT_S) -> bool:
    """True once the first broker of ``bootstrap`` answers a Metadata request."""
    probe = _kafka_probe()
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if probe.metadata_brokers(host, int(port)) > 0:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _docker_engine() -> bool:
    if os.environ.get("PGKD_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - any failure means "no engine": fall back to deploy/local
        return False
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        return False
    return True


def _run_local(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LOCAL / script), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(autouse=True)
def _admin_commands_at_test_priority(monkeypatch):
    """``pgkd models`` commands lower their thread's CPU priority; run in-process,
    that thread is pytest's own, and the rest of the session would run niced.
    test_registry.py checks the real one on a thread of its own."""
    monkeypatch.setattr("pgkd.registry_cli._yield_cpu", lambda: None)


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Factory of TCP ports free on 127.0.0.1, e.g. for a worker's web server."""
    return _free_port


# --- Kafka --------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> Iterator[str]:
    """``host:port`` of a real Kafka broker for the whole session."""
    from_env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if from_env:
        if not wait_for_kafka(from_env, timeout_s=30):
            _unavailable(f"KAFKA_BOOTSTRAP_SERVERS={from_env} does not answer a Metadata request")
        yield from_env
        return

    if _docker_engine():
        from testcontainers.community.kafka import KafkaContainer

        image = os.environ.get("PGKD_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
        with KafkaContainer(image).with_kraft() as container:
            yield container.get_bootstrap_server()
        return

    port, controller_port = _free_ports(2)
    data_dir = tmp_path_factory.mktemp("kafka")
    args = ("--port", str(port), "--controller-port", str(controller_port), "--data-dir", str(data_dir))
    started = _run_local("kafka", "start", *args, env={"KAFKA_START_TIMEOUT": str(KAFKA_READY_TIMEOUT_S)})
    if started.returncode != 0:
        _run_local("kafka", "stop", *args)
        _unavailable(
            f"deploy/local/kafka could not start a broker on 127.0.0.1:{port} (log {data_dir}/kafka.log)",
            started.stdout + started.stderr,
        )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _run_local("kafka", "stop", *args)


@pytest.fixture(scope="session")
def faust_broker(kafka_bootstrap: str) -> str:
    """The same broker as a Faust ``broker=`` URL: ``kafka://host:port``."""
    return ";".join(f"kafka://{server.strip()}" for server in kafka_bootstrap.split(","))


def _topic_stem(request: pytest.FixtureRequest, stem: str) -> str:
    # Kafka allows [a-zA-Z0-9._-]; '.' and '_' collide in metric names, so use '-'
    name = re.sub(r"[^a-zA-Z0-9-]+", "-", f"{stem}-{request.node.name}").strip("-")
    return name[:180]


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory of topic names no other test (or earlier run) uses; creates nothing.

    ``unique_topic()`` -> ``"t-test_name-1a2b3c4d"``; ``unique_topic("in")`` -> ``"in-test_name-..."``.
    """

    def make(stem: str = "t") -> str:
        return f"{_topic_stem(request, stem)}-{uuid.uuid4().hex[:8]}"

    return make


async def create_topics(bootstrap: str, names: list[str], partitions: int = 4, config: dict | None = None) -> None:
    """Create topics (replication 1) and wait until every partition has a leader."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="pgkd-tests")
    await admin.start()
    try:
        new = [NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=config or {}) for n in names]
        await admin.create_topics(new)
        deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
        while True:
            described = await admin.describe_topics(names)
            ready = all(
                t["error_code"] == 0
                and len(t["partitions"]) == partitions
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            )
            if ready:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"topics {names} not ready after {TOPIC_READY_TIMEOUT_S}s: {described}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


@pytest.fixture
def kafka_create_topics(kafka_bootstrap: str) -> Callable[..., "asyncio.Future"]:
    """``await kafka_create_topics([names], partitions=4)`` from inside a running
    event loop (``kafka_topic`` is the sync shortcut for one topic)."""

    def create(names: list[str], partitions: int = 4, config: dict | None = None):
        return create_topics(kafka_bootstrap, names, partitions, config)

    return create


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, unique_topic: Callable[..., str]) -> Callable[..., str]:
    """Factory that creates a fresh topic and returns its name.

    ``kafka_topic()`` -> a new 4-partition topic; ``kafka_topic("in", partitions=1)``.
    Call it outside a running event loop (a sync test, before ``asyncio.run``).
    """

    def make(stem: str = "t", partitions: int = 4, config: dict | None = None) -> str:
        name = unique_topic(stem)
        asyncio.run(create_topics(kafka_bootstrap, [name], partitions, config))
        return name

    return make


# --- Redis --------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """``redis://host:port`` of a real Redis for the whole session (no database
    number: tests take their own one from ``redis_db_url`` / ``redis_client``)."""
    from_env = os.environ.get("REDIS_URL")
    if from_env:
        yield re.sub(r"/\d+$", "", from_env)
        return

    if _docker_engine():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(os.environ.get("PGKD_TEST_REDIS_IMAGE", "redis:7-alpine")) as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}"
        return

    port = _free_port()
    args = ("--port", str(port), "--data-dir", str(tmp_path_factory.mktemp("redis")))
    started = _run_local("redis", "start", *args)
    if started.returncode != 0:
        _run_local("redis", "stop", *args)
        _unavailable(f"deploy/local/redis could not start on 127.0.0.1:{port}", started.stdout + started.stderr)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        _run_local("redis", "stop", *args)


def xdist_worker() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker ("gw1" of 2 is (1, 2)); (0, 1) without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return (int(name[2:]) if name.startswith("gw") else 0), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def redis_databases(n: int, worker: int, workers: int) -> list[int]:
    """The database numbers of 1..n-1 (db 0 is never used by tests) that pytest-xdist
    worker ``worker`` of ``workers`` hands out: every ``workers``-th one, so that two
    workers sharing one Redis never flush each other's database.

    >>> redis_databases(16, 0, 2), redis_databases(16, 1, 2)
    ([1, 3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14])
    """
    return [db for db in range(1, n) if (db - 1) % workers == worker]


@pytest.fixture(scope="session")
def _redis_dbs(redis_url: str) -> Iterator[int]:
    """This worker's database numbers (:func:`redis_databases`) handed out in turn."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
    try:
        n = int(client.config_get("databases").get("databases", 16))
    except redis.RedisError as err:
        _unavailable(f"Redis at {redis_url} does not answer: {err}")
    finally:
        client.close()

    mine = redis_databases(n, *xdist_worker())
    if not mine:
        pytest.fail(f"Redis at {redis_url} has {n} databases: too few for {xdist_worker()[1]} pytest workers")

    def cycle() -> Iterator[int]:
        while True:
            yield from mine

    return cycle()


@pytest.fixture
def redis_db_url(redis_url: str, _redis_dbs: Iterator[int]) -> Iterator[str]:
    """``redis://host:port/N``: a database that is empty when the test starts and
    is flushed again when it ends."""
    import redis

    url = f"{redis_url}/{next(_redis_dbs)}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_db_url: str) -> Iterator["redis.Redis"]:  # noqa: F821
    """A sync ``redis.Redis`` on this test's own empty database (bytes in, bytes out)."""
    import redis

    client = redis.Redis.from_url(redis_db_url)
    try:
        yield client
    finally:
        client.close()


# --- models -------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A directory like a hub encoder (config, model.safetensors, tokenizer):
    a 2-layer, 32-wide BERT with the MiniLM vocabulary, random weights (seed 0),
    so anything that trains or predicts runs in seconds on a CPU. torch is
    imported here, not at module level: the Kafka-only tests never pay for it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pgkd.student import default_encoder_path

    path = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
