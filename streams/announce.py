"""``model.updates``: telling every classifier worker that the current version changed.

The pointer in Redis (:meth:`pgkd.registry.Registry.current`) is what counts;
an announcement only tells running classifier workers to swap now instead of at
their next poll or restart. The registry CLI calls
:func:`announce_model_update` after ``pgkd models promote|rollback|import
--promote``; the trainer announces its promotions the same way.

Plain aiokafka, no Faust: the CLI imports this module without building an App.
Records are keyed by the namespace (``PGKD_APP_ID_PREFIX``), so every
announcement of one deployment lands on one partition, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer

from streams.topics import ensure_topics, kafka_kwargs

if TYPE_CHECKING:
    from pgkd.settings import Settings

log = logging.getLogger(__name__)

ACTIONS = ("promote", "rollback")
FIELDS = ("version", "previous", "action", "reason", "round", "ts")


def update_record(entry: dict) -> dict:
    """The ``model.updates`` value of a registry history entry (promote or rollback).

    >>> update_record({"action": "promote", "version": "v0003", "previous": "v0002", "reason": "gate passed",
    ...                "round": 4, "ts": 1795813387.5})
    {'version': 'v0003', 'previous': 'v0002', 'action': 'promote', 'reason': 'gate passed', 'round': 4, 'ts': 1795813387.5}
    """
    if entry.get("action") not in ACTIONS or not entry.get("version"):
        raise ValueError(f"not a registry history entry (action promote/rollback and a version): {entry!r}")
    record = {name: entry.get(name) for name in FIELDS}
    record["ts"] = float(record["ts"] if record["ts"] is not None else time.time())
    return record


async def aannounce_model_update(settings: Settings, entry: dict, timeout_s: float = 30.0) -> dict:
    """Send one record to ``model.updates`` and wait until the broker stored it
    (acks=all); returns the record."""
    record = update_record(entry)
    topic = settings.topic_model_updates
    await asyncio.wait_for(ensure_topics(settings, ("model_updates",), timeout_s), timeout_s)
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", client_id=f"{settings.app_id_prefix}-announce")
    await producer.start()
    try:
        await asyncio.wait_for(
            producer.send_and_wait(topic, key=settings.app_id_prefix.encode(), value=json.dumps(record).encode()),
            timeout_s,
        )
    finally:
        await producer.stop()
    log.info("announced %s %s (previous %s) on %s", record["action"], record["version"], record["previous"], topic)
    return record


def announce_model_update(settings: Settings, entry: dict) -> None:
    """Sync :func:`aannounce_model_update` (the registry CLI's hook). Not from
    inside a running event loop: await :func:`aannounce_model_update` there."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(aannounce_model_update(settings, entry))
        return
    raise RuntimeError("announce_model_update() called inside an event loop; await aannounce_model_update()")
