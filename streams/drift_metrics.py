"""Drift in a classify worker: the Prometheus gauges of a
:class:`pgkd.drift.DriftMonitor`, and the alarm record in Redis that the
curator reads as a retrain trigger (docs/METRICS.md, "Drift").

The worker calls :meth:`DriftWatch.reset` whenever it starts serving a model
version and :meth:`DriftWatch.after_batch` after each batch. The reference is
the version's validation predictions, ``drift_reference`` in its
``manifest.json`` (:meth:`pgkd.drift.Reference.to_dict`); a version without
one is compared with its own first full window on the stream.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from prometheus_client import Counter, Gauge

from pgkd.drift import DriftMonitor, Reference
from streams import metrics

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from pgkd.serving import ServingModel
    from pgkd.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("class", "confidence")
DRIFT_PSI = Gauge("pgkd_drift_psi", "PSI of the drift window against the serving version's reference", ["kind"])
DRIFT_KL = Gauge("pgkd_drift_kl", "KL(window || reference) of the drift window, in nats", ["kind"])
DRIFT_ALARM = Gauge("pgkd_drift_alarm", "1 while the drift window's PSI is above the threshold")
DRIFT_ALARMS = Counter("pgkd_drift_alarms", "Drift alarms raised by this worker (at most one per cool-down)")

STREAM_MAXLEN = 1000  # alarms kept in the Redis stream (approximately)


def alarm_key(prefix: str) -> str:
    """The last alarm, a JSON string (``pgkd:drift:alarm`` by default)."""
    return f"{prefix}:drift:alarm"


def alarm_stream(prefix: str) -> str:
    """Every alarm, a Redis stream with one field ``record`` (the same JSON)."""
    return f"{prefix}:drift:alarms"


def cooldown_key(prefix: str) -> str:
    """Held for the cool-down by the worker that published the last alarm."""
    return f"{prefix}:drift:cooldown"


def observe(monitor: DriftMonitor) -> None:
    """Export the monitor's state; call it after each :meth:`DriftMonitor.update`."""
    if monitor.ready:
        DRIFT_PSI.labels("class").set(monitor.psi_class)
        DRIFT_PSI.labels("confidence").set(monitor.psi_confidence)
        DRIFT_KL.labels("class").set(monitor.kl_class)
        DRIFT_KL.labels("confidence").set(monitor.kl_confidence)
    DRIFT_ALARM.set(1 if monitor.drifting else 0)
    if monitor.drift_detected:
        DRIFT_ALARMS.inc()


def clear() -> None:
    """No drift series until the next version's window is full (its numbers are not comparable)."""
    DRIFT_PSI.clear()
    DRIFT_KL.clear()
    DRIFT_ALARM.set(0)


def alarm_record(monitor: DriftMonitor, model_version: str, worker: str, now: float | None = None) -> dict:
    """The alarm as the curator reads it (epoch seconds, PSI = the larger of the two)."""
    return {
        "ts": time.time() if now is None else now,
        "psi": round(max(monitor.psi_class or 0.0, monitor.psi_confidence or 0.0), 6),
        "psi_class": round(monitor.psi_class or 0.0, 6),
        "psi_confidence": round(monitor.psi_confidence or 0.0, 6),
        "kl_class": round(monitor.kl_class or 0.0, 6),
        "kl_confidence": round(monitor.kl_confidence or 0.0, 6),
        "threshold": monitor.psi_threshold,
        "window": monitor.n,
        "model_version": model_version,
        "worker": worker,
    }


async def publish_alarm(client: aioredis.Redis, prefix: str, record: dict, cooldown_s: float) -> bool:
    """Publish an alarm unless another worker published one within the cool-down.

    True when published: ``SET {prefix}:drift:alarm`` (the last one) and
    ``XADD {prefix}:drift:alarms``. Redis being down is logged and counted
    (``pgkd_redis_errors_total{op="drift_alarm"}``), never raised.
    """
    try:
        if cooldown_s > 0:
            held = await client.set(cooldown_key(prefix), record["worker"], nx=True, px=max(1, int(cooldown_s * 1000)))
            if not held:
                log.info("drift alarm not published: another worker alarmed within the last %.0fs", cooldown_s)
                return False
        payload = json.dumps(record, sort_keys=True)
        async with client.pipeline(transaction=True) as pipe:
            pipe.set(alarm_key(prefix), payload)
            pipe.xadd(alarm_stream(prefix), {"record": payload}, maxlen=STREAM_MAXLEN, approximate=True)
            await pipe.execute()
    except (redis.RedisError, OSError) as err:
        log.warning("redis drift alarm failed (%s: %s); the alarm stays in the metrics only", type(err).__name__, err)
        metrics.REDIS_ERRORS.labels("drift_alarm").inc()
        return False
    log.warning("drift alarm published: %s", payload)
    return True


def manifest_reference(model_dir: Path) -> Reference | None:
    """``drift_reference`` of the version's manifest.json, None when it has none."""
    path = Path(model_dir) / "manifest.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8")).get("drift_reference")
        return Reference.from_dict(obj) if obj else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring the drift reference of %s: %s", path, err)
        return None


class DriftWatch:
    """A classify worker's drift monitor, across the model versions it serves."""

    def __init__(self, settings: Settings, client: aioredis.Redis | None, worker: str | None = None):
        self.settings = settings
        self.client = client
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.monitor: DriftMonitor | None = None
        self.version: str | None = None
        self._bootstrap: tuple[list[str], list[float]] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftWatch | None:
        """None when ``PGKD_DRIFT_ENABLED`` is off."""
        if not settings.drift_enabled:
            return None
        from pgkd.teacher_cache import connect

        return cls(settings, connect(settings.redis_url.get_secret_value(), settings.redis_timeout_s))

    def _monitor(self, reference: Reference) -> DriftMonitor:
        s = self.settings
        return DriftMonitor.from_reference(
            reference, window=s.drift_window, psi_threshold=s.drift_psi_threshold,
            cooldown_s=s.drift_cooldown_s, bins=s.drift_bins,
        )

    def reset(self, model: ServingModel) -> None:
        """Compare with ``model``'s reference from now on (at start and at each swap)."""
        self.version = model.version
        clear()
        reference = manifest_reference(model.path)
        if reference is not None:
            if self.monitor is None:
                self.monitor = self._monitor(reference)
            else:  # keeps the cool-down: a promotion right after an alarm must not alarm again at once
                self.monitor.set_reference(reference.class_probs, reference.confidences)
            self._bootstrap = None
            log.info("drift reference of %s: its validation predictions (%d)", model.version, len(reference.confidences))
        else:
            self._bootstrap = ([], [])
            log.info("drift reference of %s: its first %d predictions (its manifest has no drift_reference)",
                     model.version, self.settings.drift_window)

    async def after_batch(self, labels: Sequence[str], confidences: Sequence[float], version: str | None = None) -> None:
        """Feed one batch's student answers (of ``version``, when given: a batch
        that finished after a swap is skipped); export, and publish an alarm when one is raised."""
        if version is not None and version != self.version:
            return
        if self._bootstrap is not None:
            seen_labels, seen_conf = self._bootstrap
            seen_labels.extend(labels)
            seen_conf.extend(confidences)
            if len(seen_labels) < self.settings.drift_window:
                return
            shares: dict[str, float] = {}
            for label in seen_labels:
                shares[label] = shares.get(label, 0.0) + 1.0
            reference = Reference(shares, tuple(seen_conf))
            if self.monitor is None:
                self.monitor = self._monitor(reference)
            else:
                self.monitor.set_reference(reference.class_probs, reference.confidences)
            self._bootstrap = None
            return
        if self.monitor is None or not labels:
            return
        self.monitor.update(labels, confidences)
        observe(self.monitor)
        if self.monitor.drift_detected and self.client is not None:
            record = alarm_record(self.monitor, self.version or "", self.worker)
            await publish_alarm(self.client, self.settings.app_id_prefix, record, self.settings.drift_cooldown_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
