"""The product's Kafka topics, created before anything sends to them.

Every topic's name, partitions and replication come from settings; the only
per-topic setting of the broker the product relies on is ``labels.out``'s
compaction (the last record per id, the teacher's when there is one, is the
answer: docs/TOPICS.md). Brokers should run with ``auto.create.topics.enable=false``
(deploy/local and docker-compose do): otherwise whichever client touches a topic
first (a producer, or a consumer of ``labels.out`` started before the workers)
creates it with the broker's defaults, uncompacted, and nothing corrects it later.

``pgkd topics create`` (compose runs it once before the workers) creates what is
missing, waits until every partition has a leader, and reports an existing
``labels.out`` without compaction, or another topic with it, as a problem: the
operator fixes it with ``kafka-configs.sh --alter``; this tool never changes a
topic that exists. Workers still create missing topics at start (``streams.app``).

Plain aiokafka, no Faust: the CLIs, the model announcer and the model watcher import it
without an App; :func:`kafka_kwargs` connects their clients with the Faust apps' settings.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code
from aiokafka.helpers import create_ssl_context

from pgkd.errors import TopicError

if TYPE_CHECKING:
    from pgkd.settings import Settings

# settings field (topic_<field>) of every topic the product owns, in the order of docs/TOPICS.md
FIELDS = ("texts_in", "labels_out", "teacher_requests", "teacher_labels", "dlq", "retrain_requests",
          "model_updates")
COMPACTED = frozenset({"labels_out"})
TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicState:
    """One topic as the broker has it after :func:`ensure_topics`."""

    field: str
    name: str
    created: bool
    partitions: int
    cleanup_policy: str | None  # None: not read (ensure_topics(..., policies=False))

    @property
    def wanted_policy(self) -> str:
        return "compact" if self.field in COMPACTED else "delete"

    def problem(self) -> str | None:
        """Why the product cannot rely on this topic as it is, or None.

        >>> TopicState("labels_out", "labels.out", False, 4, "delete").problem()
        'labels.out has cleanup.policy=delete, the product needs compact (kafka-configs.sh --alter --entity-type topics --entity-name labels.out --add-config cleanup.policy=compact)'
        >>> TopicState("texts_in", "texts.in", False, 8, "delete").problem() is None
        True
        >>> TopicState("labels_out", "labels.out", False, 4, "compact,delete").problem() is None  # and a retention
        True
        """
        if self.cleanup_policy is None:
            return None  # not read: nothing to say
        compacted = "compact" in {p.strip() for p in self.cleanup_policy.split(",")}
        if compacted == (self.field in COMPACTED):
            return None
        return (f"{self.name} has cleanup.policy={self.cleanup_policy}, the product needs {self.wanted_policy} "
                f"(kafka-configs.sh --alter --entity-type topics --entity-name {self.name} "
                f"--add-config cleanup.policy={self.wanted_policy})")


def kafka_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection arguments of a plain aiokafka client (producer, consumer, admin)
    from the same settings as the Faust apps (``streams.app``)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()],
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password.get_secret_value(),
        }
    return kwargs


def new_topic(settings: Settings, field: str) -> NewTopic:
    configs = {"cleanup.policy": "compact"} if field in COMPACTED else {}
    return NewTopic(getattr(settings, f"topic_{field}"), num_partitions=settings.topic_partitions,
                    replication_factor=settings.topic_replication, topic_configs=configs)


async def ensure_topics(settings: Settings, fields: tuple[str, ...] = FIELDS, timeout_s: float = 30.0,
                        policies: bool = False) -> list[TopicState]:
    """Create the topics of ``fields`` that do not exist (partitions and
    replication from settings, ``labels.out`` compacted); return each one's state
    once every partition has a leader, with its cleanup policy when ``policies``
    (one more request to the broker). A topic that exists is left as it is."""
    admin = AIOKafkaAdminClient(**kafka_kwargs(settings), client_id=f"{settings.app_id_prefix}-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = {field: getattr(settings, f"topic_{field}") for field in fields}
        missing = [field for field, name in names.items() if name not in existing]
        if missing:
            response = await admin.create_topics([new_topic(settings, field) for field in missing])
            for name, code, *rest in response.topic_errors:
                if code not in (0, TOPIC_ALREADY_EXISTS):  # already exists: another client won the race
                    message = rest[0] if rest and rest[0] else for_code(code).__name__
                    raise TopicError(f"the broker refused to create topic {name}: {message}")
        partitions = await _wait_for_leaders(admin, list(names.values()), timeout_s)
        cleanup = await _cleanup_policies(admin, list(names.values())) if policies else {}
    finally:
        await admin.close()
    return [TopicState(field, name, field in missing, partitions[name], cleanup.get(name))
            for field, name in names.items()]


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> dict[str, int]:
    """Partition count of each topic, once every partition of every one has a leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = {d["topic"]: d for d in await admin.describe_topics(names)}
        ready = {
            name: len(d["partitions"]) for name, d in described.items()
            if d["error_code"] == 0 and d["partitions"] and all(p["leader"] >= 0 for p in d["partitions"])
        }
        if len(ready) == len(names):
            return ready
        if time.monotonic() > deadline:
            waiting = sorted(set(names) - set(ready))
            raise TopicError(f"topic(s) {', '.join(waiting)} have no leader for every partition after {timeout_s:g} s")
        await asyncio.sleep(0.2)


async def _cleanup_policies(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, str]:
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs={"cleanup.policy": None}) for name in names]
    policies: dict[str, str] = {}
    for response in await admin.describe_configs(resources):
        for code, message, _type, name, entries, *_ in response.resources:
            if code:
                raise TopicError(f"cannot read the configuration of topic {name}: {message or for_code(code).__name__}")
            policies[name] = next((entry[1] for entry in entries if entry[0] == "cleanup.policy"), "delete")
    return policies
