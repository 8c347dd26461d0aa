"""The continual distillation loop on the real broker and Redis, with the
teacher simulator: classify -> teacher -> curator -> trainer -> registry ->
model.updates -> classify.

Ten Banking77 classes keep it to a couple of minutes on two cores: a weak seed
model (the MiniLM encoder frozen, its head fitted on 4 texts a class), one
batch of teacher labels, one round trained head-only (PGKD_TRAINER_MODE=head).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from streaming_support import TORCH_SERVING, banking, collect_sync, metric_sum, produce, produce_sync, text_message

from pgkd.data import LabelledTexts, write_labelled
from pgkd.registry import Registry
from pgkd.simulator import SimulatorServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = ["card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "card_not_working", "top_up_failed",
           "top_up_reverted", "exchange_rate", "card_payment_wrong_exchange_rate",
           "transfer_not_received_by_recipient", "pending_transfer"]
N_SEED, N_VAL, N_STREAM, N_TEST = 4, 10, 16, 20  # per class
BATCH = 150  # teacher samples that close the batch: one round from N_STREAM * 10 = 160 streamed texts


@dataclass
class LoopData:
    seed_train: Path
    seed_val: Path
    seed_test: Path
    stream: LabelledTexts  # streamed into texts.in (gold labels in the message, for the check)
    pool: LabelledTexts  # the simulator's knowledge: the streamed texts and the rest of the training split
    test: LabelledTexts
    val: LabelledTexts


def _per_class(data: LabelledTexts, counts: list[int]) -> list[LabelledTexts]:
    """Consecutive slices of each class's rows: ``counts[i]`` rows per class for part i, the rest last."""
    parts: list[tuple[list[str], list[str]]] = [([], []) for _ in range(len(counts) + 1)]
    for label in CLASSES:
        rows = [t for t, y in zip(data.texts, data.labels, strict=True) if y == label]
        start = 0
        for i, n in enumerate([*counts, len(rows)]):
            chunk = rows[start : start + n]
            parts[i][0].extend(chunk)
            parts[i][1].extend([label] * len(chunk))
            start += n
    return [LabelledTexts(tuple(t), tuple(y)) for t, y in parts]


@pytest.fixture(scope="module")
def loop_data(tmp_path_factory) -> LoopData:
    root = tmp_path_factory.mktemp("loop_data")
    seed, val, stream_part, rest = _per_class(banking("train"), [N_SEED, N_VAL, N_STREAM])
    test = _per_class(banking("test"), [N_TEST])[0]
    return LoopData(write_labelled(root / "seed_train.csv", seed), write_labelled(root / "seed_val.csv", val),
                    write_labelled(root / "seed_test.csv", test), stream_part, stream_part.concat(rest), test, val)


@pytest.fixture(scope="module")
def seed_model(loop_data, tmp_path_factory) -> tuple[Path, dict]:
    """The weak seed: MiniLM frozen, its head fitted on the seed texts (head-only,
    as the CPU trainer does); the directory and its validation report."""
    import torch

    from pgkd.data import load_labelled
    from pgkd.retrain import score
    from pgkd.student import Student
    from pgkd.training import TrainConfig, train_head

    torch.set_num_threads(2)
    train = load_labelled(loop_data.seed_train, "text", "label")
    student = Student.from_pretrained(None, CLASSES, max_length=64, device="cpu")
    train_head(student, train, loop_data.val, TrainConfig(epochs=60, lr=2e-2, patience=10, batch_size=32,
                                                          progress=False))
    out = tmp_path_factory.mktemp("seed_model") / "model"
    student.save(out)
    return out, score(student, loop_data.val)[0]


def _loop_env(stream, loop_data, seed_model, tmp_path, redis_db_url, sim, **overrides):
    model_dir, report = seed_model
    settings = dict(
        model_store=tmp_path / "models", teacher_base_url=sim.url, low_conf_threshold=1.0,
        seed_train=loop_data.seed_train, seed_val=loop_data.seed_val, seed_test=loop_data.seed_test,
        curator_batch_size=BATCH, curator_batch_window_s=0, curator_drift_trigger="false",
        curator_generate=40, curator_target_classes=4, trainer_mode="head", trainer_epochs=60,
        trainer_patience=10, trainer_lr=0.02, trainer_lock_ttl_s=5, model_poll_s=5,
        # 10 validation texts a class: one text moves a class's F1 by ~0.1, so the per-class rule is looser here
        gate_max_class_f1_drop=0.35, **TORCH_SERVING,
    )
    env = stream(model_dir, **(settings | overrides))
    registry = Registry(tmp_path / "models", redis_db_url, namespace=env.env["PGKD_APP_ID_PREFIX"])
    from pgkd.student import Student

    seed_version = registry.publish(Student.load(model_dir, device="cpu"), parent=None, round=0,
                                    data={"train": N_SEED * len(CLASSES)}, metrics=report, settings={})
    registry.promote(seed_version, reason="seed", round=0)
    return env, registry, seed_version


def _wait_for_round(registry: Registry, workers, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        for w in workers:
            assert w.alive(), f"{w.role} worker exited with {w.proc.returncode}:\n{w.tail()}"
        rounds = registry.rounds()
        if rounds:
            return rounds[0]
        assert time.monotonic() < deadline, f"no retrain round recorded after {timeout_s}s"
        time.sleep(1)


def _stream_messages(data: LabelledTexts, prefix: str) -> list[tuple[bytes, bytes]]:
    return [text_message(f"{prefix}{i}", text, gold=gold)
            for i, (text, gold) in enumerate(zip(data.texts, data.labels, strict=True))]


def _accuracy(registry: Registry, version: str, data: LabelledTexts) -> float:
    from pgkd.retrain import score

    return score(registry.load(version, device="cpu"), data)[0]["accuracy"]


def _wait_for_log(worker, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in worker.tail(10**7):
        assert worker.alive() and time.monotonic() < deadline, f"no {text!r} in the log:\n{worker.tail()}"
        time.sleep(0.5)


def test_full_loop_promotes_a_better_model_that_then_serves(stream, loop_data, seed_model, tmp_path, redis_db_url):
    with SimulatorServer(loop_data.pool) as sim:
        env, registry, seed_version = _loop_env(stream, loop_data, seed_model, tmp_path, redis_db_url, sim)
        t = env.topics
        workers = [env.start(role) for role in ("classify", "teacher", "curator", "trainer")]
        produce_sync(env.bootstrap, t["texts_in"], _stream_messages(loop_data.stream, "s"))
        record = _wait_for_round(registry, workers, timeout_s=420)
        classify, _teacher, curator, trainer = workers

        assert record["outcome"] == "promoted", record
        new = record["candidate"]
        assert registry.current() == new and record["current"] == seed_version
        assert record["data"]["teacher"] >= BATCH and record["data"]["generated"] > 0, record["data"]
        assert record["metrics"]["candidate"]["macro_f1"] >= record["metrics"]["current"]["macro_f1"]
        assert registry.manifest(new)["parent"] == seed_version
        # the drift monitor's baseline: the new version's validation predictions
        reference = registry.manifest(new)["drift_reference"]
        assert set(reference) == {"class_probs", "confidences"} and len(reference["confidences"]) > 0
        assert "drift_reference" not in registry.manifest(seed_version)  # published by the test, not by a round

        # the request the curator published, with its provenance counts
        requests = collect_sync(env.bootstrap, [t["retrain_requests"]], lambda g: bool(g.of(t["retrain_requests"])),
                                timeout_s=30).of(t["retrain_requests"])
        assert len(requests) == 1 and requests[0]["round"] == record["round"]
        assert requests[0]["counts"]["teacher"] >= BATCH and requests[0]["generation"]["accepted"] > 0
        assert requests[0]["generation"]["skipped"] is None and len(requests[0]["target_classes"]) == 4

        # the classifier swapped (model.updates); what it answers next carries the new version
        _wait_for_log(classify, f"swapped {seed_version} -> {new}", timeout_s=60)
        after = LabelledTexts(loop_data.test.texts[:40], loop_data.test.labels[:40])
        asyncio.run(produce(env.bootstrap, t["texts_in"], _stream_messages(after, "after")))
        ids = {f"after{i}" for i in range(len(after))}
        got = collect_sync(env.bootstrap, [t["labels_out"]],
                           lambda g: ids <= {r["id"] for r in g.of(t["labels_out"]) if r["source"] == "student"},
                           timeout_s=120, workers=[classify])
        assert {r["model_version"] for r in got.of(t["labels_out"]) if r["id"] in ids} == {new}

        # better on the held-out test split (never trained on: the curator drops its texts)
        acc_seed, acc_new = _accuracy(registry, seed_version, loop_data.test), _accuracy(registry, new, loop_data.test)
        print(f"held-out accuracy: seed {seed_version} {acc_seed:.3f} -> {new} {acc_new:.3f}")
        assert acc_new > acc_seed + 0.05

        tm, cm = trainer.metrics(), curator.metrics()
        assert metric_sum(tm, "pgkd_retrain_rounds_total", outcome="promoted") == 1
        assert metric_sum(tm, "pgkd_current_model_round") == record["round"]
        assert metric_sum(tm, "pgkd_gate_consecutive_rejections") == 0
        features = record["train"]["features"]  # head mode: the trainer's first round encodes every text once
        assert features["encoded"] == record["data"]["train"] + record["data"]["val"] and features["cached"] > 0
        assert metric_sum(tm, "pgkd_retrain_features_total", source="encoder") == features["encoded"]
        assert metric_sum(tm, "pgkd_retrain_features_total", source="cache") == features["cached"]
        assert metric_sum(tm, "pgkd_retrain_feature_cache_bytes") > 0
        assert metric_sum(cm, "pgkd_samples_gathered_total", source="teacher") >= BATCH
        assert metric_sum(cm, "pgkd_samples_gathered_total", source="generated") == record["data"]["generated"]


def test_noisy_teacher_round_is_rejected_and_the_seed_keeps_serving(stream, loop_data, seed_model, tmp_path,
                                                                    redis_db_url):
    with SimulatorServer(loop_data.pool, label_noise=1.0) as sim:  # every teacher label wrong
        env, registry, seed_version = _loop_env(stream, loop_data, seed_model, tmp_path, redis_db_url, sim,
                                                curator_generate=0)
        t = env.topics
        workers = [env.start(role) for role in ("classify", "teacher", "curator", "trainer")]
        produce_sync(env.bootstrap, t["texts_in"], _stream_messages(loop_data.stream, "s"))
        record = _wait_for_round(registry, workers, timeout_s=420)
        classify, trainer = workers[0], workers[3]

        assert record["outcome"] == "rejected", record
        assert record["gate"]["passed"] is False and record["gate"]["reasons"]
        assert record["reason"].startswith("rejected: ")
        assert registry.current() == seed_version
        assert record["candidate"] in registry.versions()  # published for audit, never promoted
        assert [e["version"] for e in registry.history()] == [seed_version]
        assert metric_sum(trainer.metrics(), "pgkd_gate_consecutive_rejections") == 1
        assert metric_sum(trainer.metrics(), "pgkd_retrain_rounds_total", outcome="rejected") == 1

        after = LabelledTexts(loop_data.test.texts[:20], loop_data.test.labels[:20])
        asyncio.run(produce(env.bootstrap, t["texts_in"], _stream_messages(after, "after")))
        ids = {f"after{i}" for i in range(len(after))}
        got = collect_sync(env.bootstrap, [t["labels_out"]],
                           lambda g: ids <= {r["id"] for r in g.of(t["labels_out"]) if r["source"] == "student"},
                           timeout_s=120, workers=[classify])
        assert {r["model_version"] for r in got.of(t["labels_out"]) if r["id"] in ids} == {seed_version}
        assert json.loads(json.dumps(record))  # the record is plain JSON (the CLI prints it)
        env.stop_all()  # while the simulator answers: else the teacher retries a request in flight for ~6 s


def _trainer_one_second_into_a_round(stream, loop_data, tiny_encoder_dir, tmp_path, redis_db_url, **settings):
    """A trainer given one retrain request (seed data only), 1 s into training its
    full candidate: (env, registry, seed version, request, round number, trainer)."""
    from pgkd.student import Student
    from streams.schemas import RetrainRequest

    # a tiny encoder trained in full for many epochs: ~10 s of training here (0.12 s an epoch), long
    # enough to be stopped 1 s after it starts, and a retry that does not take longer than it must
    # (PGKD_SERVE_MODEL, the first argument, is unused: the trainer serves nothing)
    env = stream(tmp_path, model_store=tmp_path / "models", seed_train=loop_data.seed_train,
                 seed_val=loop_data.seed_val, trainer_mode="full", trainer_epochs=80, trainer_patience=80,
                 **settings, **TORCH_SERVING)
    ns = env.env["PGKD_APP_ID_PREFIX"]
    registry = Registry(tmp_path / "models", redis_db_url, namespace=ns)
    seed_version = registry.publish(Student.from_pretrained(tiny_encoder_dir, CLASSES, max_length=64, device="cpu"),
                                    parent=None, round=0, data={}, metrics={}, settings={})
    registry.promote(seed_version, reason="seed", round=0)
    round_no = registry.next_round()
    request = RetrainRequest(request_id=f"{ns}-round-{round_no}", round=round_no, samples_upto="0-0", since="0-0",
                             trigger="size", counts={}, target_classes=[], generation={}, model_version=seed_version,
                             ts=time.time())
    trainer = env.start("trainer")
    produce_sync(env.bootstrap, env.topics["retrain_requests"], [(request.request_id.encode(), request.dumps())])
    _wait_for_log(trainer, f"round {round_no}: training a full candidate", timeout_s=120)
    time.sleep(1)
    return env, registry, seed_version, request, round_no, trainer


def test_trainer_killed_mid_round_retries_it_and_never_points_at_a_partial_version(
        stream, loop_data, tiny_encoder_dir, tmp_path, redis_db_url):
    """SIGKILL while the round trains; the restarted trainer (after the lock
    lapsed) retries the round and records it with attempts=2."""
    import redis

    env, registry, seed_version, request, _round_no, trainer = _trainer_one_second_into_a_round(
        stream, loop_data, tiny_encoder_dir, tmp_path, redis_db_url, trainer_lock_ttl_s=3, trainer_max_attempts=2)
    ns = env.env["PGKD_APP_ID_PREFIX"]
    trainer.kill()

    assert registry.rounds() == []
    assert registry.current() == seed_version
    for version in registry.versions():  # whatever was stored is complete (a publish is atomic)
        registry.verify(version)
    ledger = json.loads(redis.Redis.from_url(redis_db_url).hget(f"{ns}:trainer:requests", request.request_id))
    assert ledger["status"] == "running" and ledger["attempts"] == 1

    again = env.start("trainer")
    record = _wait_for_round(registry, [again], timeout_s=240)
    assert record["request_id"] == request.request_id and record["attempts"] == 2, record
    assert record["outcome"] in ("promoted", "rejected"), record
    assert "did not finish" in again.tail(10**7)
    current = registry.current()
    assert current == (record["candidate"] if record["outcome"] == "promoted" else seed_version)
    registry.verify(current)


def test_trainer_stopped_mid_round_finishes_it_announces_it_then_exits(
        stream, loop_data, tiny_encoder_dir, tmp_path, redis_db_url):
    """SIGTERM (docker stop, a rolling deploy) while the round trains: the
    trainer finishes the round, records it once, announces the promotion on
    model.updates, and only then exits, cleanly."""
    env, registry, _seed_version, request, round_no, trainer = _trainer_one_second_into_a_round(
        stream, loop_data, tiny_encoder_dir, tmp_path, redis_db_url,
        gate_min_macro_f1_gain=-1, gate_max_accuracy_drop=1, gate_max_class_f1_drop=1)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.proc.wait(timeout=240) == 0, trainer.tail()
    log = trainer.tail(10**7)
    assert log.index("Signal received: 15") < log.index(f"round {round_no}: candidate macro-F1"), \
        "the round ended before the signal: it needs more epochs to be stopped in"

    (record,) = registry.rounds()
    assert record["request_id"] == request.request_id and record["attempts"] == 1, record
    assert record["outcome"] == "promoted" and registry.current() == record["candidate"], record
    updates = collect_sync(env.bootstrap, [env.topics["model_updates"]],
                           lambda g: bool(g.of(env.topics["model_updates"])), timeout_s=30)
    assert [u["version"] for u in updates.of(env.topics["model_updates"])] == [record["candidate"]]


def test_curator_with_the_budget_spent_still_requests_a_round_and_says_why(
        stream, loop_data, tiny_encoder_dir, tmp_path, redis_db_url):
    """Teacher labels straight into teacher.labels (no classifier): duplicates and
    validation/test texts are dropped and counted; with no budget left the batch
    closes without generated samples, and the request says why."""
    from pgkd.student import Student
    from streams.schemas import TeacherLabel

    env = stream(tmp_path, model_store=tmp_path / "models", seed_train=loop_data.seed_train,
                 seed_val=loop_data.seed_val, seed_test=loop_data.seed_test, curator_batch_size=20,
                 curator_generate=10, teacher_budget_usd=0, curator_drift_trigger="false")
    registry = Registry(tmp_path / "models", redis_db_url, namespace=env.env["PGKD_APP_ID_PREFIX"])
    seed_version = registry.publish(Student.from_pretrained(tiny_encoder_dir, CLASSES, max_length=64, device="cpu"),
                                    parent=None, round=0, data={}, metrics={}, settings={})
    registry.promote(seed_version, reason="seed", round=0)

    def label(ident: str, text: str, gold: str) -> tuple[bytes, bytes]:
        record = TeacherLabel(id=ident, text=text, label=gold, teacher_model="teacher-sim", usage={},
                              student_label=CLASSES[0], student_confidence=0.3, model_version=seed_version,
                              ts=time.time(), labelled_at=time.time())
        return ident.encode(), record.dumps()

    texts = list(zip(loop_data.stream.texts[:20], loop_data.stream.labels[:20], strict=True))
    messages = [label(f"s{i}", text, gold) for i, (text, gold) in enumerate(texts)]
    messages.append(label("again", texts[0][0].upper(), texts[0][1]))  # the same text, another id
    messages.append(label("val", loop_data.val.texts[0], loop_data.val.labels[0]))  # a validation text
    curator = env.start("curator")
    produce_sync(env.bootstrap, env.topics["teacher_labels"], messages)
    got = collect_sync(env.bootstrap, [env.topics["retrain_requests"]],
                       lambda g: bool(g.of(env.topics["retrain_requests"])), timeout_s=120, workers=[curator],
                       linger_s=2)
    (request,) = got.of(env.topics["retrain_requests"])
    assert request["counts"]["teacher"] == 20 and request["counts"]["generated"] == 0
    assert request["generation"]["skipped"].startswith("teacher budget exhausted ($0.0000 of $0 spent)")
    assert request["round"] == 1 and request["trigger"] == "size"
    m = curator.metrics()
    assert metric_sum(m, "pgkd_samples_gathered_total", source="teacher") == 20
    assert metric_sum(m, "pgkd_samples_dropped_total", reason="duplicate") == 1
    assert metric_sum(m, "pgkd_samples_dropped_total", reason="eval_collision") == 1
