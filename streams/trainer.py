"""The trainer worker: ``retrain.requests`` -> one retrain round each -> the
registry (publish; promote when the gate passes) -> ``model.updates``.

Run it with ``pgkd worker trainer`` or ``faust -A streams.trainer worker``. The
round itself is :class:`pgkd.retrain.RoundRunner` (train, gate, publish,
promote, record); this module adds the single-trainer lock, the samples from
Redis, the announcement and the metrics.

One round at a time across all trainers: a Redis lock with a TTL, renewed while
the holder lives, so a second trainer waits and a killed trainer's successor
takes over after ``PGKD_TRAINER_LOCK_TTL_S``. Requests are read one at a time
and acknowledged after their outcome is recorded, so a trainer killed
mid-round gets the request again on restart (and :class:`RoundRunner` retries
or records it as failed).

The training runs on a thread of its own: the event loop keeps heartbeating
the consumer group and renewing the lock while a round takes minutes. Faust's
max poll interval is raised to ``PGKD_TRAINER_ROUND_TIMEOUT_S`` so a long round
never counts as a dead consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import faust
import redis

from pgkd.curation import SampleStore
from pgkd.registry import Registry
from pgkd.retrain import (
    RoundConfig,
    RoundLedger,
    RoundResult,
    RoundRunner,
    SeedData,
    TrainerLock,
    consecutive_rejections,
    gate_margins,
)
from pgkd.settings import Settings, load_settings
from pgkd.teacher_cache import connect
from streams import metrics
from streams.announce import update_record
from streams.app import Topics, build_app, declare_topics
from streams.delivery import Incoming, run_batches, send, start_or_exit
from streams.schemas import DeadLetter, RetrainRequest

log = logging.getLogger(__name__)


class TrainerWorker:
    """The worker's state: the registry, the seed data, the lock, the training thread."""

    def __init__(self, settings: Settings, topics: Topics):
        self.settings = settings
        self.topics = topics
        self.started = False
        # one thread: rounds are sequential; torch parallelises inside (PGKD_TORCH_THREADS)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgkd-train")

    async def start(self) -> None:
        if self.started:  # the agent restarts on rebalances
            return
        s = self.settings
        loop = asyncio.get_running_loop()
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        seed = await loop.run_in_executor(self._executor, SeedData.from_settings, s)
        self.cfg = RoundConfig.from_settings(s)
        self.registry = Registry.from_settings(s)
        url = s.redis_url.get_secret_value()
        ledger_client = redis.Redis.from_url(url, socket_timeout=max(5.0, s.redis_timeout_s), decode_responses=True)
        self.runner = RoundRunner(self.registry, RoundLedger(ledger_client, s.app_id_prefix), seed, self.cfg,
                                  max_attempts=s.trainer_max_attempts, claim_ttl_s=s.trainer_round_timeout_s)
        client = connect(url, max(5.0, s.redis_timeout_s))
        self.samples = SampleStore(client, s.app_id_prefix)
        self.lock = TrainerLock(client, s.app_id_prefix, s.trainer_lock_ttl_s)
        await loop.run_in_executor(self._executor, self._export_serving)
        self.started = True
        log.info("trainer: %s mode, %d seed / %d validation texts, lr %g, up to %d epochs, gate %s",
                 self.cfg.mode, len(seed.train), len(seed.val), self.cfg.train.lr, self.cfg.train.epochs,
                 self.cfg.gate)

    async def handle(self, batch: Sequence[Incoming]) -> None:
        for msg in batch:
            request = RetrainRequest.parse(msg.value)
            if isinstance(request, str):
                log.error("unreadable retrain request at %s:%d:%d: %s", msg.topic, msg.partition, msg.offset, request)
                metrics.DLQ.labels("bad_request", "trainer").inc()
                letter = DeadLetter.of(stage="trainer", reason="bad_request", error=request, topic=msg.topic,
                                       partition=msg.partition, offset=msg.offset, value=msg.value, ts=msg.ts,
                                       max_original_bytes=self.settings.dlq_max_original_bytes)
                await send(self.topics.dlq, letter.key(), letter.dumps())
                continue
            await self.run(request)

    async def run(self, request: RetrainRequest) -> RoundResult:
        """One request under the single-trainer lock; announce a promotion."""
        await self._acquire()
        renewer = asyncio.create_task(self._renew())
        loop = asyncio.get_running_loop()
        try:
            samples = await self.samples.read(upto=request.samples_upto)
            log.info("retrain request %s: round %d (%s), %d samples up to %s", request.request_id, request.round,
                     request.trigger, len(samples), request.samples_upto)
            result = await loop.run_in_executor(self._executor, self.runner.process, request.asdict(), samples)
        finally:
            renewer.cancel()
            await self.lock.release()
        if result.promotion is not None:
            record = update_record(result.promotion)
            await send(self.topics.model_updates, self.settings.app_id_prefix, json.dumps(record).encode())
            log.info("announced %s on %s", record["version"], self.settings.topic_model_updates)
        if result.record is not None:
            await loop.run_in_executor(self._executor, self._export_round, result)
        return result

    async def _acquire(self) -> None:
        waiting = False
        while not await self.lock.try_acquire():
            if not waiting:
                log.info("another trainer (%s) is running a round; waiting", await self.lock.holder())
                waiting = True
            await asyncio.sleep(min(2.0, self.lock.ttl_s / 3))
        if waiting:
            log.info("trainer lock acquired")

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lock.ttl_s / 3)
            try:
                if not await self.lock.renew():
                    log.critical("lost the trainer lock (it lapsed); another trainer may start a round")
                    return
            except (redis.RedisError, OSError) as err:
                log.warning("renewing the trainer lock failed: %s", err)

    # --- metrics (on the training thread: the registry client is synchronous) ---------------

    def _export_round(self, result: RoundResult) -> None:
        record = result.record
        metrics.RETRAIN_ROUNDS.labels(record["outcome"]).inc()
        if record["outcome"] != "failed":
            for model in ("candidate", "current"):
                metrics.GATE_MACRO_F1.labels(model).set(record["metrics"][model]["macro_f1"])
            for name, value in gate_margins(record.get("gate")).items():
                metrics.GATE_MARGIN.labels(name).set(value)
            if record.get("train"):
                metrics.RETRAIN_SECONDS.observe(record["train"]["seconds"])
            used = (record.get("train") or {}).get("features")
            if used:
                metrics.RETRAIN_FEATURES.labels("encoder").inc(used["encoded"])
                metrics.RETRAIN_FEATURES.labels("cache").inc(used["cached"])
        if self.runner.features is not None:
            metrics.FEATURE_CACHE_BYTES.set(self.runner.features.nbytes)
        self._export_serving()

    def _export_serving(self) -> None:
        """Gauges of the serving version (its manifest) and of the rounds so far."""
        metrics.GATE_CONSECUTIVE_REJECTIONS.set(consecutive_rejections(self.registry.rounds(1000)))
        current = self.registry.current()
        if current is None:
            return
        manifest = self.registry.manifest(current)
        metrics.CURRENT_MODEL_ROUND.set(manifest.get("round") or 0)
        per_class = (manifest.get("metrics") or {}).get("per_class") or {}
        metrics.CLASS_F1.clear()
        for label, row in per_class.items():
            metrics.CLASS_F1.labels(label).set(row["f1"])


settings = load_settings()
# A round holds the agent for minutes; Faust's consumer keeps heartbeating meanwhile,
# and a round may take up to the round timeout between two polls of this agent.
_faust = faust.Settings
app = build_app(settings, "trainer",
                broker_max_poll_interval=max(_faust.broker_max_poll_interval.default, settings.trainer_round_timeout_s),
                broker_commit_livelock_soft_timeout=max(_faust.broker_commit_livelock_soft_timeout.default,
                                                        settings.trainer_round_timeout_s))
topics = declare_topics(app, settings)
trainer = TrainerWorker(settings, topics)


@app.agent(topics.retrain_requests)
async def retrain(stream):
    """retrain.requests, one at a time -> a round -> the registry (+ model.updates on promotion)."""
    await topics.declare_all()
    await start_or_exit(trainer.start, "trainer")
    await run_batches(stream, 1, 1.0, trainer.handle, "trainer")


@app.task
async def serve_metrics() -> None:
    metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)
