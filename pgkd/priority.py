"""CPU priority for work that must not slow the stream.

Linux schedules threads one by one, and a thread's nice value is its own:
raising it for the calling thread leaves the process's other threads (the
event loop, inference) where they are, and threads it starts afterwards
inherit it (so does a child process: the ONNX graph builder, started from a
load thread, runs at the nice value it asks for or the inherited one, if
higher). Used by a classifier's model-load thread
(:data:`streams.hotswap.LOAD_NICE`) and by the ``pgkd models`` commands that
hash a version (:data:`ADMIN_NICE`). Work done on a lowered thread that
starts threads which must not stay lowered (an ONNX Runtime session's intra-op
pool, a child process that serves) is handed to :func:`at_base_priority`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Added to the nice value of `pgkd models promote`, `rollback`, `show` and `import`.
# `show` and `import` hash every file of a version (~155 MB for MiniLM with its
# int8 graph: ~0.3 s of a core), and so did every promotion until it learnt to
# skip the files unchanged since they last matched (Registry.verify_unchanged);
# a promotion still starts a Kafka producer. On a 2-core host that serves, at
# equal priority the hashing took CPU from the classifier worker's event loop and
# stalled its answers for up to ~0.4 s (docs/BENCHMARKS.md, hot swap); at +10 it
# runs on what the workers leave, a little later.
ADMIN_NICE = 10


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment``; False where the OS
    does not allow it (the caller then runs at its old priority)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except (AttributeError, OSError) as err:  # not Linux/BSD, or refused
        log.info("running at normal priority (%s)", err)
        return False
    return True


def thread_nice_increment() -> int:
    """How much lower than the process's main thread the calling thread runs (Linux: per-thread nice)."""
    try:
        return max(0, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
                   - os.getpriority(os.PRIO_PROCESS, os.getpid()))
    except (AttributeError, OSError):
        return 0


# A thread at the nice value of the thread that imports this module (a worker's
# main thread: streams.classify imports it at start-up), for at_base_priority.
# A new thread and a child process inherit the nice value of the thread that
# creates them, and an unprivileged thread cannot lower its nice value again, so
# it is created here, before any thread is lowered, and not by whichever thread
# first needs it.
_BASE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgkd-base-priority")
_BASE_LOWERED_BY = _BASE.submit(thread_nice_increment).result()  # 0 unless imported on a lowered thread


def at_base_priority(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` on a thread at the process's priority when the calling
    thread runs lowered (:func:`thread_nice_increment`), else on the calling thread;
    its result, or its exception. For calls that start threads or processes which
    outlive the call and must not run lowered: a hot swap's load thread runs at
    +10, and the intra-op threads of an ONNX Runtime session it created, or the
    process it started, would serve the new version at +10 for good."""
    increment = thread_nice_increment()
    if increment == 0:
        return fn(*args, **kwargs)
    if _BASE_LOWERED_BY:
        log.warning("pgkd.priority was first imported on a thread lowered by %d: %s runs lowered by %d",
                    _BASE_LOWERED_BY, getattr(fn, "__qualname__", fn), min(increment, _BASE_LOWERED_BY))
    return _BASE.submit(fn, *args, **kwargs).result()
