"""The hot swap's load thread yields the CPU to inference: it runs at a higher
nice value than the worker's other threads (docs/BENCHMARKS.md, hot swap); the
threads a load starts for serving do not stay lowered."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from pgkd.priority import at_base_priority, thread_nice_increment
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


def on_lowered_thread(fn, increment=5, tids=None):
    """``fn()``'s result, called on a new thread lowered by ``increment`` (as a hot swap's load thread is);
    its native id appended to ``tids``."""
    out = {}

    def run():
        if tids is not None:
            tids.append(threading.get_native_id())
        assert lower_thread_priority(increment)
        try:
            out["result"] = fn()
        except Exception as err:  # noqa: BLE001 - re-raised by the test
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_at_base_priority_runs_a_lowered_threads_call_at_the_process_priority_and_keeps_its_errors():
    assert on_lowered_thread(thread_nice_increment) == 5
    assert on_lowered_thread(lambda: at_base_priority(thread_nice_increment)) == 0
    caller = threading.get_native_id()
    assert at_base_priority(threading.get_native_id) == caller  # not lowered: runs where it is called

    def fails():
        raise ValueError("kept")

    with pytest.raises(ValueError, match="kept"):
        on_lowered_thread(lambda: at_base_priority(fails))


def tiny_graph() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("threads", [1, 2])
def test_an_onnx_session_made_on_a_lowered_thread_serves_on_threads_at_the_process_priority(threads):
    """A hot-swapped version's ONNX Runtime session is created on the lowered load
    thread; its intra-op threads (PGKD_TORCH_THREADS > 1) must not inherit +5 for good."""
    pytest.importorskip("onnxruntime")
    from pgkd.inference_onnx import session

    graph = tiny_graph()
    session(graph, threads)  # the runtime's own first-use threads are not what this test is about
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    before, lowered = set(os.listdir("/proc/self/task")), []
    served = on_lowered_thread(lambda: session(graph, threads), tids=lowered)
    # the threads that appeared: the session's pool, and any other thread of this process (pytest-xdist's);
    # not the lowered thread, which join() can return before it has left /proc
    started = {int(tid) for tid in set(os.listdir("/proc/self/task")) - before} - set(lowered)
    if threads > 1:
        assert started  # the intra-op pool
    assert {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in started} == dict.fromkeys(started, base)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(served.run(None, {"x": x})[0], x)
