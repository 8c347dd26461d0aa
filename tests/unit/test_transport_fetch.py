"""PGKD_KAFKA_FETCH_WAIT_S reaches the consumer Faust builds for a worker: the
broker may hold its fetches that long to gather records (streams.transport).
No broker needed: an aiokafka consumer connects only when it starts."""

from __future__ import annotations

import asyncio

import pytest

from pgkd.settings import Settings
from streams.app import build_app
from streams.transport import FETCH_MIN_BYTES, gather_fetches


def _worker_consumer(settings: Settings, tmp_path):
    """The aiokafka consumer the classify worker's consumer thread would start."""

    async def build():
        app = build_app(settings.model_copy(update={"faust_datadir": tmp_path}), "classify")
        thread = app.consumer._thread
        return app, thread._create_worker_consumer(app.transport)

    return asyncio.run(build())


def test_a_worker_consumer_lets_the_broker_gather_records_for_the_configured_wait(tmp_path):
    app, consumer = _worker_consumer(Settings(kafka_bootstrap="127.0.0.1:9", kafka_fetch_wait_s=0.005), tmp_path)
    assert app.fetch_wait_s == 0.005
    assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (FETCH_MIN_BYTES, 5)


def test_by_default_fausts_fetch_is_kept_answered_at_the_first_byte(tmp_path):
    _, consumer = _worker_consumer(Settings(kafka_bootstrap="127.0.0.1:9"), tmp_path)
    assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (1, 1500)  # Faust's own


@pytest.mark.parametrize("wait_s, expected_ms", [(0.0004, 1), (0.02, 20), (1.0, 1000)])
def test_the_wait_is_whole_milliseconds_at_least_one(wait_s, expected_ms):
    class Consumer:
        _fetch_min_bytes, _fetch_max_wait_ms = 1, 1500

    consumer = gather_fetches(Consumer(), wait_s)
    assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (FETCH_MIN_BYTES, expected_ms)


def test_the_setting_is_bounded():
    with pytest.raises(ValueError, match="kafka_fetch_wait_s"):
        Settings(kafka_fetch_wait_s=-0.1)
    with pytest.raises(ValueError, match="kafka_fetch_wait_s"):
        Settings(kafka_fetch_wait_s=2)
