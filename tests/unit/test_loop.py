"""The PGKD cycle on a tiny model, with the teacher simulator over HTTP."""

import pytest

from pgkd.data import LabelledTexts
from pgkd.errors import ConfigError
from pgkd.loop import DistillConfig, distill, pick_targets, run_cycles
from pgkd.simulator import SimulatorServer
from pgkd.student import Student
from pgkd.teacher import OpenAITeacher
from pgkd.training import TrainConfig

CLASSES = ["billing", "delivery", "login", "refund"]
NOUNS = ["card", "parcel", "password", "order", "account", "box", "invoice", "payment", "code", "app"]


def rows(n_per_class, offset=0):
    texts, labels = [], []
    for i in range(n_per_class):
        noun = NOUNS[(i + offset) % len(NOUNS)]
        for c in CLASSES:
            texts.append(f"{c} question number {i + offset} about my {noun}")
            labels.append(c)
    return LabelledTexts(tuple(texts), tuple(labels))


def cfg(**kw):
    train = TrainConfig(epochs=2, batch_size=8, lr=5e-3, patience=2, seed=0, device="cpu", progress=False)
    base = dict(max_cycles=2, patience=2, samples_per_cycle=8, target_classes=2, n_examples=4, train=train, seed=0)
    return DistillConfig(**{**base, **kw})


@pytest.fixture
def student(tiny_encoder_dir):
    return Student.from_pretrained(tiny_encoder_dir, CLASSES, max_length=16, device="cpu")


def teacher_for(sim, **kw):
    return OpenAITeacher(base_url=sim.url, model="teacher-sim", api_key="k", taxonomy=CLASSES, backoff_base_s=0.01,
                         **kw)


def test_cycles_add_teacher_samples_and_keep_the_best(student):
    train_set, val, pool = rows(4), rows(3, offset=20), rows(10, offset=40)
    with SimulatorServer(pool, seed=0) as sim:
        teacher = teacher_for(sim)
        result = distill(student, train_set, val, teacher, cfg(), known_texts=set(val.texts), log=lambda _: None)
        served = sim.stats["samples_served"]
    assert 1 <= len(result.cycles) <= 2
    first = result.cycles[0]
    assert first["samples_requested"] == 8 and first["samples_accepted"] == 8
    assert len(first["target_classes"]) == 2 and set(first["target_classes"]) <= set(CLASSES)
    assert len(result.train_set) == len(train_set) + sum(c["samples_accepted"] for c in result.cycles) == 16 + served
    assert result.best_val["macro_f1"] >= result.baseline_val["macro_f1"]
    assert result.baseline_student is student
    assert teacher.usage.calls == len(result.cycles) and teacher.usage.prompt_tokens > 0
    assert result.stopped_because


def test_patience_stops_and_baseline_is_never_modified(student):
    train_set, val = rows(4), rows(3, offset=20)
    with SimulatorServer(rows(10, offset=40), seed=0) as sim:
        # lr 0 makes every retraining a copy of its parent: no cycle can improve
        frozen = TrainConfig(epochs=1, batch_size=8, lr=1e-12, patience=1, seed=0, device="cpu", progress=False)
        from pgkd.loop import evaluate

        base_val = evaluate(student, val)
        before = student.predict_proba(list(val.texts))
        result = run_cycles(student, base_val, train_set, val, teacher_for(sim),
                            cfg(max_cycles=5, patience=2, cycle_train=frozen), log=lambda _: None)
    assert len(result.cycles) == 2 and not any(c["improved"] for c in result.cycles)
    assert result.stopped_because == "no validation gain in 2 cycles"
    assert result.student is student
    assert (student.predict_proba(list(val.texts)) == before).all()


def test_head_only_distillation_encodes_each_text_once(student, monkeypatch):
    import pgkd.features

    encoded: list[str] = []
    real = pgkd.features.head_features
    monkeypatch.setattr(pgkd.features, "head_features",
                        lambda s, texts, batch_size=64: encoded.extend(texts) or real(s, texts, batch_size))
    train_set, val = rows(4), rows(3, offset=20)
    with SimulatorServer(rows(10, offset=40), seed=0) as sim:
        result = distill(student, train_set, val, teacher_for(sim), cfg(head_only=True, max_cycles=3, patience=3),
                         known_texts=set(val.texts), log=lambda _: None)
    assert len(result.cycles) == 3
    # the baseline, three cycles' training, mining and validation: every text encoded once
    assert sorted(encoded) == sorted({*result.train_set.texts, *val.texts})


def test_budget_exhausted_ends_the_cycles(student):
    train_set, val = rows(4), rows(3, offset=20)
    with SimulatorServer(rows(10, offset=40), seed=0) as sim:
        teacher = teacher_for(sim, budget_usd=0.0)
        result = distill(student, train_set, val, teacher, cfg(), log=lambda _: None)
        assert sim.stats["requests"].get("generate", 0) == 0
    assert result.cycles == [] and result.stopped_because.startswith("teacher budget exhausted")


def test_random_targets_are_seeded_and_weakest_are_lowest_f1():
    import random

    report = {"per_class": {c: {"f1": f, "support": 5} for c, f in zip(CLASSES, [0.9, 0.1, 0.5, 0.3])}}
    assert pick_targets(report, 2, "weakest", random.Random(0)) == ["delivery", "refund"]
    a = pick_targets(report, 2, "random", random.Random(1))
    assert a == pick_targets(report, 2, "random", random.Random(1)) and len(set(a)) == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("patience", 0, "patience must be >= 1, got 0"),
        ("samples_per_cycle", 0, "samples_per_cycle must be positive, got 0"),
        ("target_strategy", "best", "target_strategy must be 'weakest' or 'random', got 'best'"),
    ],
)
def test_config_names_the_bad_value(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(") + "$"):
        DistillConfig(**{field: value})


def test_head_only_mode_never_changes_the_encoder(student):
    import torch

    encoder_before = {k: v.clone() for k, v in student.model.bert.state_dict().items()}
    head_before = student.model.classifier.weight.detach().clone()
    with SimulatorServer(rows(10, offset=40), seed=0) as sim:
        result = distill(student, rows(4), rows(3, offset=20), teacher_for(sim), cfg(head_only=True),
                         log=lambda _: None)
    for model in (student.model, result.student.model):
        assert all(torch.equal(v, encoder_before[k]) for k, v in model.bert.state_dict().items())
    assert not torch.equal(student.model.classifier.weight.detach(), head_before)
