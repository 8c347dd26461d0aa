"""At-least-once batch processing, shared by the agents.

Faust's ``stream.take()`` acknowledges a batch's events in a ``finally``: also
when processing raised, and as soon as the agent asks for the next batch, before
sends that were only queued have reached the broker. So the agents use
``stream.noack_take()`` (events, no automatic acks; faust-streaming#315, #513)
and :func:`run_batches` acks a batch only after the handler returned, and the
handler returns only after the broker acknowledged every record the batch
produced. The consumer then commits acked offsets (after a producer flush).

If a batch fails anyway (the producer gave up after its retries, or a bug), the
process exits without acking it: a restart redelivers the batch. Going on would
leave a hole below the committed offset that only a restart fills.

Reading ahead (:func:`read_ahead`): a reader task keeps taking from the
stream while the handler works, so the handler's next batch is everything that
arrived meanwhile, at once, instead of what arrives in another ``within`` that
would start only when the handler asks. Up to ``size`` events wait so; none is
acked before the batch that holds it is handled and stored.

Pipelining (the classifier): a handler may return, instead of None, an
awaitable that resolves once the broker has acknowledged the batch's records.
The next batch is then taken and handled while that one completes; batches are
still acked strictly in order, each only after its records are stored, and at
most two are unacknowledged at a time. The classifier's handler returns as soon
as a full batch's inference is queued, so batch k+1 is inferred while batch k's
records are built and stored (a batch that is not full returns once inferred).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

EXIT_BATCH_FAILED = 70  # EX_SOFTWARE
EXIT_START_FAILED = 78  # EX_CONFIG
EXIT_INFERENCE_HUNG = 75  # EX_TEMPFAIL: a restart retries the batch (streams.watchdog)
COMMIT_BEFORE_EXIT_S = 10.0  # commit_then_exit: the longest wait for the commit


@dataclass(frozen=True)
class Incoming:
    """One consumed message: where it came from and its raw value."""

    topic: str
    partition: int
    offset: int
    ts: float  # the message timestamp, epoch seconds (0.0 when the broker has none)
    value: bytes | None


def incoming(event) -> Incoming:
    message = event.message
    return Incoming(message.topic, message.partition, message.offset, message.timestamp or 0.0, event.value)


def exit_now(code: int) -> None:
    # os._exit: leave now, from inside the event loop, whatever Faust does with agent exceptions
    logging.shutdown()
    os._exit(code)


async def commit_then_exit(consumer, code: int, exit: Callable[[int], object] = exit_now,
                           timeout_s: float = COMMIT_BEFORE_EXIT_S) -> None:
    """Commit the offsets acked so far (``consumer.commit_acked()``, at most
    ``timeout_s``), then exit with ``code``. For a worker that must stop while its
    event loop still runs (a hung model: streams.watchdog): a restart then
    redelivers only what was not answered, instead of everything since the last
    periodic commit. A commit that fails or takes too long is logged; the exit follows."""
    try:
        await asyncio.wait_for(consumer.commit_acked(), timeout_s)
    except Exception as err:  # noqa: BLE001 - exiting anyway: a restart redelivers a little more
        log.warning("could not commit the acked offsets before exiting (%s: %s)", type(err).__name__, err)
    exit(code)


async def send(topic, key: str, value: bytes):
    """Send one record; returns when the broker has acknowledged it (RecordMetadata)."""
    return await (await queue(topic, key, value))


async def queue(topic, key: str, value: bytes) -> Awaitable:
    """Put one record in the App's producer; returns the future of the broker's
    acknowledgement (acks=all), a RecordMetadata. Records are sent in the order
    they are queued. Raises at once when the producer refuses the record (too large).

    This is the App's producer (Faust's ``Producer.send``), not ``Topic.send``:
    Topic.send wraps every record in Faust's pending-message objects, sensors and
    callbacks the workers do not use, and the classifier's per-record Task on top
    cost ~40 us of the event loop a record against ~16 (docs/BENCHMARKS.md). The
    topics are raw bytes (streams.app.declare_topics): nothing to serialize."""
    producer = topic.app.producer
    return await producer.send(topic.get_topic_name(), key.encode("utf-8"), value, None, None, None)


async def start_or_exit(start: Callable[[], Awaitable[None]], what: str) -> None:
    """Run an agent's start-up (model load, clients); on failure exit the process.
    A Faust agent that raises is restarted or left dead while the worker looks
    healthy; a worker that cannot serve must say so and stop."""
    try:
        await start()
    except Exception:
        log.critical("%s worker cannot start; exiting", what, exc_info=True)
        exit_now(EXIT_START_FAILED)


async def read_ahead(takes: AsyncIterator[Sequence], size: int) -> AsyncIterator[list]:
    """Batches of at most ``size`` events, in order, from ``takes`` (Faust's
    ``noack_take(size, within)``), read by a task of their own: while the caller
    handles a batch the reader goes on taking, and the next batch is whatever
    gathered meanwhile (up to ``size``; the reader pauses while ``size`` wait).
    So a batch that is not full means the stream has caught up. An error of
    ``takes`` is raised here once the batches before it are handed over."""
    pending: list = []
    ended: list[BaseException | None] = []  # [None] when takes ended, [error] when it raised
    changed = asyncio.Condition()

    async def reader() -> None:
        try:
            async with contextlib.aclosing(takes):
                async for events in takes:
                    async with changed:
                        pending.extend(events)
                        changed.notify_all()
                        await changed.wait_for(lambda: len(pending) < size)
            ended.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            ended.append(exc)
        finally:
            if ended:
                async with changed:
                    changed.notify_all()

    task = asyncio.ensure_future(reader())
    try:
        while True:
            async with changed:
                await changed.wait_for(lambda: pending or ended)
                if not pending:
                    if ended[0] is not None:
                        raise ended[0]
                    return
                batch, pending[:] = pending[:size], pending[size:]
                changed.notify_all()
            yield batch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_batches(
    stream,
    size: int,
    within_s: float,
    handle: Callable[[Sequence[Incoming]], Awaitable[Awaitable | None]],
    what: str,
    exit: Callable[[int], object] | None = None,  # tests pass a fake
) -> None:
    """Feed batches of ``stream`` to ``handle``; ack each batch once its records are stored.

    ``handle`` returns None when the batch is complete, or an awaitable of the
    broker's acknowledgements (pipelined: see the module docstring)."""
    leave = exit or exit_now
    previous: asyncio.Task | None = None  # the batch before, still completing

    async def complete(events, stored: Awaitable | None, before: asyncio.Task | None) -> bool:
        if before is not None and not await before:
            return False  # an earlier batch failed: never ack past it
        try:
            if stored is not None:
                await stored
        except Exception:
            log.critical("%s batch of %d failed; exiting without acknowledging it (a restart redelivers it)",
                         what, len(events), exc_info=True)
            leave(EXIT_BATCH_FAILED)
            return False
        for event in events:
            await stream.ack(event)
        return True

    async with contextlib.aclosing(read_ahead(stream.noack_take(size, within=within_s), size)) as batches:
        async for events in batches:
            try:
                stored = await handle([incoming(event) for event in events])
            except Exception:
                log.critical("%s batch of %d failed; exiting without acknowledging it (a restart redelivers it)",
                             what, len(events), exc_info=True)
                if previous is not None:
                    await asyncio.shield(previous)  # the batch before may still be acked: its records are stored
                leave(EXIT_BATCH_FAILED)
                return
            if stored is None and previous is None:
                if not await complete(events, None, None):
                    return
                continue
            task = asyncio.ensure_future(complete(events, stored, previous))
            if previous is not None and not await previous:  # at most two batches unacknowledged
                return
            previous = task
            if task.done() and not task.result():
                return
    if previous is not None:
        await previous
