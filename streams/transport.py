"""The Kafka transport of every worker's App (streams.app.App): Faust's aiokafka
transport with three fixes.

1. Records fetched during a rebalance at start-up were skipped.

Faust's consumer drops a batch that the fetcher returns while the flow is
stopped (during a rebalance and until recovery resumes it) and "seeks back to
the committed offsets" so that the batch is fetched again. aiokafka's
``seek_to_committed`` seeks only partitions whose committed offset is above 0:
on a partition with nothing committed yet, the position stays after the
dropped batch and those records are never delivered. It happens at start-up,
when a worker is still loading its model (nothing acked, nothing committed) and
a second rebalance follows the first (a worker joins or dies): the chaos test
lost 229 of 3,000 inputs that way (tests/integration/test_rebalance_at_startup.py
reproduces it with a plain agent).

The fix: after seeking to the committed offsets, a partition without one is
seeked the way ``consumer_auto_offset_reset`` says (earliest: its first
offset), as aiokafka does itself on a new assignment. Redelivery, not loss:
at least once.

2. Every rebalance redelivered what the worker had acked since its last commit
(up to the 2.8 s commit interval of traffic): Faust's consumer forgets the acked
offsets of the revoked partitions (all of them: Kafka's eager rebalance) before
it commits at a revoke, so that commit has nothing to commit
(faust-streaming#502). The fix commits what is acked first. The batches still
in flight are acked and committed after, as before (the App waits for them).
Every such commit first waits for a periodic commit that is running: Faust's
``commit()`` returns without committing when one is, and that one covers only
the acks from before it started.
A rolling restart of two classifiers answered 200 and 293 texts twice without it
(tests/integration/test_faults.py, the rolling-restart test).

3. A group whose leader's metadata lacked a subscribed topic at an assignment
served none of that topic's partitions for up to 5 minutes. The leader assigns
only the partitions its metadata knows, and aiokafka looks again only at its
periodic refresh (``metadata_max_age_ms``; aiokafka#486). A topic created a
moment before is not always in a broker's metadata yet: a fresh client missed 1
in 40 topics right after their CreateTopics answer on an idle broker. Workers
create their topics at start-up and join at once, so a fresh deployment could
start with every ``texts.in`` partition unassigned. CI met it: two classifiers
answered nothing for 180 s, one of them with an empty assignment.

The fix: after an assignment, a worker whose metadata lacks a subscribed topic
refreshes it (0.5 s, then backing off to 5 s) until the topic is known; the
leader's refresh shows aiokafka a changed topic and the group rebalances with
its partitions.

And one setting Faust does not expose: how long the broker may hold a fetch to
gather records (``PGKD_KAFKA_FETCH_WAIT_S``, :func:`gather_fetches`). Faust's
consumer asks for at least 1 byte, so under a steady trickle each fetch returned
one or two records, and the consumer thread spent a fifth of a core on fetches at
300 texts/s (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)


async def seek_to_committed_or_reset(consumer: AIOKafkaConsumer, reset: str) -> Mapping[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset; one without a
    committed offset (None, or 0, which aiokafka does not seek to) to its
    beginning (``reset="earliest"``) or end (``"latest"``). Returns the committed
    offsets, as ``AIOKafkaConsumer.seek_to_committed`` does."""
    committed = await consumer.seek_to_committed()
    uncommitted = sorted(tp for tp, offset in committed.items() if not offset)
    if uncommitted and reset in ("earliest", "latest"):
        log.debug("no committed offset on %s: seeking to the %s", uncommitted, reset)
        seek = consumer.seek_to_beginning if reset == "earliest" else consumer.seek_to_end
        await seek(*uncommitted)
    return committed


FETCH_MIN_BYTES = 64 * 1024  # a fetch is answered once this much has gathered, or after the wait


def gather_fetches(consumer: AIOKafkaConsumer, wait_s: float) -> AIOKafkaConsumer:
    """Let the broker hold ``consumer``'s fetches up to ``wait_s`` until
    :data:`FETCH_MIN_BYTES` have gathered (0: answer at the first byte, Faust's
    way). A backlog fills the minimum at once, so only a trickle waits. Set before
    the consumer starts (its fetcher reads them then); Faust builds the consumer
    with these two fixed, so they are set on it here."""
    if wait_s > 0:
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        consumer._fetch_max_wait_ms = max(1, round(wait_s * 1000))
    return consumer


def unknown_subscribed_topics(consumer: AIOKafkaConsumer) -> set[str]:
    """The topics ``consumer`` subscribes to that its metadata has no partitions of."""
    cluster = consumer._client.cluster
    return {topic for topic in consumer.subscription() if not cluster.partitions_for_topic(topic)}


async def refresh_until_topics_known(consumer: AIOKafkaConsumer, missing: set[str], first_wait_s: float = 0.5,
                                     max_wait_s: float = 5.0) -> None:
    """Refresh ``consumer``'s metadata, which lacked the subscribed topics
    ``missing``, until it knows every subscribed topic (fix 3): the group
    leader's refresh makes aiokafka rebalance with the new partitions. Returns
    once they are known or the consumer is closed."""
    log.warning("subscribed topics %s are not in this consumer's metadata: refreshing it until they are",
                sorted(missing))
    wait_s = first_wait_s
    while missing and not consumer._closed:
        await asyncio.sleep(wait_s)
        wait_s = min(2 * wait_s, max_wait_s)
        try:
            await asyncio.wait_for(consumer._client.force_metadata_update(), timeout=max_wait_s)
        except asyncio.TimeoutError:
            continue
        missing = unknown_subscribed_topics(consumer)
    if not missing:
        log.info("every subscribed topic is in this consumer's metadata now")


def watch_subscribed_topics(consumer: AIOKafkaConsumer, watch: asyncio.Task | None) -> asyncio.Task | None:
    """Called at every assignment, on the loop ``consumer`` runs on: a task of
    :func:`refresh_until_topics_known` when a subscribed topic is unknown and
    ``watch`` (the task started before, if any) is not still at it."""
    if watch is not None and not watch.done():
        return watch
    missing = unknown_subscribed_topics(consumer)
    return asyncio.ensure_future(refresh_until_topics_known(consumer, missing)) if missing else None


class _RebalanceListener(faust_aiokafka.ConsumerRebalanceListener):
    def __init__(self, thread: faust_aiokafka.AIOKafkaConsumerThread) -> None:
        super().__init__(thread)
        self.watch: asyncio.Task | None = None

    async def on_partitions_assigned(self, assigned) -> None:
        self.watch = watch_subscribed_topics(self._thread._ensure_consumer(), self.watch)
        await super().on_partitions_assigned(assigned)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> AIOKafkaConsumer:
        return gather_fetches(super()._create_worker_consumer(transport), self.app.fetch_wait_s)

    async def seek_to_committed(self) -> Mapping[TopicPartition, int | None]:
        reset = self.app.conf.consumer_auto_offset_reset
        return await self.call_thread(seek_to_committed_or_reset, self._ensure_consumer(), reset)

    async def on_thread_stop(self) -> None:
        watch = self._rebalance_listener.watch
        if watch is not None:
            watch.cancel()
        await super().on_thread_stop()


class _Consumer(faust_aiokafka.Consumer):
    RebalanceListener = _RebalanceListener

    def _new_consumer_thread(self) -> _ConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_partitions_revoked(self, revoked: set) -> None:
        # before Faust drops the acked offsets of the revoked partitions (fix 2)
        await self.commit_acked()
        await super().on_partitions_revoked(revoked)

    async def commit_and_end_transactions(self) -> None:
        # Faust's last commit at a revoke and at a stop, after the streams are empty
        await self.commit_acked()

    async def commit_acked(self) -> None:
        """Commit every offset acked so far (also before a worker exits on a hung model:
        streams.delivery.commit_then_exit)."""
        # commit() returns without committing when another commit is running (the
        # periodic one): that one covers only the acks from before it started
        await self.maybe_wait_for_commit_to_finish()
        await self.commit(start_new_transaction=False)


class Transport(faust_aiokafka.Transport):
    """``kafka://`` with :class:`_Consumer` (all three fixes)."""

    Consumer = _Consumer
