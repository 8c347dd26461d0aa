"""The hot swap's load thread yields the CPU to inference: it runs at a higher
nice value than the worker's other threads (docs/BENCHMARKS.md, hot swap)."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from pgkd.serving import ServingModel
from pgkd.settings import Settings
from streams.hotswap import LOAD_NICE, ModelWatcher, lower_thread_priority

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are set with setpriority(2)")


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class Registry:
    def current(self):
        return "v0002"

    def close(self):
        pass


class Student:
    def predict_proba(self, texts, batch_size=64):
        return np.ones((len(texts), 2)) / 2


def test_a_version_loads_on_a_thread_of_lower_priority_and_the_caller_keeps_its_own():
    served = [ServingModel(Student(), "v0001", None)]
    nice_while_loading = []

    def loader(settings, version):
        nice_while_loading.append(nice_of_this_thread())
        return ServingModel(Student(), version, None)

    watcher = ModelWatcher(Settings(), lambda: served[-1].version, served.append, loader=loader)
    watcher._registry = Registry()
    base = nice_of_this_thread()
    try:
        assert asyncio.run(watcher.reconcile("announced")) is True
    finally:
        watcher.close()
    assert served[-1].version == "v0002"
    assert nice_while_loading == [min(19, base + LOAD_NICE)]
    assert nice_of_this_thread() == base  # the event loop's (and inference's) threads are not lowered


def test_lower_thread_priority_changes_only_the_calling_thread():
    seen = {}

    def lowered():
        before = nice_of_this_thread()
        seen["ok"] = lower_thread_priority(3)
        seen["delta"] = nice_of_this_thread() - before

    base = nice_of_this_thread()
    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == {"ok": True, "delta": min(3, 19 - base)}
    assert nice_of_this_thread() == base
