"""``texts.dlq``: what the workers could not process, counted and replayed.

A dead letter (``streams.schemas.DeadLetter``) keeps its original message
(base64, cut at ``PGKD_DLQ_MAX_ORIGINAL_BYTES``) and where it came from. Once
the cause is gone (the teacher's outage ended, a broken model was rolled back,
``PGKD_MAX_TEXT_CHARS`` was raised), ``pgkd dlq replay --stage S`` sends the
originals back to the topic each came from, and the workers take them as new
messages:

- it reads the DLQ from its first offset to its end as the command starts
  (letters written meanwhile wait for the next run);
- only to this deployment's input topics (``texts.in``, ``teacher.requests``,
  ``retrain.requests``), never to a topic a letter merely names;
- never an original that was cut (``original_truncated``): part of a message
  would be another message;
- each replayed letter is marked in Redis (``<prefix>:dlq:replayed``, a set of
  the letters' places and their originals', :attr:`Letter.mark`) once the broker stored its original, and a marked one is
  not sent again, so a second run of the same selection sends nothing twice. An
  original that fails again comes back as a new letter, replayable in turn. A
  run killed between the broker's ack and the mark may send those few again
  (at least once, like the workers; ``labels.out`` is compacted by id and the
  teacher's cache answers a repeated text).

``pgkd dlq summary`` counts the letters by stage and reason, with the oldest and
newest original timestamps and how many were replayed. Plain aiokafka, no Faust.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.topics import ensure_topics, kafka_kwargs

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from pgkd.settings import Settings

REPLAY_TARGETS = ("texts_in", "teacher_requests", "retrain_requests")  # the topics the workers consume
LETTER_FIELDS = {"stage": str, "reason": str, "topic": str, "partition": int, "offset": int, "original_b64": str,
                 "original_truncated": bool, "ts": (int, float)}  # what a replay reads, and its type
SEND_BATCH = 256  # originals in flight before their acks are awaited and their letters marked
READ_STALL_S = 30.0  # no record for this long while the end offsets say there are more: the broker is stuck


@dataclass(frozen=True)
class Letter:
    """One record of the DLQ: where it is, and its value when it is a dead letter."""

    partition: int
    offset: int
    value: dict[str, Any] | None  # None: not a dead letter (not JSON, or fields missing)

    @property
    def mark(self) -> str:
        """What Redis keeps of a replayed letter: its place, and its original's (a DLQ deleted
        and created again restarts its offsets; its new letters come from other originals)."""
        origin = f":{self.value['topic']}:{self.value['partition']}:{self.value['offset']}" if self.value else ""
        return f"{self.partition}:{self.offset}{origin}"


def read_letter(raw: bytes | None) -> dict[str, Any] | None:
    """A DLQ value -> its fields, or None when it is not a dead letter.

    >>> read_letter(b'{"stage": "teacher", "reason": "timeout", "topic": "t", "partition": 0, "offset": 7,'
    ...             b' "original_b64": "e30=", "original_truncated": false, "ts": 1.5, "id": "a"}')["reason"]
    'timeout'
    >>> read_letter(b"not json") is None, read_letter(b'{"stage": "parse"}') is None
    (True, True)
    """
    try:
        value = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    for name, kind in LETTER_FIELDS.items():
        if not isinstance(value.get(name), kind) or (kind is int and isinstance(value[name], bool)):
            return None
    return value


async def letters(settings: Settings) -> AsyncIterator[Letter]:
    """Every record of the DLQ from its first offset to its end as this call starts."""
    topic = settings.topic_dlq
    (state,) = await ensure_topics(settings, ("dlq",))
    consumer = AIOKafkaConsumer(**kafka_kwargs(settings), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id=f"{settings.app_id_prefix}-dlq")
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(state.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        pending = {tp for tp in parts if await consumer.position(tp) < end[tp]}
        last_record = time.monotonic()
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < end[tp]:
                        yield Letter(tp.partition, record.offset, read_letter(record.value))
                last_record = time.monotonic()
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if pending and time.monotonic() - last_record > READ_STALL_S:
                left = ", ".join(f"{tp.partition}" for tp in sorted(pending))
                raise TimeoutError(f"no record of {topic} for {READ_STALL_S:g} s before its end (partitions {left})")
    finally:
        await consumer.stop()


def replayed_key(settings: Settings) -> str:
    return f"{settings.app_id_prefix}:dlq:replayed"


async def replayed_marks(settings: Settings, redis: Redis) -> set[str]:
    """The marks of every letter replayed so far (:attr:`Letter.mark`)."""
    return {m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(replayed_key(settings))}


@dataclass
class Summary:
    """Letters by (stage, reason): count, oldest and newest original ts, how many replayed."""

    groups: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    unreadable: int = 0

    def lines(self) -> list[str]:
        out = ["stage\treason\tletters\treplayed\toldest (UTC)\tnewest (UTC)"]
        for (stage, reason), g in sorted(self.groups.items()):
            oldest, newest = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(g[k])) for k in ("oldest", "newest"))
            out.append(f"{stage}\t{reason}\t{g['letters']:.0f}\t{g['replayed']:.0f}\t{oldest}\t{newest}")
        if self.unreadable:
            out.append(f"(and {self.unreadable} record(s) that are not dead letters)")
        return out


async def summarize(settings: Settings, redis: Redis) -> Summary:
    summary = Summary()
    replayed = await replayed_marks(settings, redis)
    async with aclosing(letters(settings)) as stream:  # the consumer stops even if this loop fails
        async for letter in stream:
            if letter.value is None:
                summary.unreadable += 1
                continue
            ts = float(letter.value["ts"])
            g = summary.groups.setdefault((letter.value["stage"], letter.value["reason"]),
                                          {"letters": 0, "replayed": 0, "oldest": ts, "newest": ts})
            g["letters"] += 1
            g["replayed"] += letter.mark in replayed
            g["oldest"], g["newest"] = min(g["oldest"], ts), max(g["newest"], ts)
    return summary


async def replay(settings: Settings, redis: Redis, stages: set[str], reasons: set[str] | None = None,
                 dry_run: bool = False) -> tuple[Counter, Counter]:
    """Send the originals of the selected letters back to their topics; returns
    (replayed per topic, skipped per why). With ``dry_run`` nothing is sent or marked."""
    targets = {getattr(settings, f"topic_{name}") for name in REPLAY_TARGETS}
    key = replayed_key(settings)
    replayed = await replayed_marks(settings, redis)
    sent, skipped = Counter(), Counter()
    producer = None
    if not dry_run:
        producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", enable_idempotence=True,
                                    client_id=f"{settings.app_id_prefix}-dlq-replay")
        await producer.start()
    in_flight: list[tuple[Any, str]] = []

    async def settle() -> None:
        for ack, _ in in_flight:
            await ack  # the broker stored it; a failure raises before anything is marked
        if in_flight:
            await redis.sadd(key, *(mark for _, mark in in_flight))
        in_flight.clear()

    try:
        async with aclosing(letters(settings)) as stream:
            async for letter in stream:
                value = letter.value
                if value is None:
                    skipped["not a dead letter"] += 1
                elif value["stage"] not in stages or (reasons and value["reason"] not in reasons):
                    skipped["not selected"] += 1
                elif letter.mark in replayed:
                    skipped["replayed before"] += 1
                elif value["original_truncated"]:
                    skipped["original cut (PGKD_DLQ_MAX_ORIGINAL_BYTES)"] += 1
                elif value["topic"] not in targets:
                    skipped[f"from {value['topic']}, not an input topic of this deployment"] += 1
                else:
                    try:
                        original = base64.b64decode(value["original_b64"], validate=True)
                    except (binascii.Error, TypeError):
                        skipped["original not base64"] += 1
                        continue
                    sent[value["topic"]] += 1
                    if producer is not None:
                        key_bytes = value["id"].encode() if isinstance(value.get("id"), str) else None
                        in_flight.append((await producer.send(value["topic"], original, key=key_bytes), letter.mark))
                        if len(in_flight) >= SEND_BATCH:
                            await settle()
        await settle()
    finally:
        if producer is not None:
            await producer.stop()
    return sent, skipped
