"""The teacher's shared state in Redis: answers cached by text hash (the same
text never costs twice) and the money spent so far (the budget holds across
restarts and across teacher workers).

Redis is an optimisation here, not a dependency: when it is down a cache read
is a miss, a cache write is skipped, and spending is counted locally until
Redis answers again. Each failure is logged and reported through ``on_error``
(the worker counts it in a metric); none is raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from pgkd.prompts import normalize_text

log = logging.getLogger(__name__)

OnError = Callable[[str], None]  # called with the operation name: "get", "set", "spent", ...


def connect(url: str, timeout_s: float = 1.0) -> aioredis.Redis:
    """An async Redis client that fails fast: an outage must cost the agent a
    timeout, not a stall (socket timeouts; no client-side retries)."""
    return aioredis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        retry=None,
        decode_responses=False,
    )


def taxonomy_hash(labels: Sequence[str]) -> str:
    """A short hash of the label set (order does not matter): a cached answer is
    only valid for the taxonomy it was given.

    >>> taxonomy_hash(["b", "a"]) == taxonomy_hash(["a", "b"])
    True
    >>> len(taxonomy_hash(["a", "b"]))
    16
    """
    blob = json.dumps(sorted(labels), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def text_hash(text: str, taxonomy: str) -> str:
    """sha256 of the normalised text (whitespace collapsed, case folded: the
    teacher's own notion of "the same text") and the taxonomy hash.

    >>> text_hash("Where is  MY card?", "t") == text_hash("where is my card?", "t")
    True
    >>> text_hash("where is my card?", "t") == text_hash("where is my card?", "u")
    False
    """
    return hashlib.sha256(f"{taxonomy}\n{normalize_text(text)}".encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CachedLabel:
    label: str
    teacher_model: str
    ts: float  # when the teacher answered (epoch seconds)


def _warn(op: str, err: Exception) -> None:
    log.warning("redis %s failed (%s: %s); going on without it", op, type(err).__name__, err)


class TeacherCache:
    """Teacher answers by text hash, in Redis (``{prefix}:teacher:cache:{hash}``)."""

    def __init__(
        self,
        client: aioredis.Redis,
        taxonomy: Sequence[str],
        ttl_s: int = 0,
        prefix: str = "pgkd",
        on_error: OnError | None = None,
    ):
        self._redis = client
        self._taxonomy = frozenset(taxonomy)
        self.taxonomy_hash = taxonomy_hash(taxonomy)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._on_error = on_error or (lambda op: None)

    def key(self, text: str) -> str:
        return f"{self.prefix}:teacher:cache:{text_hash(text, self.taxonomy_hash)}"

    async def get_many(self, texts: Sequence[str]) -> list[CachedLabel | None]:
        """The cached answer of each text, None for a miss (or when Redis is down)."""
        if not texts:
            return []
        try:
            raw = await self._redis.mget([self.key(t) for t in texts])
        except (redis.RedisError, OSError) as err:
            _warn("cache get", err)
            self._on_error("cache_get")
            return [None] * len(texts)
        return [self._decode(value) for value in raw]

    def _decode(self, value: bytes | None) -> CachedLabel | None:
        if value is None:
            return None
        try:
            obj = json.loads(value)
            hit = CachedLabel(str(obj["label"]), str(obj["teacher_model"]), float(obj["ts"]))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            return None  # unreadable entry: a miss, overwritten by the next answer
        # ts becomes the labelled_at of a teacher.labels record: NaN or inf would make it invalid JSON
        return hit if hit.label in self._taxonomy and math.isfinite(hit.ts) else None

    async def put_many(self, answers: Sequence[tuple[str, CachedLabel]]) -> None:
        """Store (text, answer) pairs; skipped (logged, counted) when Redis is down."""
        if not answers:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for text, hit in answers:
                    value = json.dumps({"label": hit.label, "teacher_model": hit.teacher_model, "ts": hit.ts})
                    pipe.set(self.key(text), value, ex=self.ttl_s or None)
                await pipe.execute()
        except (redis.RedisError, OSError) as err:
            _warn("cache set", err)
            self._on_error("cache_set")


# Add what was spent unsynced (ARGV[1]); then book ARGV[2] only if the total stays
# within the budget ARGV[3]. Returns {booked 0/1, the total as a string}.
_RESERVE = """
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) ~= 0 then total = tonumber(redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])) end
if total + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return {0, tostring(total)} end
return {1, redis.call('INCRBYFLOAT', KEYS[1], ARGV[2])}
"""


class SpendLedger:
    """Money spent on the teacher, shared in Redis (``{prefix}:teacher:spent_usd``),
    against a budget (``{prefix}:teacher:budget_usd`` overrides the configured one).

    When Redis is down, spending is kept locally and added to Redis once it
    answers again, so nothing spent is forgotten; meanwhile the local figure
    (last known total + unsynced spend) decides the budget.
    """

    def __init__(self, client: aioredis.Redis, budget_usd: float, prefix: str = "pgkd",
                 on_error: OnError | None = None):
        self._redis = client
        self.budget_usd = budget_usd
        self.key = f"{prefix}:teacher:spent_usd"
        self.budget_key = f"{prefix}:teacher:budget_usd"
        self.status_key = f"{prefix}:teacher:budget_status"
        self._on_error = on_error or (lambda op: None)
        self._last_known = 0.0  # the total Redis reported last
        self._unsynced = 0.0  # spent while Redis was down

    async def spent(self) -> float:
        """Total spent, all workers and restarts included (Redis), or the local estimate."""
        try:
            if self._unsynced:
                value = await self._redis.incrbyfloat(self.key, self._unsynced)
                self._unsynced = 0.0
            else:
                value = await self._redis.get(self.key)
            self._last_known = float(value or 0.0)
        except (redis.RedisError, OSError) as err:
            _warn("spend get", err)
            self._on_error("spend_get")
            return self._last_known + self._unsynced
        return self._last_known

    async def budget(self) -> float:
        """The budget: ``{prefix}:teacher:budget_usd`` in Redis when an operator set
        it (raise it there to resume without a restart), else the configured one."""
        try:
            value = await self._redis.get(self.budget_key)
        except (redis.RedisError, OSError) as err:
            _warn("budget get", err)
            self._on_error("budget_get")
            return self.budget_usd
        try:
            return float(value) if value is not None else self.budget_usd
        except ValueError:
            log.warning("ignoring %s=%r: not a number", self.budget_key, value)
            return self.budget_usd

    async def remaining(self) -> float:
        return await self.budget() - await self.spent()

    async def reserve(self, max_cost_usd: float) -> bool:
        """Book the most one teacher call can cost before making it; False (nothing
        booked) when that would take the total past the budget.

        The check and the booking are one Redis script (:data:`_RESERVE`), so
        concurrent calls of all workers can never spend more than the budget
        together, and the shared total never shows a refused booking, not even
        for a moment (it used to book, then take back). :meth:`settle` replaces the booking by the real
        cost once the answer came. A worker killed in between leaves its booking
        counted (spend is over-, never under-estimated). While Redis is down the
        worker books against its last known total plus what it spent since."""
        if max_cost_usd <= 0:
            return True
        budget = await self.budget()
        try:
            booked, total = await self._redis.eval(_RESERVE, 1, self.key, repr(self._unsynced), repr(max_cost_usd),
                                                   repr(budget))
            self._unsynced = 0.0
            self._last_known = float(total)
            return bool(int(booked))
        except (redis.RedisError, OSError) as err:
            _warn("spend reserve", err)
            self._on_error("spend_reserve")
            if self._last_known + self._unsynced + max_cost_usd > budget:
                return False
            self._unsynced += max_cost_usd
            return True

    async def settle(self, reserved_usd: float, cost_usd: float) -> None:
        """Replace a booking of :meth:`reserve` by what the call really cost."""
        if cost_usd > reserved_usd:
            log.warning("a teacher call cost $%.6f, more than the $%.6f booked for it (usage above the bound)",
                        cost_usd, reserved_usd)
        await self._adjust(cost_usd - reserved_usd)

    async def add(self, cost_usd: float) -> None:
        if cost_usd <= 0:
            return
        await self._adjust(cost_usd)

    async def _adjust(self, cost_usd: float) -> None:
        if cost_usd == 0:
            return
        try:
            self._last_known = float(await self._redis.incrbyfloat(self.key, cost_usd + self._unsynced))
            self._unsynced = 0.0
        except (redis.RedisError, OSError) as err:
            _warn("spend add", err)
            self._on_error("spend_add")
            self._unsynced += cost_usd

    async def record_status(self, exhausted: bool, reason: str, budget_usd: float | None = None) -> None:
        """Why calls stopped (or that they run again), for operators: ``GET {prefix}:teacher:budget_status``."""
        status: dict[str, Any] = {
            "exhausted": exhausted,
            "reason": reason,
            "spent_usd": round(self._last_known + self._unsynced, 6),
            "budget_usd": self.budget_usd if budget_usd is None else budget_usd,
            "ts": time.time(),
        }
        try:
            await self._redis.set(self.status_key, json.dumps(status))
        except (redis.RedisError, OSError) as err:
            _warn("budget status set", err)
            self._on_error("budget_status")
