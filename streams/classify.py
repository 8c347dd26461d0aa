"""The classifier worker: ``texts.in`` -> student -> ``labels.out`` (+ low
confidence -> ``teacher.requests``, bad input -> ``texts.dlq``).

Run it with ``pgkd worker classify`` or ``faust -A streams.classify worker``;
settings come from ``PGKD_*`` variables. Workers of this role share one
consumer group and split the partitions of ``texts.in``.

Delivery is at least once (:mod:`streams.delivery`). Outputs are a pure
function of (input, model version) and carry the input's timestamp, so a
redelivered input yields the same records. With int8 weights
(PGKD_INFERENCE_QUANTIZE=int8) the activations are quantized per batch, so a
redelivered input batched with other texts may come back with a slightly
different confidence (rarely another label).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pgkd import inference_process
from pgkd.inference import Rejected, Routing, TextIn, parse_input, route
from pgkd.serving import ServingModel, load_serving_model, serve_path
from pgkd.settings import Settings, load_settings
from streams import metrics
from streams.app import Topics, build_app, declare_topics
from streams.delivery import (EXIT_INFERENCE_HUNG, Incoming, commit_then_exit, exit_now, queue, run_batches,
                             start_or_exit)
from streams.drift_metrics import DriftWatch
from streams.hotswap import ModelWatcher
from streams.schemas import DeadLetter, LabelOut, TeacherRequest
from streams.watchdog import Call, InferenceWatchdog

log = logging.getLogger(__name__)


def _count_restart(version: str) -> None:
    metrics.INFERENCE_PROCESS_RESTARTS.labels(version).inc()


class Classifier:
    """The worker's state: settings, the model it serves, its inference thread.

    ``model`` is read once per batch, so replacing it (hot swap) is one
    assignment that takes effect between batches.
    """

    def __init__(self, settings: Settings, topics: Topics, exit: Callable[[int], object] = exit_now):
        self.settings = settings
        self.topics = topics
        self.routing = Routing.from_settings(settings)
        self.model: ServingModel | None = None
        # PGKD_INFERENCE_LANES threads, one batch each; torch parallelises inside a batch (PGKD_TORCH_THREADS)
        self._executor = ThreadPoolExecutor(max_workers=settings.inference_lanes, thread_name_prefix="pgkd-inference")
        self.drift = DriftWatch.from_settings(settings)  # None when PGKD_DRIFT_ENABLED=false
        self._queued: asyncio.Future | None = None  # resolved once the latest batch queued its records
        self.watchdog = InferenceWatchdog(settings.inference_timeout_s, self.hung)  # run by the watch_inference task
        self._exit = exit  # tests pass a fake
        self._exiting: asyncio.Future | None = None  # the commit_then_exit task of a hung model (held: not collected)

    async def start(self) -> None:
        """Load, verify and warm up the model; once, before the worker joins its group."""
        share_the_gil(self.settings)
        if self.settings.inference_process and _count_restart not in inference_process.on_restart:
            inference_process.on_restart.append(_count_restart)
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self._executor, load_serving_model, self.settings)
        self.swap(model)

    def swap(self, model: ServingModel) -> ServingModel | None:
        """Serve ``model`` (loaded and warmed) from the next batch on; a batch in
        flight finishes with the model it started with. Returns the model it replaced."""
        old, self.model = self.model, model
        if old is not None:
            metrics.MODEL_INFO.remove(old.version)
        metrics.MODEL_INFO.labels(model.version).set(1)
        if self.drift is not None:
            self.drift.reset(model)  # compare with this version's reference from now on
        return old

    async def _predict(self, model: ServingModel, texts: list[str]) -> list[np.ndarray | Exception]:
        """Probabilities per text, off the event loop. If the batch fails, each
        text is tried alone, so one text the model cannot take goes to the DLQ
        and the others are answered."""
        loop = asyncio.get_running_loop()
        predict = model.student.predict_proba
        size = self.settings.inference_batch_size
        try:
            probs = await loop.run_in_executor(self._executor, self.watchdog.call, model, len(texts), _timed,
                                               predict, texts, size)
            return list(probs)
        except Exception as err:  # noqa: BLE001 - any model failure: retry one by one, then DLQ
            log.warning("batch inference failed (%s: %s); retrying text by text", type(err).__name__, err)
        out: list[np.ndarray | Exception] = []
        for text in texts:
            try:
                out.append((await loop.run_in_executor(self._executor, self.watchdog.call, model, 1, predict,
                                                       [text], 1))[0])
            except Exception as err:  # noqa: BLE001
                out.append(err)
        if len(texts) > 1 and all(isinstance(o, Exception) for o in out):
            # Every text fails alone too: the model is broken, not the data. Raising
            # leaves the batch unacked (the worker exits, a restart retries it),
            # instead of dead-lettering the whole stream.
            raise RuntimeError(f"inference fails on every text of the batch: {out[0]!r}")
        return out

    def hung(self, call: Call) -> None:
        """The watchdog's report of an inference call past PGKD_INFERENCE_TIMEOUT_S
        (on the event loop). A version served by a child process has it killed: the
        call fails and its batch is retried text by text. One in this process cannot
        be stopped: the worker commits what it acked and exits without acknowledging
        the batch (a restart redelivers it; streams.watchdog)."""
        model: ServingModel = call.what
        metrics.INFERENCE_HUNG.labels(model.version).inc()
        limit = self.settings.inference_timeout_s
        what = (f"inference of {call.texts} text{'s' if call.texts != 1 else ''} by {model.version} has run "
                f"{call.running_s():.0f} s on {call.thread} (PGKD_INFERENCE_TIMEOUT_S={limit:g})")
        kill = getattr(model.student, "kill", None)
        if kill is not None:
            log.error("%s: killing its inference process", what)
            kill(f"no answer in {limit:g} s")
            return
        log.critical("%s: the model is hung and cannot be stopped inside the worker; exiting without acknowledging "
                     "the batch, which a restart redelivers (with PGKD_INFERENCE_PROCESS=true a text that hangs the "
                     "model is dead-lettered instead)", what)
        self._exiting = asyncio.ensure_future(commit_then_exit(self.topics.texts_in.app.consumer,
                                                               EXIT_INFERENCE_HUNG, self._exit))

    def _dead_letter(self, msg: Incoming, stage: str, reason: str, error: str, ident: str | None) -> DeadLetter:
        metrics.DLQ.labels(reason, stage).inc()
        return DeadLetter.of(
            stage=stage, reason=reason, error=error, topic=msg.topic, partition=msg.partition, offset=msg.offset,
            value=msg.value, ts=msg.ts, max_original_bytes=self.settings.dlq_max_original_bytes, id=ident,
        )

    async def _queue_letter(self, letter: DeadLetter) -> Awaitable:
        """Queue a dead letter in the producer; returns the broker's acknowledgement."""
        return await queue(self.topics.dlq, letter.key(), letter.dumps())

    async def handle(self, batch: Sequence[Incoming]) -> asyncio.Future:
        """Start classifying one batch; returns a future that resolves once the
        broker stored every record the batch produced (run_batches acks the
        batch then).

        A full batch (PGKD_BATCH_SIZE: a backlog) returns as soon as its
        inference is queued on the inference thread, so run_batches takes and
        queues the next batch while this one is inferred, and builds this one's
        records while the next is inferred: the inference thread never waits for
        the event loop (the graph runs without the GIL, PGKD_INFERENCE_GRAPH).
        With PGKD_INFERENCE_LANES=2 two batches are inferred at once. A batch
        that is not full returns once it is inferred (its records are still
        built and stored after it returns): the next take then holds everything
        that arrived during the inference. Records are queued batch after batch,
        in the order the batches came, whichever finished inference first. Bad
        records become dead letters; the batch goes on."""
        model = self.model
        assert model is not None, "start() loads the model before the first batch"
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.TEXTS_TOTAL.inc(len(batch))
        rejected: list[DeadLetter] = []
        valid: list[tuple[Incoming, TextIn]] = []
        for msg in batch:
            parsed = parse_input(msg.value, self.settings.max_text_chars, self.settings.max_id_chars)
            if isinstance(parsed, Rejected):
                rejected.append(self._dead_letter(msg, "parse", parsed.reason, parsed.detail, parsed.id))
            else:
                valid.append((msg, parsed))
        inferred = asyncio.ensure_future(self._predict(model, [item.text for _, item in valid])) if valid else None
        before, self._queued = self._queued, asyncio.get_running_loop().create_future()
        done = asyncio.ensure_future(self._complete(rejected, valid, inferred, model, before, self._queued))
        if inferred is not None and len(batch) < self.settings.batch_size:
            # Not a full take: the stream has caught up. The next take starts once this batch
            # is inferred, so it gathers every message that arrived meanwhile into one batch,
            # instead of a small batch queued behind this one (a pass costs more per text the
            # smaller it is). A full take (a backlog) lets the next one queue at once.
            await asyncio.wait({inferred})
        return done

    async def _complete(self, rejected: list[DeadLetter], valid: list[tuple[Incoming, TextIn]],
                        inferred: asyncio.Future | None, model: ServingModel, before: asyncio.Future | None,
                        queued: asyncio.Future) -> None:
        """Wait for the batch's probabilities, queue its records in the producer
        (after the batch before queued its own), then wait until the broker stored them all."""
        try:
            results = await inferred if inferred is not None else []
            if before is not None:
                await asyncio.shield(before)
            acks = [await self._queue_letter(letter) for letter in rejected]
            answered = await self._records(valid, results, model, acks)
            stored = asyncio.gather(*acks)
        finally:
            queued.set_result(None)  # also on failure: the next batch must not wait forever (it is never acked)
        await self._stored(stored, answered, model)

    async def _records(self, valid: list[tuple[Incoming, TextIn]], results: list[np.ndarray | Exception],
                       model: ServingModel, acks: list[Awaitable]) -> list[tuple[str, float, float]]:
        """Queue the batch's labels.out / teacher.requests / dead-letter records in
        the producer, their acknowledgements on ``acks``; returns (label, confidence,
        input ts) of every answer (drift, latency)."""
        answered: list[tuple[str, float, float]] = []
        for (msg, item), probs in zip(valid, results, strict=True):
            if isinstance(probs, Exception):
                error = f"{type(probs).__name__}: {probs}"
                letter = self._dead_letter(msg, "inference", "inference_error", error, item.id)
                acks.append(await self._queue_letter(letter))
                continue
            answer = route(probs, model.labels, self.routing)
            out = LabelOut(
                id=item.id, label=answer.label, confidence=answer.confidence,
                top_k=[list(pair) for pair in answer.top_k], model_version=model.version, source="student",
                needs_review=answer.needs_review, ts=msg.ts, extra=item.extra,
            )
            acks.append(await queue(self.topics.labels_out, item.id, out.dumps()))
            metrics.TEXTS_CLASSIFIED.labels(answer.label, model.version).inc()
            metrics.CONFIDENCE.observe(answer.confidence)
            answered.append((answer.label, answer.confidence, msg.ts))
            if answer.needs_review:
                metrics.LOW_CONFIDENCE.labels(model.version).inc()
                request = TeacherRequest(
                    id=item.id, text=item.text, student_label=answer.label,
                    student_confidence=answer.confidence, top_k=out.top_k, model_version=model.version,
                    ts=msg.ts, extra=item.extra,
                )
                acks.append(await queue(self.topics.teacher_requests, item.id, request.dumps()))
        return answered

    async def _stored(self, stored: Awaitable, answered: list[tuple[str, float, float]],
                      model: ServingModel) -> None:
        await stored
        now = time.time()
        for _, _, ts in answered:
            if ts:
                metrics.END_TO_END.labels("student").observe(max(0.0, now - ts))
        if self.drift is not None and answered:  # Redis is written only when an alarm is raised
            labels, confidences, _ = zip(*answered)
            await self.drift.after_batch(labels, confidences, version=model.version)


def share_the_gil(settings: Settings) -> None:
    """Set this process's GIL switch interval to PGKD_GIL_SWITCH_INTERVAL_S (0:
    leave Python's 5 ms).

    The inference thread releases the GIL inside every forward pass and must
    retake it after each one (to read the result and pad the next pass). When the
    event loop holds it then (building a batch's records, the consumer's fetches),
    Python makes the waiting thread wait a whole switch interval before it asks
    the holder to let go. Under a backlog the inference thread ran 0.86 of a core
    at 5 ms and 0.89 at 0.5 ms (medians of interleaved runs; docs/BENCHMARKS.md,
    "Session 14 on the same Xeon")."""
    if settings.gil_switch_interval_s:
        sys.setswitchinterval(settings.gil_switch_interval_s)
        log.info("GIL switch interval %.1f ms", 1000 * sys.getswitchinterval())


def _timed(predict, texts: list[str], size: int) -> np.ndarray:
    """predict(texts, size), timed on the inference thread (the time a batch
    waits in the queue behind the one before is not inference)."""
    started = time.perf_counter()
    probs = predict(texts, size)
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    return probs


settings = load_settings()
serve_path(settings)  # a missing model stops start-up here, with its name
app = build_app(settings, "classify")
topics = declare_topics(app, settings)
classifier = Classifier(settings, topics)


@app.before_consuming
async def load_model() -> None:
    """The model is loaded before the worker joins the group: no partition waits for it."""
    await start_or_exit(classifier.start, "classify")


@app.agent(topics.texts_in)
async def classify(stream):
    """Batches of texts.in -> labels.out / teacher.requests / texts.dlq."""
    await topics.declare_all()
    await run_batches(stream, settings.batch_size, settings.batch_within_s, classifier.handle, "classify")


@app.task
async def follow_model_updates() -> None:
    """model.updates (no consumer group) and the registry pointer -> hot swap between batches."""
    served = lambda: classifier.model.version if classifier.model is not None else None  # noqa: E731
    await ModelWatcher(settings, served, classifier.swap).run_forever()


@app.task
async def watch_inference() -> None:
    """Inference calls past PGKD_INFERENCE_TIMEOUT_S -> Classifier.hung."""
    await classifier.watchdog.run()


@app.task
async def serve_metrics() -> None:
    metrics.start_metrics_server(settings.metrics_host, settings.metrics_port)
