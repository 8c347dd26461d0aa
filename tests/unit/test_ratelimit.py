"""Token buckets and the requests/tokens-per-minute limiter, on a fake clock."""

import asyncio

import pytest

from pgkd.ratelimit import FakeClock, RateLimiter, TokenBucket


def test_bucket_starts_full_and_refills_at_its_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, capacity=4.0, clock=clock)
    assert bucket.wait_time(4) == 0.0
    bucket.take(4)
    assert bucket.wait_time(1) == pytest.approx(0.5)
    clock.advance(1.0)
    assert bucket.wait_time(2) == 0.0
    clock.advance(100.0)  # never above capacity
    bucket.take(4)
    assert bucket.wait_time(1) == pytest.approx(0.5)


def test_oversized_request_waits_for_a_full_bucket_not_forever():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1.0, capacity=10.0, clock=clock)
    bucket.take(5)
    assert bucket.wait_time(1000) == pytest.approx(5.0)


def test_bucket_rejects_nonpositive_rates():
    with pytest.raises(ValueError, match="must be > 0"):
        TokenBucket(0, 1)


def _run_limited(limiter: RateLimiter, clock: FakeClock, requests: list[int]) -> list[float]:
    """Acquire for each request in turn; sleeping advances the fake clock. Returns start times."""

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    async def main() -> list[float]:
        starts = []
        for tokens in requests:
            await limiter.acquire(tokens, sleep=sleep)
            starts.append(clock())
        return starts

    return asyncio.run(main())


def test_requests_per_minute():
    clock = FakeClock()
    starts = _run_limited(RateLimiter(rpm=60, tpm=10**9, clock=clock), clock, [1] * 62)
    assert starts[59] == 0.0  # a full minute's burst
    assert starts[60] == pytest.approx(1.0)  # then one a second
    assert starts[61] == pytest.approx(2.0)


def test_tokens_per_minute():
    clock = FakeClock()
    starts = _run_limited(RateLimiter(rpm=10**6, tpm=6000, clock=clock), clock, [3000, 3000, 3000, 1500])
    assert starts[:2] == [0.0, 0.0]
    assert starts[2] == pytest.approx(30.0)  # 3000 tokens at 100 tokens/s
    assert starts[3] == pytest.approx(45.0)


def test_acquire_reports_the_time_waited():
    clock = FakeClock()
    limiter = RateLimiter(rpm=1, tpm=100, clock=clock)

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    async def main() -> tuple[float, float]:
        return await limiter.acquire(10, sleep=sleep), await limiter.acquire(10, sleep=sleep)

    first, second = asyncio.run(main())
    assert first == 0.0
    assert second == pytest.approx(60.0)
