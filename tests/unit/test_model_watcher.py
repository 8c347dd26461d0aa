"""The hot swap's decisions without Kafka: which version to load, when to refuse
one, and what the announcement carries."""

from __future__ import annotations

import asyncio
import doctest
import importlib
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgkd.errors import ModelIntegrityError, RegistryError, RegistryUnavailable
from pgkd.serving import ServingModel
from pgkd.settings import Settings
from streams import hotswap, metrics
from streams.announce import update_record
from streams.hotswap import SKIP_REASONS, ModelWatcher, read_update
from streams.topics import TopicState


@pytest.mark.parametrize("module", ["streams.announce", "streams.hotswap"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


class FakeStudent:
    def __init__(self):
        self.warmed = 0

    def predict_proba(self, texts, batch_size=64):
        self.warmed += 1
        return np.ones((len(texts), 2)) / 2


class FakeRegistry:
    def __init__(self, current):
        self.value = current

    def current(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def close(self):
        pass


def make_watcher(current: str | None, bad: set[str] = frozenset()):
    served: list[ServingModel] = [ServingModel(FakeStudent(), "v0001", None)]
    loads: list[str] = []

    def loader(settings, version):
        loads.append(version)
        if version in bad:
            raise ModelIntegrityError(f"{version} refused: model.safetensors does not match its sha256")
        return ServingModel(FakeStudent(), version, None)

    watcher = ModelWatcher(Settings(), lambda: served[-1].version, served.append, loader=loader)
    watcher._registry = FakeRegistry(current)
    return watcher, served, loads


def failures(reason: str) -> float:
    return metrics.MODEL_LOAD_FAILURES.labels(reason)._value.get()


def test_swaps_to_the_registry_pointer_after_warming_the_new_model():
    watcher, served, loads = make_watcher("v0003")
    # the announcement names v0002, but the pointer already moved on: the pointer wins
    assert asyncio.run(watcher.reconcile("announced", announced="v0002")) is True
    assert loads == ["v0003"] and served[-1].version == "v0003"
    assert served[-1].student.warmed == 1  # one prediction before it serves
    assert asyncio.run(watcher.reconcile("poll")) is False  # already serving it
    assert loads == ["v0003"]


def test_a_tampered_version_is_refused_and_not_retried_by_the_poll():
    watcher, served, loads = make_watcher("v0002", bad={"v0002"})
    before = failures("checksum")
    assert asyncio.run(watcher.reconcile("announced", announced="v0002")) is False
    assert served[-1].version == "v0001"  # the old model keeps serving
    assert failures("checksum") == before + 1
    assert asyncio.run(watcher.reconcile("poll")) is False
    assert loads == ["v0002"]  # the poll does not hammer a refused version
    asyncio.run(watcher.reconcile("announced", announced="v0002"))  # announced again: tried again
    assert loads == ["v0002", "v0002"]


def test_with_redis_down_the_announcement_is_followed():
    watcher, served, _ = make_watcher(RegistryUnavailable("cannot reach the registry's Redis"))
    assert asyncio.run(watcher.reconcile("announced", announced="v0004")) is True
    assert served[-1].version == "v0004"
    assert asyncio.run(watcher.reconcile("poll")) is False  # nothing to follow without Redis or a record


def test_update_record_takes_the_history_entry_fields_only():
    entry = {"action": "rollback", "version": "v0002", "previous": "v0003", "reason": "bad", "round": None,
             "ts": 10.0, "extra": "dropped"}
    assert update_record(entry) == {"version": "v0002", "previous": "v0003", "action": "rollback",
                                    "reason": "bad", "round": None, "ts": 10.0}
    with pytest.raises(ValueError, match="not a registry history entry"):
        update_record({"action": "delete", "version": "v0002"})


# --- hostile model.updates records ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=120) | st.builds(
    lambda v: json.dumps(v).encode(),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                 max_leaves=8)) | st.builds(
    lambda version, ts: json.dumps({"action": "promote", "version": version, "ts": ts}).encode(),
    st.text(max_size=8) | st.integers() | st.none() | st.sampled_from(["v0003", "v12", "../v0001", "v0003\n"]),
    st.floats() | st.text(max_size=4) | st.none()))
def test_read_update_returns_an_announcement_or_a_named_reason(value):
    update = read_update(value)
    if isinstance(update, tuple):
        reason, detail = update
        assert reason in SKIP_REASONS and len(detail.splitlines()) == 1 and len(detail) < 200
    else:
        assert isinstance(update, dict) and re.fullmatch(r"v\d{4,}", update["version"])


class Consumed:
    def __init__(self, offset, value):
        self.topic, self.partition, self.offset, self.value = "model.updates", 0, offset, value


class ScriptedConsumer:
    """An aiokafka consumer that hands out scripted batches, then waits."""

    batches: list[list[bytes]] = []
    polls = 0
    drained: asyncio.Event

    def __init__(self, **kwargs):
        assert kwargs["group_id"] is None

    async def start(self):
        pass

    async def stop(self):
        pass

    def assign(self, partitions):
        pass

    async def seek_to_end(self, *partitions):
        pass

    async def getmany(self, timeout_ms):
        cls = type(self)
        cls.polls += 1
        if cls.polls <= len(cls.batches):
            offset = 10 * cls.polls
            return {"p0": [Consumed(offset + i, v) for i, v in enumerate(cls.batches[cls.polls - 1])]}
        cls.drained.set()
        await asyncio.sleep(0.01)
        return {}


def test_malformed_updates_are_skipped_and_the_watcher_follows_on(monkeypatch):
    """Before: the first record that was not JSON (or not an object, or named no
    version) raised out of the follow loop; every other record of its poll was lost."""
    watcher, served, loads = make_watcher(RegistryUnavailable("cannot reach the registry's Redis"))
    base_loads = loads  # the fake loader refuses versions not in the store, as the registry does

    def loader(settings, version):
        base_loads.append(version)
        if version == "v0099":
            raise RegistryError("no version v0099 in the model store models")
        return ServingModel(FakeStudent(), version, None)

    watcher.loader = loader
    ScriptedConsumer.batches = [
        [b"not json", b"[1, 2]", b'{"action": "promote"}', b'{"version": 3}', b"", b"[" * 100_000,
         b'{"version": "v0003", "ts": 5.0}', b'{"version": "../v0001"}'],
        [b'{"version": "v0099", "ts": "soon"}'],  # names nothing in the store: refused, the old model serves
        [b'\xff\xfe', b'{"version": "v0004", "ts": NaN}', b'{"version": "v0004", "ts": 9}',
         b'{"version": "v0002", "ts": ' + b"9" * 400 + b"}"],  # a ts no float holds: not JSON we read
    ]
    ScriptedConsumer.polls = 0
    monkeypatch.setattr(hotswap, "AIOKafkaConsumer", ScriptedConsumer)

    async def one_partition(settings, fields):
        return [TopicState(fields[0], settings.topic_model_updates, False, 1, "delete")]

    monkeypatch.setattr(hotswap, "ensure_topics", one_partition)
    skipped = {reason: metrics.MODEL_UPDATES_SKIPPED.labels(reason)._value.get() for reason in SKIP_REASONS}
    not_found = failures("not_found")

    async def follow():
        ScriptedConsumer.drained = asyncio.Event()
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(ScriptedConsumer.drained.wait(), 10)
        assert not task.done()  # still following
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(follow())
    assert loads == ["v0003", "v0099", "v0004"]  # each announcement once, nothing re-read
    assert [m.version for m in served] == ["v0001", "v0003", "v0004"]
    assert failures("not_found") == not_found + 1
    after = {reason: metrics.MODEL_UPDATES_SKIPPED.labels(reason)._value.get() - skipped[reason]
             for reason in SKIP_REASONS}
    assert after == {"not_json": 5, "not_object": 1, "bad_version": 3}


# --- the previous version kept in memory (PGKD_KEEP_PREVIOUS_MODEL) -----------------------


def _watcher_that_keeps(keep: bool):
    served: list[ServingModel] = [ServingModel(FakeStudent(), "v0001", None)]
    loads: list[str] = []

    def loader(settings, version):
        loads.append(version)
        return ServingModel(FakeStudent(), version, None)

    def swap(model):  # what Classifier.swap does: install, return the one replaced
        served.append(model)
        return served[-2]

    watcher = ModelWatcher(Settings(keep_previous_model=keep), lambda: served[-1].version, swap, loader=loader)
    return watcher, served, loads


def test_a_rollback_to_the_version_just_replaced_loads_nothing():
    watcher, served, loads = _watcher_that_keeps(True)
    first = served[0]
    watcher._registry = FakeRegistry("v0002")
    assert asyncio.run(watcher.reconcile("announced")) is True
    watcher._registry = FakeRegistry("v0001")  # pgkd models rollback
    assert asyncio.run(watcher.reconcile("announced")) is True
    assert loads == ["v0002"] and served[-1] is first  # the very model object that served before
    watcher._registry = FakeRegistry("v0003")  # a third version: v0002 (kept) is not it, so it is loaded
    assert asyncio.run(watcher.reconcile("announced")) is True
    assert loads == ["v0002", "v0003"]
    assert watcher._standby is first  # only the version just replaced is kept
    watcher._registry = FakeRegistry("v0002")  # two back: no longer in memory
    assert asyncio.run(watcher.reconcile("announced")) is True
    assert loads == ["v0002", "v0003", "v0002"]


def test_without_keep_previous_model_a_rollback_loads_again():
    watcher, served, loads = _watcher_that_keeps(False)
    for version in ("v0002", "v0001"):
        watcher._registry = FakeRegistry(version)
        assert asyncio.run(watcher.reconcile("announced")) is True
    assert loads == ["v0002", "v0001"] and watcher._standby is None


def test_a_load_that_does_not_finish_is_refused_and_the_next_one_runs_on_a_new_thread():
    import threading

    release = threading.Event()
    served: list[ServingModel] = [ServingModel(FakeStudent(), "v0001", None)]

    def loader(settings, version):
        if version == "v0005":
            release.wait(10)  # a stalled read: the thread cannot be stopped
        return ServingModel(FakeStudent(), version, None)

    watcher = ModelWatcher(Settings(model_load_timeout_s=0.3), lambda: served[-1].version, served.append,
                           loader=loader)
    watcher._registry = FakeRegistry("v0005")
    before = failures("timeout")
    try:
        assert asyncio.run(watcher.reconcile("announced")) is False
        assert failures("timeout") == before + 1 and served[-1].version == "v0001"  # the old version serves on
        assert "v0005" in watcher.refused
        assert asyncio.run(watcher.reconcile("poll")) is False  # refused: not retried by the poll
        watcher._registry.value = "v0006"
        assert asyncio.run(watcher.reconcile("announced")) is True  # not queued behind the stuck thread
        assert served[-1].version == "v0006"
    finally:
        release.set()
        watcher.close()
