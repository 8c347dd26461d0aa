"""Builds the Faust App of a worker role from :class:`pgkd.settings.Settings`,
and declares every topic through one factory. Nothing else lives here.

Roles are separate apps (``<prefix>-classify``, ``<prefix>-teacher``): each is
its own consumer group, so classifier workers split ``texts.in`` among
themselves and never steal the teacher's partitions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields

import faust
from aiokafka.helpers import create_ssl_context

from pgkd.settings import Settings
from streams import metrics, transport
from streams.topics import COMPACTED, FIELDS

log = logging.getLogger(__name__)


class App(faust.App):
    """The ``faust.App`` of every worker, with three changes:

    - its consumer uses :mod:`streams.transport` (without it, records fetched
      during a rebalance at start-up were skipped, every rebalance
      redelivered what was acked since the last commit, and a trickle of
      records was fetched one or two at a time);
    - :meth:`before_consuming`: start-up work (a model load, clients) runs
      before the worker joins its consumer group. A worker that joined first
      held its partitions unanswered for as long as the load took (seconds to
      tens of seconds: every scale-out or restart stalled its share of the
      traffic), and one that then failed to load cost the group two rebalances;
    - its rebalances and assigned partitions are metrics (``pgkd_rebalances_total``,
      ``pgkd_assigned_partitions``): a group that keeps rebalancing (a crash loop,
      a worker too busy to heartbeat) answers late and repeats work.
    """

    fetch_wait_s = 0.0  # PGKD_KAFKA_FETCH_WAIT_S (build_app): streams.transport.gather_fetches

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._before_consuming: list[Callable[[], Awaitable[None]]] = []
        self.on_partitions_assigned.connect(self._count_assigned)

    def on_rebalance_start(self) -> None:
        super().on_rebalance_start()
        metrics.REBALANCES.inc()

    async def _count_assigned(self, sender: object, assigned: set, **kwargs: object) -> None:
        metrics.ASSIGNED_PARTITIONS.set(len(assigned))

    def before_consuming(self, fun: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Decorator: run ``await fun()`` when the worker starts, before its
        consumer joins the group (in the order registered). An exception stops the
        worker's start-up; the roles wrap their start in ``start_or_exit``."""
        self._before_consuming.append(fun)
        return fun

    async def on_first_start(self) -> None:
        # mode starts a service's children (the consumer among them) after on_first_start and on_start
        await super().on_first_start()
        for fun in self._before_consuming:
            await fun()

    def _new_transport(self) -> transport.Transport:
        urls = self.conf.broker_consumer
        if urls[0].scheme != "kafka":
            raise ValueError(f"streams.app.App speaks kafka:// only, not {urls[0].scheme}://")
        return transport.Transport(urls, self)


def _credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        ssl_context = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    credentials = faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=ssl_context,
    )
    # SASLCredentials pick SASL_SSL/SASL_PLAINTEXT from ssl_context; say it explicitly
    credentials.protocol = faust.types.auth.AuthProtocol(protocol)
    return credentials


def build_app(settings: Settings, role: str, **conf: object) -> App:
    """The Faust App of one worker role; ``conf``: Faust settings of that role
    (given here: set on ``app.conf`` later, Faust warns that parts may still use the old value).
    An :class:`App`: Faust with the rebalance fixes, the ``before_consuming`` hook and rebalance metrics."""
    app_id = f"{settings.app_id_prefix}-{role}"
    # Faust creates datadir without parents; it holds nothing for a memory store.
    datadir = settings.faust_datadir / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = App(
        app_id,
        broker=[f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        store="memory://",
        datadir=str(datadir),
        autodiscover=False,
        # at least once: every replica has a record before it counts as sent
        producer_acks=-1,
        # a new consumer group starts from the beginning: texts produced before
        # the first worker started are classified too
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=True,
        # the leader-assignor topic is for Faust tables; we have none
        topic_disable_leader=True,
        web_enabled=settings.web_enabled,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # a killed worker's partitions move to the others after this long
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 3),
        # a 1 MB input is legal Kafka; its dead letter is cut (dlq_max_original_bytes)
        producer_max_request_size=2 * 1024 * 1024,
        **conf,
    )
    app.fetch_wait_s = settings.kafka_fetch_wait_s  # read by streams.transport when the consumer is built
    return app


@dataclass(frozen=True)
class Topics:
    """Every topic of the product, declared on one App."""

    texts_in: faust.TopicT
    labels_out: faust.TopicT
    teacher_requests: faust.TopicT
    teacher_labels: faust.TopicT
    dlq: faust.TopicT
    retrain_requests: faust.TopicT
    model_updates: faust.TopicT

    async def declare_all(self) -> None:
        """Create every topic that does not exist yet (partitions and replication
        from settings). Called before an agent sends anything: a send to a
        missing topic would let the broker auto-create it with its own defaults."""
        await asyncio.gather(*(getattr(self, f.name).maybe_declare() for f in fields(self)))


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    """The one topic factory: names, partitions and replication from settings,
    compaction from ``streams.topics.COMPACTED`` (what ``pgkd topics create`` makes).

    Inputs the agents read (``texts.in``, ``teacher.requests``) are raw bytes,
    parsed by plain functions so a bad record becomes a dead letter; outputs are
    written as JSON Records with string keys.
    """

    def topic(field: str) -> faust.TopicT:
        return app.topic(
            getattr(settings, f"topic_{field}"),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.topic_partitions,
            replicas=settings.topic_replication,
            # internal: Faust creates it (the product owns all these topics)
            internal=True,
            # labels.out: the last record per id (the teacher's, when there is one) is the answer
            compacting=(field in COMPACTED) or None,
        )

    return Topics(**{field: topic(field) for field in FIELDS})
