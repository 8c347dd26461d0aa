"""The classify agent's inference fallback, without a broker: one text the model
cannot take is isolated (-> DLQ), a model that fails on everything stops the batch."""

import asyncio
import importlib

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
