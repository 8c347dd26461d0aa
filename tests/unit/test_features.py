"""The encoder-output cache of head-only training (pgkd.features): the same
features as a fresh computation, only unseen texts encoded, a changed encoder
never served another's rows, and a bound in bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pgkd.features
from pgkd.data import LabelledTexts
from pgkd.features import FeatureCache, encoder_fingerprint, head_features, probabilities
from pgkd.student import Student
from pgkd.training import TrainConfig, train_head

TEXTS = ["lost my card yesterday", "refund please", "why was my top up declined twice", "card", "money back now"]
HIDDEN = 32  # the tiny encoder's width (tests/conftest.py)


@pytest.fixture
def student(tiny_encoder_dir):
    return Student.from_pretrained(tiny_encoder_dir, ["a", "b", "c"], max_length=16, device="cpu")


@pytest.fixture
def encoded(monkeypatch):
    """The texts head_features is asked to encode, call by call."""
    calls: list[list[str]] = []
    real = pgkd.features.head_features

    def spy(student, texts, batch_size=64):
        calls.append(list(texts))
        return real(student, texts, batch_size)

    monkeypatch.setattr(pgkd.features, "head_features", spy)
    return calls


def test_cached_rows_are_the_fresh_features_and_only_unseen_texts_are_encoded(student, encoded):
    cache = FeatureCache()
    first = cache.head_inputs(student, TEXTS[:3])
    again = cache.head_inputs(student, TEXTS[::-1])  # two new texts, three seen, in another order
    assert encoded == [TEXTS[:3], [TEXTS[4], TEXTS[3]]]
    assert (cache.hits, cache.misses, cache.rows) == (3, 5, 5)
    fresh = head_features(student, TEXTS)
    assert first.shape == (3, HIDDEN) and torch.allclose(first, fresh[:3], atol=1e-5)
    assert torch.allclose(again, fresh.flip(0), atol=1e-5)
    assert cache.nbytes == sum(FeatureCache.entry_bytes(t, fresh[0]) for t in TEXTS)
    assert FeatureCache.entry_bytes("abc", fresh[0]) > HIDDEN * 4 + 3  # the encoding, the text and the objects


def test_a_text_twice_in_one_call_is_encoded_once(student, encoded):
    rows = FeatureCache().head_inputs(student, ["card", "card", "refund please"])
    assert encoded == [["card", "refund please"]] and torch.equal(rows[0], rows[1])


def test_an_encoder_changed_in_one_weight_gets_its_own_rows(student, encoded):
    cache = FeatureCache()
    before = cache.head_inputs(student, TEXTS)
    twin = student.clone()
    with torch.no_grad():
        twin.model.bert.encoder.layer[0].attention.self.query.weight[0, 0] += 0.5
    assert encoder_fingerprint(twin) != encoder_fingerprint(student)
    after = cache.head_inputs(twin, TEXTS)
    assert len(encoded) == 2 and encoded[1] == TEXTS  # nothing served from the other encoder's rows
    assert not torch.allclose(before, after)
    assert torch.allclose(after, head_features(twin, TEXTS), atol=1e-5)


def test_the_head_weights_do_not_change_the_fingerprint_the_max_length_does(student, tiny_encoder_dir):
    twin = student.clone()
    with torch.no_grad():
        twin.model.classifier.weight.mul_(3.0)
    assert encoder_fingerprint(twin) == encoder_fingerprint(student)
    shorter = Student.from_pretrained(tiny_encoder_dir, ["a", "b", "c"], max_length=8, device="cpu")
    assert encoder_fingerprint(shorter) != encoder_fingerprint(student)


def test_probabilities_through_the_cache_are_the_students(student):
    cache = FeatureCache()
    cache.head_inputs(student, TEXTS[:2])  # some cached, some not
    through = probabilities(student, TEXTS, cache)
    direct = student.predict_proba(TEXTS)
    assert through.shape == (5, 3) and through.dtype == np.float32
    np.testing.assert_allclose(through, direct, atol=1e-5)
    assert probabilities(student, [], cache).shape == (0, 3)
    assert not student.model.classifier.training


def test_a_serving_student_predicts_by_its_own_path(student, encoded):
    served = student.clone().optimize_for_inference("fp32", "torchscript")
    probs = FeatureCache().predict_proba(served, TEXTS)
    assert encoded == [] and np.allclose(probs, student.predict_proba(TEXTS), atol=1e-5)


def test_the_least_recently_used_rows_go_past_the_byte_bound(student, encoded):
    same = [f"text number {i}" for i in range(5)]  # entries of one size
    entry = FeatureCache.entry_bytes(same[0], torch.zeros(HIDDEN))
    cache = FeatureCache(max_bytes=3 * entry)
    cache.head_inputs(student, same[:3])
    cache.head_inputs(student, [same[0]])  # the first text is now the most recently used
    cache.head_inputs(student, same[3:5])  # two more: the two least recently used go
    assert cache.rows == 3 and cache.nbytes == 3 * entry
    encoded.clear()
    cache.head_inputs(student, [same[0], same[4], same[1]])
    assert encoded == [[same[1]]]


def test_a_cache_of_zero_bytes_keeps_nothing_and_still_answers(student, encoded):
    cache = FeatureCache(max_bytes=0)
    one = cache.head_inputs(student, TEXTS)
    two = cache.head_inputs(student, TEXTS)
    assert cache.rows == 0 and encoded == [TEXTS, TEXTS] and torch.equal(one, two)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        FeatureCache(max_bytes=-1)


def test_train_head_with_a_cache_trains_as_without_and_encodes_each_text_once(student, encoded):
    train = LabelledTexts(tuple(TEXTS), ("a", "b", "c", "a", "b"))
    val = LabelledTexts(("my card is gone", "return my money"), ("a", "b"))
    cfg = TrainConfig(epochs=5, batch_size=2, lr=5e-2, patience=5, device="cpu", progress=False)
    plain, cached, cache = student.clone(), student.clone(), FeatureCache()
    train_head(plain, train, val, cfg)
    train_head(cached, train, val, cfg, features=cache)
    for name, weight in plain.model.classifier.state_dict().items():
        assert torch.allclose(weight, cached.model.classifier.state_dict()[name], atol=1e-4), name
    encoded.clear()
    again = student.clone()  # another candidate of the same encoder, one more text
    train_head(again, LabelledTexts((*TEXTS, "a brand new text"), ("a", "b", "c", "a", "b", "c")), val, cfg,
               features=cache)
    assert encoded == [["a brand new text"]]
