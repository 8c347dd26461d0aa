"""``pgkd topics create``, the brokers' ``auto.create.topics.enable=false``, and the producer and consumer
example of docs/TOPICS.md, on a real Kafka."""

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import UnknownTopicOrPartitionError

from streams.topics import FIELDS

pytestmark = pytest.mark.integration


def topic_env(bootstrap: str, prefix: str) -> dict[str, str]:
    names = {field: f"{prefix}.{field.replace('_', '.')}" for field in FIELDS}
    return {f"PGKD_TOPIC_{field.upper()}": name for field, name in names.items()} | {
        "PGKD_KAFKA_BOOTSTRAP": bootstrap, "PGKD_APP_ID_PREFIX": prefix, "PGKD_TOPIC_PARTITIONS": "3"}


def topics_create(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")}
    return subprocess.run([sys.executable, "-m", "pgkd.cli", "topics", "create"], env=clean | env,
                          capture_output=True, text=True, timeout=120)


def broker_view(bootstrap: str, names: list[str]) -> dict[str, tuple[int, str]]:
    """(partitions, cleanup.policy) of each topic as the broker reports it."""

    async def read():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            partitions = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
            resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
            policies = {}
            for response in await admin.describe_configs(resources):
                for _code, _msg, _type, name, entries, *_ in response.resources:
                    policies[name] = dict((entry[0], entry[1]) for entry in entries)["cleanup.policy"]
            return {name: (partitions[name], policies[name]) for name in names}
        finally:
            await admin.close()

    return asyncio.run(read())


def test_topics_create_makes_every_missing_topic_once_with_labels_out_compacted(kafka_bootstrap, unique_topic):
    env = topic_env(kafka_bootstrap, unique_topic("app"))
    names = [env[f"PGKD_TOPIC_{field.upper()}"] for field in FIELDS]

    first = topics_create(env)
    assert first.returncode == 0, first.stderr
    lines = [line.split("\t") for line in first.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == names and all(line[1] == "created" for line in lines)
    view = broker_view(kafka_bootstrap, names)
    assert view[env["PGKD_TOPIC_LABELS_OUT"]] == (3, "compact")
    assert all(view[name] == (3, "delete") for name in names if name != env["PGKD_TOPIC_LABELS_OUT"])

    again = topics_create(env)
    assert again.returncode == 0, again.stderr
    assert all(line.split("\t")[1] == "exists" for line in again.stdout.strip().splitlines())


def test_a_labels_out_made_without_compaction_is_reported_and_left_alone(kafka_bootstrap, unique_topic,
                                                                          kafka_create_topics):
    env = topic_env(kafka_bootstrap, unique_topic("app"))
    labels_out = env["PGKD_TOPIC_LABELS_OUT"]
    asyncio.run(kafka_create_topics([labels_out], partitions=2))  # e.g. auto-created by an early consumer

    done = topics_create(env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"pgkd: error: {labels_out} has cleanup.policy=delete, the product needs compact (kafka-configs.sh --alter "
        f"--entity-type topics --entity-name {labels_out} --add-config cleanup.policy=compact)"
    ]
    assert broker_view(kafka_bootstrap, [labels_out]) == {labels_out: (2, "delete")}  # not changed
    assert broker_view(kafka_bootstrap, [env["PGKD_TOPIC_TEXTS_IN"]])[env["PGKD_TOPIC_TEXTS_IN"]] == (3, "delete")


def test_a_producer_writing_to_a_topic_nobody_created_gets_an_error_not_a_new_topic(kafka_bootstrap,
                                                                                    unique_topic):
    misspelled = unique_topic("text.in")

    async def send():
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=3000)
        await producer.start()
        try:
            await producer.send_and_wait(misspelled, b"{}")
        finally:
            await producer.stop()

    with pytest.raises(UnknownTopicOrPartitionError):
        asyncio.run(send())

    async def exists():
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            return misspelled in await admin.list_topics()
        finally:
            await admin.close()

    assert not asyncio.run(exists())


def test_a_worker_started_before_the_topics_exist_creates_them_as_the_cli_does(stream, tiny_student,
                                                                               kafka_bootstrap):
    env = stream(tiny_student, create_topics=False)
    worker = env.start("classify")
    worker.wait_ready(180)
    view = broker_view(kafka_bootstrap, [env.topics["labels_out"], env.topics["texts_in"]])
    assert view == {env.topics["labels_out"]: (4, "compact"), env.topics["texts_in"]: (4, "delete")}


def test_the_producer_and_consumer_example_of_the_topics_doc_runs_against_a_worker(stream, tiny_student,
                                                                                 kafka_bootstrap, tmp_path):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "TOPICS.md").read_text()
    example = re.search(r"<!-- example: produce and consume -->\n```python\n(.*?)```", doc, flags=re.DOTALL)
    assert example, "the example block of docs/TOPICS.md"
    env = stream(tiny_student)
    code = (example.group(1).replace('"127.0.0.1:9092"', repr(kafka_bootstrap))
            .replace('"texts.in"', repr(env.topics["texts_in"])).replace('"labels.out"', repr(env.topics["labels_out"])))
    script = tmp_path / "example.py"
    script.write_text(code)
    worker = env.start("classify")
    worker.wait_ready(180)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ident, label, source, version = done.stdout.split()
    assert ident == "msg-1" and source == "student" and label and version
