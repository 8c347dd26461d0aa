"""Security settings against real services: a broker with a SASL_PLAINTEXT
(PLAIN) listener and a Redis that requires a password, both started here by
``deploy/local/kafka --sasl-port`` and ``deploy/local/redis --password-file``.

A classify worker configured only by PGKD_* (its SASL password from a file,
its Redis password in PGKD_REDIS_URL) classifies texts produced over SASL and
serves the registry's version from the password-protected Redis; with a wrong
password it stops, and neither password appears in anything it printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from streaming_support import TORCH_SERVING, StreamEnv, free_port, free_ports, text_message

from pgkd.errors import RegistryUnavailable
from pgkd.registry import Registry
from pgkd.settings import Settings

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL = REPO_ROOT / "deploy" / "local"
SASL_USER = "pgkd-app"
SASL_PASSWORD = "kafka-Pa55-7f3c91"
WRONG_SASL_PASSWORD = "kafka-Wr0ng-d41e07"
REDIS_PASSWORD = "redis-Pa55-8b2e44"
WRONG_REDIS_PASSWORD = "redis-Wr0ng-5c9a10"
N_TEXTS = 40


def _local(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LOCAL / script), *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180)


def _started(what: str, done: subprocess.CompletedProcess) -> None:
    """Like tests/conftest.py: a service that cannot start skips outside CI and fails under CI=true."""
    if done.returncode != 0:
        message = f"deploy/local/{what} could not start:\n{done.stdout}{done.stderr}"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _secret_file(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory) -> Iterator[dict]:
    """A broker of its own: PLAINTEXT and SASL_PLAINTEXT listeners on free loopback ports."""
    work = tmp_path_factory.mktemp("sasl-kafka")
    users = _secret_file(work / "users", f"{SASL_USER}:{SASL_PASSWORD}\nother:other-pass")
    port, cport, sport = free_ports(3)
    args = ("--port", str(port), "--controller-port", str(cport), "--data-dir", str(work / "kafka"))
    started = _local("kafka", "start", *args, "--sasl-port", str(sport), "--sasl-users-file", str(users))
    try:
        _started("kafka", started)
        assert SASL_PASSWORD not in started.stdout + started.stderr
        yield {"plain": f"127.0.0.1:{port}", "sasl": f"127.0.0.1:{sport}", "dir": work / "kafka", "users": users}
    finally:
        _local("kafka", "stop", *args)


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory) -> Iterator[str]:
    """``127.0.0.1:PORT`` of a Redis that requires REDIS_PASSWORD."""
    work = tmp_path_factory.mktemp("redis-auth")
    password_file = _secret_file(work / "password", REDIS_PASSWORD)
    port = free_port()
    args = ("--port", str(port), "--data-dir", str(work / "redis"))
    started = _local("redis", "start", *args, "--password-file", str(password_file))
    try:
        _started("redis", started)
        assert REDIS_PASSWORD not in started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        _local("redis", "stop", *args)


def _sasl_settings(bootstrap: str, password: str) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                    kafka_sasl_username=SASL_USER, kafka_sasl_password=password)


# --- the scripts -------------------------------------------------------------------


def test_broker_config_holds_the_users_but_nothing_prints_them(sasl_broker):
    conf = sasl_broker["dir"] / "server.properties"
    assert conf.stat().st_mode & 0o077 == 0, "server.properties holds passwords: mode 600"
    text = conf.read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:" in text and ",SASL_PLAINTEXT://127.0.0.1:" in text
    assert "listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN" in text
    assert f'user_{SASL_USER}="{SASL_PASSWORD}"' in text
    assert SASL_PASSWORD not in (sasl_broker["dir"] / "kafka.log").read_text(errors="replace")
    status = _local("kafka", "status", "--port", sasl_broker["plain"].rpartition(":")[2],
                    "--data-dir", str(sasl_broker["dir"]))
    assert status.returncode == 0 and SASL_PASSWORD not in status.stdout + status.stderr


def test_bad_users_file_is_refused_without_echoing_it(tmp_path):
    users = _secret_file(tmp_path / "users", 'ok:fine\nbad:pass"word-9q')
    port = free_port()
    got = _local("kafka", "start", "--port", str(port), "--data-dir", str(tmp_path / "kafka"),
                 "--sasl-port", str(free_port()), "--sasl-users-file", str(users))
    assert got.returncode != 0
    assert got.stderr.strip().endswith(f"kafka: {users} line 2: the password may not contain '\"' or '\\'")
    assert "pass\"word-9q" not in got.stdout + got.stderr
    no_file = _local("kafka", "start", "--port", str(port), "--data-dir", str(tmp_path / "kafka"),
                     "--sasl-port", str(free_port()))
    assert no_file.returncode != 0 and "--sasl-port needs --sasl-users-file" in no_file.stderr


def test_redis_requires_the_password_which_no_command_line_shows(secured_redis):
    host, _, port = secured_redis.partition(":")
    with redis.Redis(host=host, port=int(port)) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()  # NOAUTH
    with redis.Redis(host=host, port=int(port), password=REDIS_PASSWORD) as client:
        assert client.ping()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert REDIS_PASSWORD not in cmdline.read_bytes().decode(errors="replace"), cmdline
        except OSError:
            continue  # a process that ended while we looked


def test_registry_with_a_redis_password_and_a_wrong_one_redacted(secured_redis, tiny_student, tmp_path):
    store = tmp_path / "store"
    url = f"redis://:{REDIS_PASSWORD}@{secured_redis}/1"
    with Registry.from_settings(Settings(model_store=store, redis_url=url, app_id_prefix="sec")) as registry:
        version = registry.import_dir(tiny_student)
        registry.promote(version, reason="security test")
        assert registry.current() == version
        assert REDIS_PASSWORD not in repr(registry)
    wrong = Settings(model_store=store, redis_url=f"redis://:{WRONG_REDIS_PASSWORD}@{secured_redis}/1",
                     app_id_prefix="sec")
    with Registry.from_settings(wrong) as registry, pytest.raises(RegistryUnavailable) as err:
        registry.current()
    message = str(err.value)
    assert message.startswith(f"cannot reach the registry's Redis at redis://:***@{secured_redis}/1: ")
    assert "\n" not in message and WRONG_REDIS_PASSWORD not in message


# --- a real worker -----------------------------------------------------------------


async def _produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from streams.topics import kafka_kwargs

    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(settings: Settings, topic: str, n: int, timeout_s: float, worker) -> list[dict]:
    from streams.topics import kafka_kwargs

    consumer = AIOKafkaConsumer(topic, **kafka_kwargs(settings), auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[dict] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < n:
            assert worker.alive(), f"worker exited with {worker.proc.returncode}:\n{worker.tail()}"
            assert time.monotonic() < deadline, f"{len(got)} of {n} records after {timeout_s}s:\n{worker.tail()}"
            for records in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(json.loads(r.value) for r in records)
        return got
    finally:
        await consumer.stop()


def _worker_env(sasl_broker, redis_url: str, model_dir: Path, tmp_path: Path, unique_topic, password_file: Path,
                create_topics: bool = True):
    return StreamEnv.make(
        sasl_broker["sasl"], redis_url, unique_topic, tmp_path, model_dir, create_topics=create_topics,
        kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN", kafka_sasl_username=SASL_USER,
        kafka_sasl_password_file=password_file, kafka_session_timeout_s=10, **TORCH_SERVING,
    )


def test_worker_classifies_over_sasl_and_serves_from_a_password_redis(
    sasl_broker, secured_redis, tiny_student, tmp_path, unique_topic
):
    store = tmp_path / "store"
    redis_url = f"redis://:{REDIS_PASSWORD}@{secured_redis}/2"
    prefix_env = _worker_env(sasl_broker, redis_url, tiny_student, tmp_path,
                             unique_topic, _secret_file(tmp_path / "kafka-password", SASL_PASSWORD))
    prefix_env.env["PGKD_MODEL_STORE"] = str(store)
    # the registry's current version, in the password-protected Redis: the worker
    # serves it (not PGKD_SERVE_MODEL) only if its AUTH worked
    registry_settings = Settings(model_store=store, redis_url=redis_url,
                                 app_id_prefix=prefix_env.env["PGKD_APP_ID_PREFIX"])
    with Registry.from_settings(registry_settings) as registry:
        version = registry.import_dir(tiny_student)
        registry.promote(version, reason="security test")
    try:
        worker = prefix_env.start("classify")
        worker.wait_ready(timeout_s=90)
        sasl = _sasl_settings(sasl_broker["sasl"], SASL_PASSWORD)
        texts = [text_message(f"s{i}", f"my card number {i} was stolen") for i in range(N_TEXTS)]
        asyncio.run(_produce(sasl, prefix_env.topics["texts_in"], texts))
        out = asyncio.run(_collect(sasl, prefix_env.topics["labels_out"], N_TEXTS, 60, worker))
    finally:
        prefix_env.stop_all()
    assert sorted(r["id"] for r in out) == sorted(f"s{i}" for i in range(N_TEXTS))
    assert {r["model_version"] for r in out} == {version}
    log = worker.tail(10**7)
    assert SASL_PASSWORD not in log and REDIS_PASSWORD not in log, "a password reached the worker's output"


def test_wrong_sasl_password_stops_the_worker_without_printing_it(
    sasl_broker, secured_redis, tiny_student, tmp_path, unique_topic
):
    redis_url = f"redis://:{REDIS_PASSWORD}@{secured_redis}/3"  # right: the SASL login is the only fault
    env = _worker_env(sasl_broker, redis_url, tiny_student, tmp_path, unique_topic,
                      _secret_file(tmp_path / "kafka-password", WRONG_SASL_PASSWORD), create_topics=False)
    try:
        worker = env.start("classify")
        deadline = time.monotonic() + 60
        while worker.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not worker.alive(), f"still running 60s after a failed SASL login:\n{worker.tail()}"
    finally:
        env.stop_all()
    log = worker.tail(10**7)
    assert worker.proc.returncode != 0, log
    assert "Authentication failed" in log, log
    assert WRONG_SASL_PASSWORD not in log and SASL_PASSWORD not in log and REDIS_PASSWORD not in log
