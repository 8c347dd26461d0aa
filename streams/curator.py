"""The curator: ``teacher.labels`` -> training samples in Redis -> a retrain
request on ``retrain.requests`` when a batch is full.

Run it with ``pgkd worker curator`` or ``faust -A streams.curator worker``.

Per batch of teacher labels: live per-class statistics (teacher count,
student-teacher agreement), then each label becomes a training sample unless
its text was accepted before, is in the seed training set, or is in the
validation/test sets (``pgkd.curation``). When the open batch is full
(``PGKD_CURATOR_BATCH_SIZE`` samples), old enough (``PGKD_CURATOR_BATCH_WINDOW_S``)
or a drift alarm is newer than the last request, the curator closes it: it
ranks the weakest classes (the current version's validation report and the
live disagreement), mines hard negatives from the batch, asks the teacher for
``PGKD_CURATOR_GENERATE`` samples of those classes with the PGKD prompt, stores
the valid ones, and publishes a retrain request. With the teacher budget spent
(or the teacher failing) it publishes the request without generated samples
and says why in ``generation.skipped``.

Delivery: a teacher.labels batch is acknowledged only after its samples are in
Redis (and a request it completed is on the broker). A curator killed mid-close
resumes the same close (same request id and round) when it restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence

from pgkd.curation import (
    BatchPolicy,
    Closing,
    CuratorState,
    Sample,
    live_report,
    mine_from_samples,
    pick_weakest,
)
from pgkd.errors import BudgetExhausted, ModelIntegrityError, RegistryError, TeacherError
from pgkd.registry import Registry
from pgkd.retrain import SeedData
from pgkd.serving import load_taxonomy
from pgkd.settings import Settings, load_settings
from pgkd.teacher import OpenAITeacher
from pgkd.teacher_cache import SpendLedger, connect
from streams import metrics
from streams.app import Topics, build_app, declare_topics
from streams.delivery import Incoming, run_batches, send, start_or_exit
from streams.drift_metrics import alarm_key
from streams.schemas import RetrainRequest, TeacherLabel

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0  # how often the window and drift triggers are checked without new labels


class Curator:
    """The worker's state: the seed data's guard, the Redis state, the teacher budget."""

    def __init__(self, settings: Settings, topics: Topics):
        self.settings = settings
        self.topics = topics
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.policy = BatchPolicy(settings.curator_batch_size, settings.curator_batch_window_s,
                                  settings.curator_drift_trigger)
        self._lock = asyncio.Lock()  # the agent and the timer both close batches
        self.started = False

    async def start(self) -> None:
        if self.started:
            return
        s = self.settings
        seed = await asyncio.to_thread(SeedData.from_settings, s)
        self.guard = seed.guard()
        # the teacher's own answer check drops these as known_text
        self.known_texts = [*seed.train.texts, *seed.val.texts, *(seed.test.texts if seed.test else ())]
        self.taxonomy = await asyncio.to_thread(load_taxonomy, s)
        self.registry = Registry.from_settings(s)
        client = connect(s.redis_url.get_secret_value(), max(5.0, s.redis_timeout_s))
        self.redis = client
        self.state = CuratorState(client, s.app_id_prefix)
        on_error = lambda op: metrics.REDIS_ERRORS.labels(op).inc()  # noqa: E731
        self.ledger = SpendLedger(client, s.teacher_budget_usd, s.app_id_prefix, on_error)
        self.started = True
        log.info("curator: %d classes, batch of %d samples / %gs window / drift %s, %d generated per batch; "
                 "%d seed and %d validation/test texts guarded", len(self.taxonomy), s.curator_batch_size,
                 s.curator_batch_window_s, "on" if s.curator_drift_trigger else "off", s.curator_generate,
                 len(self.guard.train), len(self.guard.evaluation))
        if await self.state.closing() is not None:
            log.warning("a batch close was interrupted; resuming it")
            await self.maybe_close()

    # --- teacher labels -> samples ----------------------------------------------------

    async def handle(self, batch: Sequence[Incoming]) -> None:
        """Store one batch of teacher labels as samples; close the batch when full."""
        dropped: Counter[str] = Counter()
        records: list[TeacherLabel] = []
        for msg in batch:
            record = TeacherLabel.parse(msg.value)
            if isinstance(record, str):
                log.warning("skipping %s:%d:%d: %s", msg.topic, msg.partition, msg.offset, record)
                dropped["bad_record"] += 1
            elif record.label not in self.taxonomy:
                dropped["outside_taxonomy"] += 1
            else:
                records.append(record)
        await self.state.count_labels((r.label, r.label == r.student_label) for r in records)
        now = time.time()
        for r in records:
            reason = self.guard.check(r.text)
            if reason is None:
                sample = Sample(id=r.id, text=r.text, label=r.label, source="teacher", teacher_model=r.teacher_model,
                                model_version=r.model_version, ts=now, student_label=r.student_label,
                                student_confidence=r.student_confidence)
                reason = None if await self.state.accept(sample) else "duplicate"
            if reason is None:
                metrics.SAMPLES_GATHERED.labels(r.label, "teacher").inc()
            else:
                dropped[reason] += 1
        for reason, n in dropped.items():
            metrics.SAMPLES_DROPPED.labels(reason).inc(n)
        await self.maybe_close()

    # --- closing a batch --------------------------------------------------------------

    async def maybe_close(self) -> dict | None:
        """Close the open batch if a trigger fired (or finish an interrupted close);
        returns the published request."""
        async with self._lock:
            closing = await self.state.closing()
            trigger = None
            if closing is None:
                pending, opened_at = await self.state.batch()
                last = await self.state.last_request()
                trigger = self.policy.trigger(pending, opened_at, time.time(), await self._drift_ts(),
                                              last["ts"] if last else None)
                if trigger is None:
                    return None
            # one curator closes a batch at a time: the lock is renewed while the close runs (a close
            # that waits minutes for the teacher keeps it) and lapses PGKD_CURATOR_CLOSE_LOCK_TTL_S after
            # a killed holder's last renewal; its successor then resumes the close
            if not await self.state.lock_close(self.owner, self.settings.curator_close_lock_ttl_s):
                return None  # another curator is closing it
            renewing = asyncio.create_task(self._keep_close_lock())
            try:
                return await self._close(await self.state.closing(), trigger)
            finally:
                renewing.cancel()
                await self.state.unlock_close(self.owner)

    async def _keep_close_lock(self) -> None:
        ttl = self.settings.curator_close_lock_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if not await self.state.renew_close(self.owner, ttl):
                    log.warning("the batch close lock lapsed while closing (Redis slow or away)")
            except Exception:  # noqa: BLE001 - the close goes on; the lock may lapse, the close is resumable
                log.warning("could not renew the batch close lock", exc_info=True)

    async def _close(self, closing: Closing | None, trigger: str | None) -> dict | None:
        if closing is None:
            pending, opened_at = await self.state.batch()
            if pending <= 0 or trigger is None:
                return None  # another curator closed it meanwhile
            last = await self.state.last_request()
            round_no = await asyncio.to_thread(self.registry.next_round)
            closing = Closing(
                request_id=f"{self.settings.app_id_prefix}-round-{round_no}", round=round_no, trigger=trigger,
                teacher=pending, opened_at=opened_at, since=last["samples_upto"] if last else "0-0",
                model_version=await asyncio.to_thread(self.registry.current),
            )
            await self.state.save_closing(closing)
            log.info("closing batch for round %d (%s): %d teacher samples", round_no, trigger, pending)
        if closing.generation is None:
            closing.generation, closing.target_classes = await self._generate(closing)
            await self.state.save_closing(closing)
        totals = await self.state.totals()
        request = RetrainRequest(
            request_id=closing.request_id, round=closing.round, samples_upto=await self.state.last_id(),
            since=closing.since, trigger=closing.trigger,
            counts={"teacher": closing.teacher, "generated": closing.generation["accepted"],
                    "total_teacher": totals["teacher"], "total_generated": totals["generated"]},
            target_classes=closing.target_classes, generation=closing.generation,
            model_version=closing.model_version, ts=time.time(),
        )
        await send(self.topics.retrain_requests, request.request_id, request.dumps())
        await self.state.finish_closing(closing, request.asdict())
        skipped = closing.generation.get("skipped")
        log.info("published retrain request %s: round %d, %d teacher + %d generated samples%s",
                 request.request_id, request.round, closing.teacher, closing.generation["accepted"],
                 f" (no generation: {skipped})" if skipped else "")
        return request.asdict()

    async def _generate(self, closing: Closing) -> tuple[dict, list[str]]:
        """Ask the teacher for samples of the weakest classes; store the valid ones.
        Returns the generation summary (``skipped`` says why nothing was asked) and the targets."""
        s = self.settings
        summary = {"requested": 0, "accepted": 0, "rejected": {}, "cost_usd": 0.0, "skipped": None}
        if s.curator_generate == 0:
            return {**summary, "skipped": "PGKD_CURATOR_GENERATE=0"}, []
        report = await asyncio.to_thread(self._current_report, closing.model_version)
        stats = await self.state.class_stats()
        targets = pick_weakest(report, stats, s.curator_target_classes, s.curator_min_class_count)
        if not targets:
            return {**summary, "skipped": "no class to target yet (no validation report, no teacher labels)"}, []
        budget, spent = await self.ledger.budget(), await self.ledger.spent()
        if spent >= budget:
            return {**summary, "skipped": f"teacher budget exhausted (${spent:.4f} of ${budget:g} spent)"}, targets
        batch_samples = [x for x in await self.state.read(since=closing.since) if x.source == "teacher"]
        mined = mine_from_samples(batch_samples, self.taxonomy, s.curator_n_examples, seed=closing.round)
        # the ledger books the call's worst-case cost first and settles it after (no overshoot)
        teacher = OpenAITeacher.from_settings(s, self.taxonomy, concurrency=1, budget_usd=None, spend=self.ledger)
        try:
            gen = await teacher.agenerate(report or live_report(stats), mined, targets, s.curator_generate,
                                          known_texts=self.known_texts)
        except BudgetExhausted as err:
            return {**summary, "skipped": f"teacher budget exhausted: {err}"}, targets
        except TeacherError as err:
            log.warning("generation for round %d failed: %s", closing.round, err)
            return {**summary, "requested": s.curator_generate, "skipped": f"generation failed: {err}"}, targets
        finally:
            summary["cost_usd"] = round(teacher.usage.cost_usd, 6)
            await teacher.aclose()

        rejected: Counter[str] = Counter(gen.rejected)
        now, accepted = time.time(), 0
        for i, (text, label) in enumerate(zip(gen.samples.texts, gen.samples.labels, strict=True)):
            reason = self.guard.check(text)
            if reason is None:
                sample = Sample(id=f"gen-{closing.request_id}-{i}", text=text, label=label, source="generated",
                                teacher_model=s.teacher_model, model_version=closing.model_version or "", ts=now,
                                request_id=closing.request_id)
                reason = None if await self.state.accept(sample) else "duplicate"
            if reason is None:
                accepted += 1
                metrics.SAMPLES_GATHERED.labels(label, "generated").inc()
            else:
                rejected[reason] += 1
        for reason, n in rejected.items():
            metrics.SAMPLES_DROPPED.labels(reason).inc(n)
        log.info("round %d: the teacher wrote %d samples for %s; %d accepted (dropped: %s)", closing.round,
                 len(gen.samples), ", ".join(targets), accepted, dict(rejected) or "none")
        return {**summary, "requested": s.curator_generate, "accepted": accepted, "rejected": dict(rejected)}, targets

    def _current_report(self, version: str | None) -> dict | None:
        """The validation report in the version's manifest (None when it has no per-class rows)."""
        if version is None:
            return None
        try:
            metrics_ = self.registry.manifest(version).get("metrics") or {}
        except (RegistryError, ModelIntegrityError) as err:
            log.warning("no validation report for %s: %s", version, err)
            return None
        return metrics_ if metrics_.get("per_class") else None

    async def _drift_ts(self) -> float | None:
        if not self.settings.curator_drift_trigger:
            return None
        raw = await self.redis.get(alarm_key(self.settings.app_id_prefix))
        try:
            return float(json.loads(raw)["ts"]) if raw else None
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable drift alarm: %r", raw[:200])
            return None


settings = load_settings()
app = build_app(settings, "curator")
topics = declare_topics(app, settings)
curator = Curator(settings, topics)


@app.agent(topics.teacher_labels)
async def curate(stream):
    """Batches of teacher.labels -> samples in Redis -> retrain.requests when a batch closes."""
    await topics.declare_all()
    await start_or_exit(curator.start, "curator")
    await run_batches(stream, 256, 1.0, curator.handle, "curator")


@app.timer(interval=CHECK_EVERY_S)
async def check_triggers() -> None:
    """The window and drift triggers fire without new teacher labels too."""
    if curator.started:
        try:
            await curator.maybe_close()
        except Exception:  # noqa: BLE001 - the next tick tries again; the agent path exits on its own failures
            log.exception("closing a batch from the timer failed")


@app.task
async def serve_metrics() -> None:
    metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)
