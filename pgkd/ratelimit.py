"""Token buckets for the teacher's rate limits: requests per minute and tokens
per minute, as LLM providers meter them.

The buckets are per process: run one teacher worker, or give each of N
workers 1/N of the provider's limits (``PGKD_TEACHER_RPM`` / ``PGKD_TEACHER_TPM``).
A 429 that still gets through is retried by the teacher client with the
server's Retry-After.

>>> clock = FakeClock()
>>> bucket = TokenBucket(rate_per_s=1.0, capacity=2.0, clock=clock)
>>> bucket.wait_time(2), bucket.take(2), bucket.wait_time(1)
(0.0, None, 1.0)
>>> clock.advance(1.0); bucket.wait_time(1)
0.0
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class FakeClock:
    """A monotonic clock that only moves when told to (tests and doctests)."""

    def __init__(self, start: float = 0.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s``; starts full.

    A request larger than the capacity is clamped to it (it waits for a full
    bucket instead of forever): one oversized prompt must not stall the agent.
    """

    def __init__(self, rate_per_s: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError(f"rate_per_s and capacity must be > 0, got {rate_per_s} and {capacity}")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now

    def wait_time(self, n: float) -> float:
        """Seconds until ``n`` tokens are available (0 when they are now)."""
        self._refill()
        missing = min(n, self.capacity) - self._tokens
        return max(0.0, missing / self.rate_per_s)

    def take(self, n: float) -> None:
        """Take ``n`` tokens (clamped to the capacity); the balance may go negative,
        which makes later callers wait: the debt is paid before anyone else goes."""
        self._refill()
        self._tokens -= min(n, self.capacity)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets, one ``acquire`` for both.

    Each bucket holds one minute's worth, so a quiet minute allows a burst of a
    full minute's quota, never more. ``acquire`` is fair enough for one event
    loop: callers are served in arrival order through a lock.

    >>> clock = FakeClock()
    >>> limiter = RateLimiter(rpm=2, tpm=1000, clock=clock)
    >>> limiter.delay(tokens=100), limiter.take(100), limiter.take(100), limiter.delay(tokens=100)
    (0.0, None, None, 30.0)
    """

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic):
        self.requests = TokenBucket(rpm / 60.0, float(rpm), clock)
        self.tokens = TokenBucket(tpm / 60.0, float(tpm), clock)
        self._lock = asyncio.Lock()

    def delay(self, tokens: int) -> float:
        """Seconds to wait before a request of ``tokens`` tokens may go."""
        return max(self.requests.wait_time(1), self.tokens.wait_time(tokens))

    def take(self, tokens: int) -> None:
        self.requests.take(1)
        self.tokens.take(tokens)

    async def acquire(self, tokens: int, sleep: Callable[[float], object] = asyncio.sleep) -> float:
        """Wait until one request of ``tokens`` tokens may go, then take them.
        Returns the seconds waited (for the metric)."""
        waited = 0.0
        async with self._lock:
            while (delay := self.delay(tokens)) > 0:
                await sleep(delay)  # type: ignore[misc]
                waited += delay
            self.take(tokens)
        return waited
