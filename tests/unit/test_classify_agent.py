"""The classify agent's inference fallback, without a broker: one text the model
cannot take is isolated (-> DLQ), a model that fails on everything stops the batch."""

import asyncio
import importlib
import sys
import time

import numpy as np
import pytest

from pgkd.serving import ServingModel


class FlakyStudent:
    labels = ["a", "b"]

    def predict_proba(self, texts, batch_size=64):
        if any("boom" in t for t in texts):
            raise ValueError("cannot tokenise")
        return np.full((len(texts), 2), 0.5, dtype=np.float32)


@pytest.fixture
def classifier(monkeypatch, tmp_path):
    monkeypatch.setenv("PGKD_SERVE_MODEL", str(tmp_path))
    monkeypatch.setenv("PGKD_FAUST_DATADIR", str(tmp_path / "faust"))
    module = importlib.import_module("streams.classify")  # builds an App; connects to nothing
    return module.Classifier(module.settings, module.topics), ServingModel(FlakyStudent(), "v1", tmp_path)


def test_a_text_the_model_cannot_take_is_isolated(classifier):
    worker, model = classifier
    out = asyncio.run(worker._predict(model, ["fine", "boom", "also fine"]))
    assert isinstance(out[1], ValueError)
    assert [o.tolist() for i, o in enumerate(out) if i != 1] == [[0.5, 0.5], [0.5, 0.5]]


def test_a_model_that_fails_on_every_text_stops_the_batch(classifier):
    worker, model = classifier
    with pytest.raises(RuntimeError, match="inference fails on every text"):
        asyncio.run(worker._predict(model, ["boom 1", "boom 2"]))
    # a batch of one failing text is that text's fault: dead-lettered, not fatal
    assert isinstance(asyncio.run(worker._predict(model, ["boom"]))[0], ValueError)


# --- pipelining: batch k+1 is inferred while batch k's records are built and stored ---


class GatedStudent:
    """Blocks each predict_proba call until the test opens its gate; logs the calls."""

    labels = ["a", "b"]

    def __init__(self):
        import threading

        self.calls: list[list[str]] = []
        self.gates: list[threading.Event] = [threading.Event() for _ in range(4)]

    def predict_proba(self, texts, batch_size=64):
        self.calls.append(list(texts))
        assert self.gates[len(self.calls) - 1].wait(10), "the test never opened this gate"
        if any("boom" in t for t in texts):
            raise ValueError("cannot tokenise")
        return np.tile(np.array([[0.9, 0.1]], dtype=np.float32), (len(texts), 1))


def _batch(*ids):
    from streams.delivery import Incoming

    return [Incoming("texts.in", 0, i, 1.0, b'{"id": "%s", "text": "text %s"}' % (k.encode(), k.encode()))
            for i, k in enumerate(ids)]


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` (set by the inference thread) until it holds or the time is up."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _record_sends(monkeypatch) -> list[str]:
    """Replace the classifier's queue() by one that records the keys (each record
    acknowledged at once); returns that list."""
    import streams.classify

    sent: list[str] = []

    async def queue(topic, key, value):
        sent.append(key)
        acked = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked

    monkeypatch.setattr(streams.classify, "queue", queue)
    return sent


def _gated(classifier, monkeypatch):
    """A classifier whose takes are full at 2 messages (a full take is pipelined), its
    gated student, and the keys it sends."""
    worker, _ = classifier
    worker = type(worker)(worker.settings.model_copy(update={"batch_size": 2}), worker.topics)
    student = GatedStudent()
    worker.model = ServingModel(student, "v1", None)
    return worker, student, _record_sends(monkeypatch)


def test_the_next_batch_is_queued_for_inference_before_this_one_is_answered(classifier, monkeypatch):
    worker, student, sent = _gated(classifier, monkeypatch)

    async def run():
        first = await worker.handle(_batch("1a", "1b"))  # a full take: returns with batch 1 queued, not inferred
        second = await worker.handle(_batch("2a", "2b"))
        await _until(lambda: student.calls)
        assert student.calls == [["text 1a", "text 1b"]] and not first.done() and sent == []
        student.gates[0].set()  # batch 1 inferred: its records go out; batch 2 is already in the thread
        await first
        assert sent == ["1a", "1b"] and not second.done()
        await _until(lambda: len(student.calls) == 2)  # the inference thread takes batch 2 once batch 1 is done
        assert student.calls[1] == ["text 2a", "text 2b"] and not second.done()
        student.gates[1].set()
        await second
        assert sent == ["1a", "1b", "2a", "2b"]

    asyncio.run(run())


def test_a_batch_that_is_not_full_returns_once_inferred(classifier, monkeypatch):
    # the stream has caught up: the next take waits for this inference, and so holds
    # everything that arrives meanwhile, instead of queueing a small batch behind it
    worker, student, sent = _gated(classifier, monkeypatch)

    async def run():
        handled = asyncio.ensure_future(worker.handle(_batch("1a")))
        await _until(lambda: student.calls)
        await asyncio.sleep(0.05)
        assert not handled.done() and sent == []
        student.gates[0].set()
        stored = await asyncio.wait_for(handled, 5)  # returns once inferred; the records follow
        await stored
        assert sent == ["1a"]

    asyncio.run(run())


def test_a_failed_batch_fails_its_future_and_the_next_batch_goes_on(classifier, monkeypatch):
    worker, student, sent = _gated(classifier, monkeypatch)
    for gate in student.gates:
        gate.set()

    async def run():
        failed = await worker.handle(_batch("boom1", "boom2"))  # fails as a batch, then text by text
        after = await worker.handle(_batch("3a"))
        with pytest.raises(RuntimeError, match="inference fails on every text"):
            await failed
        await asyncio.wait_for(after, 5)  # never acked past the failure (run_batches), but it does not hang
        assert sent == ["3a"]

    asyncio.run(run())


def test_two_lanes_infer_two_batches_at_once_and_answer_in_batch_order(monkeypatch, tmp_path):
    import threading

    import streams.classify

    monkeypatch.setenv("PGKD_SERVE_MODEL", str(tmp_path))
    monkeypatch.setenv("PGKD_FAUST_DATADIR", str(tmp_path / "faust"))
    monkeypatch.setenv("PGKD_INFERENCE_LANES", "2")
    monkeypatch.setenv("PGKD_BATCH_SIZE", "2")  # full takes of 2: pipelined
    from pgkd.settings import load_settings

    worker = streams.classify.Classifier(load_settings(), streams.classify.topics)
    gates = {"text 1a": threading.Event(), "text 2a": threading.Event()}
    inside: set[str] = set()

    class Student:
        labels = ["a", "b"]

        def predict_proba(self, texts, batch_size=64):
            inside.add(texts[0])
            assert gates[texts[0]].wait(10)
            return np.tile(np.array([[0.9, 0.1]], dtype=np.float32), (len(texts), 1))

    worker.model = ServingModel(Student(), "v1", None)
    sent = _record_sends(monkeypatch)

    async def run():
        first = await worker.handle(_batch("1a", "1b"))
        second = await worker.handle(_batch("2a", "2b"))
        await _until(lambda: len(inside) == 2)
        assert inside == {"text 1a", "text 2a"}  # both batches in inference at once
        gates["text 2a"].set()  # the second batch finishes first ...
        await asyncio.sleep(0.1)
        assert sent == [] and not second.done()  # ... but its records wait for the first batch's
        gates["text 1a"].set()
        await asyncio.gather(first, second)
        assert sent == ["1a", "1b", "2a", "2b"]

    asyncio.run(run())


# --- the GIL switch interval: set at start, before the model loads ---


@pytest.fixture
def switch_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_worker_shortens_the_gil_switch_interval_before_it_loads_its_model(classifier, monkeypatch,
                                                                                switch_interval):
    worker, model = classifier
    sys.setswitchinterval(0.005)  # Python's default
    module = importlib.import_module("streams.classify")
    seen = []
    monkeypatch.setattr(module, "load_serving_model", lambda settings: seen.append(sys.getswitchinterval()) or model)
    asyncio.run(worker.start())
    assert worker.settings.gil_switch_interval_s == 0.0005  # the default
    assert seen == [pytest.approx(0.0005)]
    assert worker.model is model


def test_a_zero_switch_interval_leaves_pythons_own(switch_interval):
    from pgkd.settings import Settings
    from streams.classify import share_the_gil

    sys.setswitchinterval(0.004)
    share_the_gil(Settings(gil_switch_interval_s=0))
    assert sys.getswitchinterval() == pytest.approx(0.004)
    share_the_gil(Settings(gil_switch_interval_s=0.001))
    assert sys.getswitchinterval() == pytest.approx(0.001)


# --- a hung model: PGKD_INFERENCE_TIMEOUT_S (streams.watchdog) ---


class HangingStudent:
    """Never returns from a call with a text containing "hang" until killed; with
    ``killable`` it has a ChildStudent's kill(), which fails the waiting call."""

    labels = ["a", "b"]

    def __init__(self, killable: bool):
        import threading

        self.released = threading.Event()
        self.killed: list[str] = []
        self.hangs = True
        if killable:
            self.kill = self._kill

    def _kill(self, reason):
        self.killed.append(reason)
        self.released.set()

    def predict_proba(self, texts, batch_size=64):
        if self.hangs and any("hang" in t for t in texts):
            self.released.wait(10)
            self.released.clear()
            raise RuntimeError(f"the inference process was killed ({self.killed[-1] if self.killed else '-'})")
        return np.full((len(texts), 2), 0.5, dtype=np.float32)


def _hung_count(version):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("pgkd_inference_hung_total", {"model_version": version}) or 0.0


def _with_timeout(module, timeout_s, **kwargs):
    settings = module.settings.model_copy(update={"inference_timeout_s": timeout_s})
    return module.Classifier(settings, module.topics, **kwargs)


def test_a_text_that_hangs_an_inference_process_is_killed_out_and_the_others_answered(classifier):
    module = importlib.import_module("streams.classify")
    worker = _with_timeout(module, 0.3)
    student = HangingStudent(killable=True)
    model = ServingModel(student, "v-hang", None)
    before = _hung_count("v-hang")

    async def run():
        watch = asyncio.ensure_future(worker.watchdog.run())
        try:
            return await asyncio.wait_for(worker._predict(model, ["fine", "hang here", "also fine"]), 10)
        finally:
            watch.cancel()

    out = asyncio.run(run())
    assert isinstance(out[1], RuntimeError) and "no answer in 0.3 s" in str(out[1])  # -> the DLQ, with the reason
    assert [o.tolist() for i, o in enumerate(out) if i != 1] == [[0.5, 0.5], [0.5, 0.5]]
    assert student.killed == ["no answer in 0.3 s"] * 2  # the batch's call, then the text's own
    assert _hung_count("v-hang") - before == 2


def test_a_hung_model_in_the_workers_own_threads_makes_it_exit_without_acking(classifier, monkeypatch):
    module = importlib.import_module("streams.classify")
    from streams.delivery import EXIT_INFERENCE_HUNG

    student = HangingStudent(killable=False)
    exits = []

    def exit_(code):  # the real one is os._exit: nothing after it runs, the batch is never acknowledged
        exits.append(code)
        student.hangs = False  # (this one returns: the retry of the text must not hang again)
        student.released.set()  # lets the test's thread go

    worker = _with_timeout(module, 0.3, exit=exit_)
    committed = []

    async def commit_then_exit(consumer, code, exit):  # tests/unit/test_delivery.py tests the real one
        committed.append(consumer)
        exit(code)

    monkeypatch.setattr(module, "commit_then_exit", commit_then_exit)

    async def run():
        watch = asyncio.ensure_future(worker.watchdog.run())
        try:
            return await asyncio.wait_for(worker._predict(ServingModel(student, "v-stuck", None), ["hang"]), 10)
        finally:
            watch.cancel()

    asyncio.run(run())
    assert exits == [EXIT_INFERENCE_HUNG]
    assert committed == [module.topics.texts_in.app.consumer]  # what was acked is committed first
