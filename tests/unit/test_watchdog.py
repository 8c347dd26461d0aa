"""streams.watchdog: inference calls past PGKD_INFERENCE_TIMEOUT_S are reported once each."""

import asyncio
import threading
import time

from streams.watchdog import InferenceWatchdog


def test_a_call_past_the_timeout_is_reported_once_and_a_quick_one_never():
    reported = []
    watchdog = InferenceWatchdog(0.2, reported.append)
    release = threading.Event()

    def hangs():
        assert release.wait(10)
        return "late"

    async def scenario():
        loop = asyncio.get_running_loop()
        watch = asyncio.ensure_future(watchdog.run())
        assert await loop.run_in_executor(None, watchdog.call, "v1", 3, lambda: "quick") == "quick"
        slow = loop.run_in_executor(None, watchdog.call, "v2", 5, hangs)
        await asyncio.sleep(0.8)  # past the timeout, and three more checks after it
        release.set()
        assert await slow == "late"
        watch.cancel()

    asyncio.run(scenario())
    assert [(c.what, c.texts, c.reported) for c in reported] == [("v2", 5, True)]
    assert reported[0].thread != threading.current_thread().name  # the thread the call ran on
    assert watchdog.overdue(time.monotonic() + 60) == []  # a finished call is no longer tracked


def test_overdue_reports_by_the_clock_and_marks_what_it_reported():
    watchdog = InferenceWatchdog(5.0, lambda call: None)
    calls = []
    watchdog.call("v1", 1, lambda: calls.extend(watchdog.overdue(time.monotonic() + 6)))  # inside the call
    assert [c.what for c in calls] == ["v1"]
    assert calls[0].reported


def test_without_a_timeout_nothing_is_tracked():
    watchdog = InferenceWatchdog(0, lambda call: None)
    seen = []
    assert watchdog.call("v1", 1, lambda: seen.extend(watchdog.overdue(time.monotonic() + 1e9)) or 7) == 7
    assert seen == []
    asyncio.run(asyncio.wait_for(watchdog.run(), 1))  # returns at once
