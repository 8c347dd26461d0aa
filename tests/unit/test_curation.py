"""The pure logic of the continual loop: which samples enter training, when a
batch closes, which classes are weakest, how a round is configured, and the
head-only training mode. No Kafka, no Redis."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from pgkd.curation import ClassStats, Sample, TextGuard, mine_from_samples, pick_weakest, sample_hash
from pgkd.data import LabelledTexts
from pgkd.errors import ConfigError
from pgkd.features import head_features
from pgkd.retrain import RoundConfig, SeedData, training_set
from pgkd.settings import Settings
from pgkd.student import Student
from pgkd.training import TrainConfig, train_head


@pytest.mark.parametrize("module", ["pgkd.curation", "pgkd.retrain"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def sample(text, label, source="teacher", student_label=None, confidence=None):
    return Sample(f"id-{text}", text, label, source, "sim", "v0001", 1.0, student_label, confidence)


def test_sample_survives_the_redis_stream_fields():
    s = sample("where is my card", "card_arrival", student_label="card_lost", confidence=0.91)
    fields = {k.encode(): v.encode() for k, v in s.fields().items()}  # what XRANGE returns
    assert Sample.from_fields(fields) == s
    generated = Sample("gen-r1-0", "t", "a", "generated", "sim", "v1", 2.0, request_id="r1")
    assert "student_label" not in generated.fields() and Sample.from_fields(generated.fields()) == generated


def test_guard_normalises_before_comparing():
    guard = TextGuard.of(train=["Top up failed"], evaluation=["  where IS my card?"])
    assert guard.check("top up   FAILED") == "duplicate"
    assert guard.check("Where is my card?") == "eval_collision"
    assert guard.check("where is my card") is None  # punctuation is part of the text
    assert sample_hash("a  b") == sample_hash("A b")


def test_weakest_classes_without_a_report_use_the_live_disagreement():
    stats = {"a": ClassStats(10, 9), "b": ClassStats(10, 2), "c": ClassStats(10, 5), "d": ClassStats(2, 0)}
    assert pick_weakest(None, stats, k=2, min_count=3) == ["b", "c"]  # d: too few teacher labels to judge
    report = {"per_class": {"a": {"f1": 0.1, "support": 3}, "z": {"f1": 0.0, "support": 0}}}
    assert pick_weakest(report, {}, k=5, min_count=3) == ["a"]  # support 0: not a class of the val set


def test_mining_from_teacher_labels_needs_the_student_answer():
    labels = ["a", "b"]
    samples = [sample("x", "a", student_label=None), sample("y", "b", student_label="zz", confidence=0.9)]
    mined = mine_from_samples(samples, labels, n=4)
    assert mined.hard_negatives == mined.correct == mined.misclassified == []


def test_training_set_is_the_same_whatever_the_sample_order():
    seed = SeedData(LabelledTexts(("s1", "s2"), ("a", "b")), LabelledTexts(("v",), ("a",)))
    samples = [sample(f"text {i}", "ab"[i % 2]) for i in range(20)]
    forward, counts = training_set(seed, samples, ["a", "b"])
    backward, _ = training_set(seed, samples[::-1], ["a", "b"])
    assert forward == backward and forward.texts[:2] == ("s1", "s2")
    assert counts == {"seed": 2, "teacher": 20, "generated": 0, "dropped": 0, "train": 22, "val": 1}


def test_round_config_mode_and_learning_rate():
    assert RoundConfig.from_settings(Settings(), cuda=False).mode == "head"
    full = RoundConfig.from_settings(Settings(), cuda=True)
    assert (full.mode, full.train.lr) == ("full", 1e-4)
    head = RoundConfig.from_settings(Settings(trainer_mode="head", trainer_lr=0.5, trainer_epochs=3), cuda=True)
    assert (head.mode, head.train.lr, head.train.epochs, head.train.progress) == ("head", 0.5, 3, False)
    assert RoundConfig.from_settings(Settings(gate_max_accuracy_drop=0.2)).gate.max_accuracy_drop == 0.2


def test_round_config_keeps_features_between_head_rounds_only():
    head = RoundConfig.from_settings(Settings(trainer_mode="head", trainer_feature_cache_mb=3), cuda=False)
    assert head.feature_cache_mb == 3 and head.feature_cache().max_bytes == 3 << 20
    assert RoundConfig.from_settings(Settings(trainer_mode="full"), cuda=False).feature_cache() is None
    assert RoundConfig.from_settings(Settings(trainer_mode="head", trainer_feature_cache_mb=0)).feature_cache() is None


def test_round_config_stores_the_graph_the_workers_serve():
    assert RoundConfig.from_settings(Settings(inference_graph="torchscript", inference_quantize="int8")).graphs == ()
    onnx = RoundConfig.from_settings(Settings(inference_graph="onnxruntime", inference_quantize="int8"))
    assert onnx.graphs == ("int8",)


def test_seed_data_names_the_missing_setting():
    with pytest.raises(ConfigError, match="PGKD_SEED_TRAIN is not set"):
        SeedData.from_settings(Settings())


# --- head-only training ---------------------------------------------------------------------

WORDS = ["movie", "food", "service", "day", "book", "song", "trip", "game"]


def toy(n_per_class, offset=0):
    texts, labels = [], []
    for i in range(n_per_class):
        noun = WORDS[(i + offset) % len(WORDS)]
        texts += [f"good {noun} today", f"bad {noun} today"]
        labels += ["pos", "neg"]
    return LabelledTexts(texts, labels)


@pytest.fixture
def student(tiny_encoder_dir):
    return Student.from_pretrained(tiny_encoder_dir, ["neg", "pos"], max_length=16, device="cpu")


def test_head_features_come_back_in_input_order(student):
    texts = ["a much longer text than the others here", "short", "medium length text"]
    together = head_features(student, texts, batch_size=2)  # batched by length, returned in order
    alone = torch.cat([head_features(student, [t]) for t in texts])
    assert together.shape == (3, 32) and torch.allclose(together, alone, atol=1e-5)


def test_train_head_learns_with_the_encoder_frozen(student):
    encoder = {k: v.clone() for k, v in student.model.bert.state_dict().items()}
    cfg = TrainConfig(epochs=40, batch_size=8, lr=5e-2, patience=40, device="cpu", progress=False)
    result = train_head(student, toy(16), toy(4, offset=3), cfg)
    assert result.best_val_macro_f1 is not None and result.best_val_macro_f1 >= 0.75
    assert result.epochs_run == 40 and {"val_macro_f1", "train_loss", "lr"} <= set(result.history[0])
    assert all(torch.equal(v, student.model.bert.state_dict()[k]) for k, v in encoder.items())
    assert not student.model.training
