"""The hot swap's decisions without Kafka: which version to load, when to refuse
one, and what the announcement carries."""

from __future__ import annotations

import asyncio
import doctest
import importlib

import numpy as np
import pytest

from pgkd.errors import ModelIntegrityError, RegistryUnavailable
from pgkd.serving import ServingModel
from pgkd.settings import Settings
from streams import metrics
from streams.announce import update_record
from streams.hotswap import ModelWatcher


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
