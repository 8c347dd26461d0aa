"""The teacher worker: ``teacher.requests`` -> LLM teacher -> ``teacher.labels``
and the corrected ``labels.out`` record (``source="teacher"``).

Run it with ``pgkd worker teacher`` or ``faust -A streams.teacher_agent worker``.

Per batch: each distinct text is looked up in the Redis cache; the misses go
to the teacher in requests of ``teacher_batch_size`` texts, at most
``teacher_concurrency`` at once, under the requests/tokens-per-minute limiter
and the spend budget. A request that still fails after the client's retries
sends its texts to ``texts.dlq`` (stage "teacher", with the reason).

Budget: every call's worst-case cost (``max_tokens`` and the prompt's size) is
booked in the shared ledger before it is made and settled to the real cost
after (:meth:`pgkd.teacher_cache.SpendLedger.reserve`), so all teacher workers
and the curator together never spend past the budget. When the next call's
booking does not fit, the budget counts as exhausted.

Budget exhausted: the worker stops calling, records why (log, the
``pgkd_teacher_budget_exhausted`` gauge, ``<prefix>:teacher:budget_status`` in
Redis) and *holds the batch without acknowledging it*. Kafka keeps the backlog:
the consumer stops fetching once Faust's buffer is full, the group's committed
offset stays before the held requests, and a restart redelivers them. Raising
the budget (``SET <prefix>:teacher:budget_usd`` in Redis, or a restart with a
higher ``PGKD_TEACHER_BUDGET_USD``) resumes where it stopped. Parking requests
on another topic would also work but adds a topic to replay by hand; pausing
keeps the order and needs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

from pgkd.errors import BudgetExhausted, TeacherError
from pgkd.labelling import CACHED_USAGE, chunks, distinct_texts, error_reason, request_tokens, usage_share
from pgkd.ratelimit import RateLimiter
from pgkd.registry import redact_url
from pgkd.serving import load_taxonomy
from pgkd.settings import Settings, load_settings
from pgkd.teacher import OpenAITeacher, Usage
from pgkd.teacher_cache import CachedLabel, SpendLedger, TeacherCache, connect
from streams import metrics
from streams.app import Topics, build_app, declare_topics
from streams.delivery import Incoming, run_batches, send, start_or_exit
from streams.schemas import DeadLetter, LabelOut, TeacherLabel, TeacherRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    label: str
    teacher_model: str
    labelled_at: float
    usage: dict


class TeacherWorker:
    """The worker's state: the teacher clients, the cache, the budget, the limiter."""

    def __init__(self, settings: Settings, topics: Topics, taxonomy: list[str]):
        self.settings = settings
        self.topics = topics
        self.taxonomy = taxonomy
        self._started = False
        self._exhausted = False

    async def start(self) -> None:
        if self._started:
            return
        s = self.settings
        on_error = lambda op: metrics.REDIS_ERRORS.labels(op).inc()  # noqa: E731
        self.redis = connect(s.redis_url.get_secret_value(), s.redis_timeout_s)
        self.cache = TeacherCache(self.redis, self.taxonomy, s.teacher_cache_ttl_s, s.app_id_prefix, on_error)
        self.ledger = SpendLedger(self.redis, s.teacher_budget_usd, s.app_id_prefix, on_error)
        self.limiter = RateLimiter(s.teacher_rpm, s.teacher_tpm)
        # One client per concurrent request, so each request's usage (retries
        # included) is its own; the pool size is the concurrency limit.
        self._pool: asyncio.Queue[OpenAITeacher] = asyncio.Queue()
        for _ in range(s.teacher_concurrency):
            # the ledger books each call's worst-case cost first: all workers together stay within the budget
            self._pool.put_nowait(OpenAITeacher.from_settings(s, self.taxonomy, concurrency=1, budget_usd=None,
                                                              spend=self.ledger))
        metrics.TEACHER_BUDGET.set(s.teacher_budget_usd)
        self._started = True
        log.info("teacher worker: %s at %s, %d labels, budget $%g", s.teacher_model,
                 redact_url(s.teacher_base_url), len(self.taxonomy), s.teacher_budget_usd)

    # --- one batch --------------------------------------------------------------

    async def handle(self, batch: Sequence[Incoming]) -> None:
        """Label one batch of requests and wait until every output is stored by
        the broker. Returns only when the whole batch is answered or dead-lettered."""
        sends: list[Awaitable] = []
        valid: list[tuple[Incoming, TeacherRequest]] = []
        for msg in batch:
            decoded = TeacherRequest.parse(msg.value)
            if isinstance(decoded, str):
                sends.append(self._dead_letter(msg, "bad_request", decoded, None))
            else:
                valid.append((msg, decoded))

        unique, index = distinct_texts([req.text for _, req in valid], self.cache.taxonomy_hash)
        answers: list[Answer | TeacherError | None] = [None] * len(unique)
        for i, hit in enumerate(await self.cache.get_many(unique)):
            if hit is not None:
                answers[i] = Answer(hit.label, hit.teacher_model, hit.ts, CACHED_USAGE)
        misses = [i for i, answer in enumerate(answers) if answer is None]
        metrics.TEACHER_CACHE_MISSES.inc(len(misses))
        metrics.TEACHER_CACHE_HITS.inc(len(valid) - len(misses))

        pieces = list(chunks(misses, self.settings.teacher_batch_size))
        results = await asyncio.gather(*(self._label([unique[i] for i in piece]) for piece in pieces))
        fresh: list[tuple[str, CachedLabel]] = []
        for piece, result in zip(pieces, results, strict=True):
            if isinstance(result, TeacherError):
                for i in piece:
                    answers[i] = result
                continue
            labels, delta, at = result
            for i, label in zip(piece, labels, strict=True):
                answers[i] = Answer(label, self.settings.teacher_model, at, usage_share(delta, len(piece)))
                fresh.append((unique[i], CachedLabel(label, self.settings.teacher_model, at)))
        await self.cache.put_many(fresh)

        now = time.time()
        for (msg, req), i in zip(valid, index, strict=True):
            answer = answers[i]
            if not isinstance(answer, Answer):
                sends.append(self._dead_letter(msg, error_reason(answer), str(answer), req.id))
                continue
            sends.extend(self._publish(req, answer))
            if req.ts:
                metrics.END_TO_END.labels("teacher").observe(max(0.0, now - req.ts))
        await asyncio.gather(*sends)

    def _publish(self, req: TeacherRequest, answer: Answer) -> list[Awaitable]:
        metrics.TEACHER_LABELS.labels(answer.label).inc()
        sample = TeacherLabel(
            id=req.id, text=req.text, label=answer.label, teacher_model=answer.teacher_model, usage=answer.usage,
            student_label=req.student_label, student_confidence=req.student_confidence,
            model_version=req.model_version, ts=req.ts, labelled_at=answer.labelled_at,
        )
        corrected = LabelOut(
            id=req.id, label=answer.label, confidence=1.0, top_k=[[answer.label, 1.0]],
            model_version=req.model_version, source="teacher", needs_review=False, ts=req.ts,
            extra=req.extra, teacher_model=answer.teacher_model,
        )
        return [
            send(self.topics.teacher_labels, req.id, sample.dumps()),
            send(self.topics.labels_out, req.id, corrected.dumps()),
        ]

    def _dead_letter(self, msg: Incoming, reason: str, error: str, ident: str | None) -> Awaitable:
        metrics.DLQ.labels(reason, "teacher").inc()
        letter = DeadLetter.of(
            stage="teacher", reason=reason, error=error, topic=msg.topic, partition=msg.partition,
            offset=msg.offset, value=msg.value, ts=msg.ts,
            max_original_bytes=self.settings.dlq_max_original_bytes, id=ident,
        )
        return send(self.topics.dlq, letter.key(), letter.dumps())

    # --- one teacher request ----------------------------------------------------

    async def _label(self, texts: list[str]) -> tuple[list[str], Usage, float] | TeacherError:
        """Labels for ``texts`` (one request, the client's retries included), or
        the TeacherError of the last try. Waits, without limit, while the budget is spent."""
        tokens = request_tokens(texts, self.taxonomy)
        while True:
            budget, spent = await self.ledger.budget(), await self.ledger.spent()
            metrics.TEACHER_SPENT.set(spent)
            metrics.TEACHER_BUDGET.set(budget)
            if spent >= budget:
                await self._wait_for_budget(budget, spent)
                continue
            metrics.TEACHER_RATE_LIMITED.inc(await self.limiter.acquire(tokens))
            teacher = await self._pool.get()
            before = teacher.usage.copy()
            started = time.perf_counter()
            hold = ""
            try:
                labels = await teacher.alabel(texts)
            except BudgetExhausted as err:
                # what is left cannot pay for the next call's worst case: hold, like a spent budget
                await self._account(teacher.usage - before, "budget_exhausted")
                hold = str(err)
            except TeacherError as err:
                await self._budget_available(budget, spent)  # a call was paid for: the hold is over
                await self._account(teacher.usage - before, "error")
                metrics.TEACHER_ERRORS.labels(error_reason(err)).inc()
                log.warning("teacher request of %d texts failed: %s", len(texts), err)
                return err
            finally:
                self._pool.put_nowait(teacher)
                metrics.TEACHER_LATENCY.observe(time.perf_counter() - started)
            if hold:
                await self._wait_for_budget(budget, await self.ledger.spent(), hold)
                continue  # then ask again
            await self._budget_available(budget, spent)
            delta = teacher.usage - before
            await self._account(delta, "ok")
            return labels, delta, time.time()

    async def _account(self, delta: Usage, outcome: str) -> None:
        metrics.TEACHER_CALLS.labels(outcome).inc()
        metrics.TEACHER_TOKENS.labels("prompt").inc(delta.prompt_tokens)
        metrics.TEACHER_TOKENS.labels("completion").inc(delta.completion_tokens)
        metrics.TEACHER_COST.inc(delta.cost_usd)
        metrics.TEACHER_RETRIES.inc(delta.retries)  # the cost is in the ledger already (booked per call)

    async def _wait_for_budget(self, budget: float, spent: float, why: str = "") -> None:
        if not self._exhausted:
            self._exhausted = True
            reason = (f"teacher budget of ${budget:g} is spent (${spent:.4f}{'; ' + why if why else ''}); holding "
                      f"teacher.requests unacknowledged until {self.ledger.budget_key} or PGKD_TEACHER_BUDGET_USD "
                      "is raised")
            log.error("%s", reason)
            metrics.TEACHER_BUDGET_EXHAUSTED.set(1)
            await self.ledger.record_status(True, reason, budget)
        await asyncio.sleep(self.settings.teacher_budget_recheck_s)

    async def _budget_available(self, budget: float, spent: float) -> None:
        if self._exhausted:
            self._exhausted = False
            log.warning("teacher budget available again ($%.4f of $%g spent); resuming", spent, budget)
            metrics.TEACHER_BUDGET_EXHAUSTED.set(0)
            await self.ledger.record_status(False, "budget available", budget)


settings = load_settings()
app = build_app(settings, "teacher")
topics = declare_topics(app, settings)
worker = TeacherWorker(settings, topics, load_taxonomy(settings))


@app.agent(topics.teacher_requests)
async def label_requests(stream):
    """Batches of teacher.requests -> teacher.labels + labels.out (source teacher) / texts.dlq."""
    await topics.declare_all()
    await start_or_exit(worker.start, "teacher")
    # enough requests per batch to keep every concurrent teacher request busy
    size = settings.teacher_batch_size * settings.teacher_concurrency
    await run_batches(stream, size, settings.teacher_batch_within_s, worker.handle, "teacher")


@app.task
async def serve_metrics() -> None:
    metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)
