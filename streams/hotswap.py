"""Hot swap: a classifier worker follows the registry's current version.

Every classifier worker must see every announcement, whatever its consumer
group, so :class:`ModelWatcher` reads ``model.updates`` with a plain consumer
*without a group*: it assigns itself every partition and starts at their end
(announcements before the worker started are history; the worker loaded the
registry's current version at start). On an announcement, and every
``PGKD_MODEL_POLL_S`` seconds in case one was missed, it reads the pointer in
Redis (the truth; the record's version only when Redis does not answer), loads
and warms that version on its own thread while batches go on with the old
model, and hands it to ``swap`` between batches. The version it replaced stays in
memory (``PGKD_KEEP_PREVIOUS_MODEL``): swapping back to it, a rollback, loads
nothing. That thread runs at a lower
CPU priority (:data:`LOAD_NICE`): on cores it shares with inference, the load
takes longer instead of slowing the batches in flight (docs/BENCHMARKS.md,
hot swap).

A version whose files do not match their checksums (or that cannot be loaded,
or whose load does not finish within ``PGKD_MODEL_LOAD_TIMEOUT_S``) is refused:
logged, counted in ``pgkd_model_load_failures_total{reason}``, and the old
version keeps serving. A refused version is not retried by the poll, only when
it is announced again. A load that timed out cannot be stopped: its thread is
abandoned and the next load runs on a new one.

A record that is not an announcement (not JSON, not an object, no v0001-style
``version``) is skipped: logged, counted in
``pgkd_model_updates_skipped_total{reason}``, and the watcher follows on. It
never stops the follow loop, so it is never read twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from pgkd.errors import ModelIntegrityError, ModelError, RegistryError, RegistryUnavailable
from pgkd.inference import load_json
from pgkd.priority import lower_thread_priority
from pgkd.registry import VERSION_RE, Registry
from pgkd.serving import WARMUP_TEXT, ServingModel, load_version
from streams import metrics
from streams.topics import ensure_topics, kafka_kwargs

if TYPE_CHECKING:
    from pgkd.settings import Settings

log = logging.getLogger(__name__)

LOAD_FAILURE_REASONS = ("checksum", "not_found", "load_error", "timeout")
SKIP_REASONS = ("not_json", "not_object", "bad_version")  # pgkd_model_updates_skipped_total{reason}
RESTART_DELAY_S = 5.0
# Added to the load thread's nice value. Loading, checksumming, quantizing and
# warming a version takes about a core for a second; at equal priority it halved
# the inference thread's share on 2 cores and doubled the batch time during
# the swap. At +10 the scheduler gives inference ~9x the load's share when both
# want the core; the old model serves meanwhile, so a slower load costs nothing.
LOAD_NICE = 10


def read_update(value: bytes | None) -> dict | tuple[str, str]:
    """A ``model.updates`` value -> the announcement, or ``(reason, detail)``
    when it is not one (reason from :data:`SKIP_REASONS`).

    >>> read_update(b'{"action": "promote", "version": "v0003", "ts": 5.0}')["version"]
    'v0003'
    >>> read_update(b'{"action": "promote", "version": 3}')
    ('bad_version', 'expected a v0001-style version name, got 3')
    >>> read_update(b'[1]')[0]
    'not_object'
    """
    try:
        record = load_json(value or b"")
    except ValueError as err:  # not JSON, not UTF-8, NaN, nested too deep
        return "not_json", f"not JSON: {err}"
    if not isinstance(record, dict):
        return "not_object", f"expected a JSON object, got {type(record).__name__}"
    version = record.get("version")
    if not isinstance(version, str) or not VERSION_RE.match(version):
        return "bad_version", f"expected a v0001-style version name, got {version!r:.40}"
    return record


def _announced_at(record: dict) -> float:
    """The record's ts for ordering (finite and bounded: :func:`read_update` used load_json); 0 when no number."""
    ts = record.get("ts")
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0


def failure_reason(err: Exception) -> str:
    """The metric label of a refused version.

    >>> failure_reason(ModelIntegrityError("v0003 refused: model.safetensors does not match its sha256"))
    'checksum'
    >>> failure_reason(RegistryError("no version v0009 in the model store models"))
    'not_found'
    >>> failure_reason(TimeoutError("its load did not finish in 600 s"))
    'timeout'
    """
    if isinstance(err, ModelIntegrityError):
        return "checksum"
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, RegistryError):
        return "not_found"
    return "load_error"


def _load_executor() -> ThreadPoolExecutor:
    """The thread a watcher loads on (and reads the registry pointer from): its own, so a
    load never waits behind inference nor inference behind a load; at a lower priority,
    so that a load uses what CPU inference leaves."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgkd-model-load",
                              initializer=lower_thread_priority, initargs=(LOAD_NICE,))


class ModelWatcher:
    """Keeps a worker on the registry's current version.

    Args:
        settings: the worker's settings (Kafka, Redis, model store, topic).
        served: the version the worker serves now (None until its first model is loaded).
        swap: installs a loaded, warmed model; called on the event loop, between batches;
            returns the model it replaced (kept for a rollback), or None.
        loader: ``(settings, version) -> ServingModel`` (tests pass a fake).
    """

    def __init__(
        self,
        settings: Settings,
        served: Callable[[], str | None],
        swap: Callable[[ServingModel], ServingModel | None],
        loader: Callable[[Settings, str], ServingModel] = load_version,
    ):
        self.settings = settings
        self.served = served
        self.swap = swap
        self.loader = loader
        self.refused: set[str] = set()
        self._executor = _load_executor()
        self._registry = Registry.from_settings(settings)
        # the version the last swap replaced (PGKD_KEEP_PREVIOUS_MODEL): a rollback to it is one assignment
        self._standby: ServingModel | None = None

    async def run_forever(self) -> None:
        """:meth:`run`, restarted after a failure (the broker away, a bug): the
        worker keeps serving its model meanwhile."""
        while True:
            try:
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - log, wait, follow again; never take the worker down
                log.exception("following %s failed; again in %.0fs", self.settings.topic_model_updates,
                              RESTART_DELAY_S)
                await asyncio.sleep(RESTART_DELAY_S)

    async def run(self) -> None:
        topic = self.settings.topic_model_updates
        (state,) = await ensure_topics(self.settings, ("model_updates",))
        partitions = [TopicPartition(topic, p) for p in range(state.partitions)]
        consumer = AIOKafkaConsumer(**kafka_kwargs(self.settings), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="latest")
        await consumer.start()
        try:
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            log.info("following %s (%d partitions, no consumer group)", topic, len(partitions))
            while self.served() is None:  # the worker's first model is still loading
                await asyncio.sleep(0.1)
            await self.reconcile("start")
            poll_s = self.settings.model_poll_s
            last = time.monotonic()
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                records = self.announcements(r for rs in batches.values() for r in rs)
                if records:
                    latest = max(records, key=_announced_at)
                    log.info("model.updates: %s %s (reason: %s)", latest.get("action"), latest.get("version"),
                             latest.get("reason"))
                    await self.reconcile("announced", announced=latest.get("version"))
                    last = time.monotonic()
                elif poll_s and time.monotonic() - last >= poll_s:
                    await self.reconcile("poll")
                    last = time.monotonic()
        finally:
            await consumer.stop()

    def announcements(self, consumed: Iterable[ConsumerRecord]) -> list[dict]:
        """The readable announcements among consumed records; the others are
        logged, counted and skipped (empty values are compaction tombstones: ignored)."""
        records = []
        for r in consumed:
            if not r.value:
                continue
            update = read_update(r.value)
            if isinstance(update, tuple):
                reason, detail = update
                metrics.MODEL_UPDATES_SKIPPED.labels(reason).inc()
                log.warning("skipping %s:%d:%d (%s): %s", r.topic, r.partition, r.offset, reason, detail)
                continue
            records.append(update)
        return records

    async def reconcile(self, why: str, announced: str | None = None) -> bool:
        """Swap to the registry's current version if the worker serves another;
        True when it swapped."""
        loop = asyncio.get_running_loop()
        try:
            target = await loop.run_in_executor(self._executor, self._registry.current)
        except RegistryUnavailable as err:
            log.warning("%s; following the announcement (%s) instead", err, announced)
            target = announced
        if target is None or target == self.served():
            return False
        if why == "poll" and target in self.refused:
            return False  # refused before; retried when it is announced again
        started = time.perf_counter()
        standby, self._standby = self._standby, None
        if standby is not None and standby.version == target:
            model, how = standby, "kept in memory"  # verified and warmed when it was loaded
        else:
            del standby  # not the target: let it go before loading another
            log.info("loading %s (%s; serving %s)", target, why, self.served())
            try:
                model = await self._bounded(loop.run_in_executor(self._executor, self._load_and_warm, target), target)
            except (ModelError, RegistryError, OSError, RuntimeError, ValueError) as err:  # TimeoutError is an OSError
                reason = failure_reason(err)
                metrics.MODEL_LOAD_FAILURES.labels(reason).inc()
                self.refused.add(target)
                log.error("refused model %s (%s): %s; still serving %s", target, reason, err, self.served())
                return False
            how = "loaded and warmed"
        self.refused.discard(target)
        previous = self.served()
        replaced = self.swap(model)
        if self.settings.keep_previous_model and isinstance(replaced, ServingModel):
            self._standby = replaced
        log.info("swapped %s -> %s (%s in %.1fs)", previous, model.version, how, time.perf_counter() - started)
        return True

    async def _bounded(self, load: asyncio.Future, version: str) -> ServingModel:
        """``load``'s model, or TimeoutError after PGKD_MODEL_LOAD_TIMEOUT_S. A thread
        cannot be stopped: the stuck one is abandoned (whatever it returns later is
        dropped) and the watcher goes on with a new one."""
        limit = self.settings.model_load_timeout_s
        if not limit:
            return await load
        try:
            return await asyncio.wait_for(asyncio.shield(load), limit)
        except TimeoutError:
            load.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nothing logged at exit
            stuck, self._executor = self._executor, _load_executor()
            stuck.shutdown(wait=False)
            raise TimeoutError(f"its load did not finish in {limit:g} s (PGKD_MODEL_LOAD_TIMEOUT_S); "
                               "that thread is abandoned") from None

    def _load_and_warm(self, version: str) -> ServingModel:
        model = self.loader(self.settings, version)
        model.student.predict_proba([WARMUP_TEXT], batch_size=1)
        return model

    def close(self) -> None:
        self._registry.close()
        self._executor.shutdown(wait=False)
