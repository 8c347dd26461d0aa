"""Inference calls that never return: a hung model.

A classify worker's inference runs on threads of its own. If a call never
returns (a deadlock in the runtime, a model that loops on some input, a
stopped process), the worker keeps its partitions, its consumer keeps
heartbeating, and nothing is answered: a stall no rebalance ends. The watchdog
times every call on the inference threads (:meth:`InferenceWatchdog.call`) and,
from the event loop (:meth:`InferenceWatchdog.run`), reports each call that has
run longer than ``PGKD_INFERENCE_TIMEOUT_S`` once, to the worker's handler:
a model served by a child process (``PGKD_INFERENCE_PROCESS``) is killed, and
the call fails like a crash of that process (the batch is retried text by text,
so a text that hangs the model is dead-lettered and the others are answered);
a model in the worker's own threads cannot be stopped, so the worker exits
without acknowledging the batch and a restart redelivers it
(:meth:`streams.classify.Classifier.hung`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Call:
    """One call on an inference thread: what it was given and since when it runs."""

    what: object  # the caller's description (the classifier passes the ServingModel)
    texts: int
    started: float = field(default_factory=time.monotonic)
    thread: str = field(default_factory=lambda: threading.current_thread().name)
    reported: bool = False

    def running_s(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


class InferenceWatchdog:
    """The calls running on the inference threads, and those past ``timeout_s``
    (0: no limit; :meth:`call` then only calls)."""

    def __init__(self, timeout_s: float, on_hung: Callable[[Call], object]):
        self.timeout_s = timeout_s
        self.on_hung = on_hung
        self._running: dict[int, Call] = {}  # by thread: an inference thread runs one call at a time

    def call(self, what: object, texts: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, timed (on the inference thread: a dict entry in and out)."""
        if not self.timeout_s:
            return fn(*args)
        key = threading.get_ident()
        self._running[key] = Call(what, texts)
        try:
            return fn(*args)
        finally:
            del self._running[key]

    def overdue(self, now: float | None = None) -> list[Call]:
        """The calls past the timeout not reported yet, marked reported."""
        now = time.monotonic() if now is None else now
        late = [c for c in list(self._running.values()) if not c.reported and c.running_s(now) > self.timeout_s]
        for c in late:
            c.reported = True
        return late

    async def run(self) -> None:
        """Check every quarter of the timeout (at most every second); report each overdue call once."""
        if not self.timeout_s:
            return
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            for late in self.overdue():
                self.on_hung(late)
