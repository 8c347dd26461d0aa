"""RoundRunner on a real Redis and registry, with a tiny model and rounds that
are stubbed where a test needs a crash: every request ends recorded once
(promoted, rejected or failed), whatever happened to the trainer before."""

from __future__ import annotations

import pytest
import redis

from pgkd import retrain
from pgkd.curation import Sample
from pgkd.data import LabelledTexts
from pgkd.gate import GateConfig
from pgkd.registry import Registry
from pgkd.retrain import RoundConfig, RoundLedger, RoundRunner, SeedData
from pgkd.training import TrainConfig

pytestmark = pytest.mark.integration

LABELS = ["card_lost", "refund", "top_up"]
TRAIN = LabelledTexts(("lost my card", "card stolen", "want my money back", "refund please", "top up failed",
                       "add money"), ("card_lost", "card_lost", "refund", "refund", "top_up", "top_up"))
VAL = LabelledTexts(("my card is gone", "return my money", "topping up"), ("card_lost", "refund", "top_up"))


@pytest.fixture
def setup(tmp_path, redis_db_url, tiny_encoder_dir):
    from pgkd.student import Student

    registry = Registry(tmp_path / "store", redis_db_url, namespace="t")
    seed = registry.publish(Student.from_pretrained(tiny_encoder_dir, LABELS, max_length=32, device="cpu"),
                            parent=None, round=0, data={}, metrics={}, settings={})
    registry.promote(seed, reason="seed", round=0)
    ledger = RoundLedger(redis.Redis.from_url(redis_db_url, decode_responses=True), "t")
    cfg = RoundConfig("full", TrainConfig(epochs=2, batch_size=4, lr=1e-3, progress=False, device="cpu"),
                      GateConfig(min_macro_f1_gain=-1.0, max_accuracy_drop=1.0, max_class_f1_drop=1.0))
    runner = RoundRunner(registry, ledger, SeedData(TRAIN, VAL), cfg, max_attempts=2, claim_ttl_s=60)
    yield registry, ledger, runner, seed
    registry.close()


def request(n: int) -> dict:
    return {"request_id": f"t-round-{n}", "round": n, "samples_upto": "0-0", "trigger": "size"}


def test_a_round_runs_once_and_a_redelivery_is_skipped(setup):
    registry, ledger, runner, seed = setup
    samples = [Sample("x1", "card missing since monday", "card_lost", "teacher", "sim", seed, 0.0, "refund", 0.6)]
    result = runner.process(request(1), samples)
    assert result.record["outcome"] == "promoted" and result.record["attempts"] == 1  # the gate lets all pass here
    assert result.record["data"] == {"seed": 6, "teacher": 1, "generated": 0, "dropped": 0, "train": 7, "val": 3}
    assert registry.current() == result.record["candidate"] == result.promotion["version"]
    assert ledger.get("t-round-1")["status"] == "promoted"
    assert runner.process(request(1), samples).record is None  # redelivered: skipped, recorded once
    assert [r["round"] for r in registry.rounds()] == [1]


def test_a_candidate_carries_the_graph_the_workers_serve(setup, monkeypatch):
    import dataclasses

    import pgkd.inference_onnx

    registry, ledger, runner, seed = setup
    built = []
    monkeypatch.setattr(pgkd.inference_onnx, "build_graph_in_child",  # the real build: tests/integration/test_registry
                        lambda model_dir, quantize, *a, **kw: built.append(model_dir) or (b"graph", ("input_ids",), ""))
    runner.cfg = dataclasses.replace(runner.cfg, graphs=("int8",))
    result = runner.process(request(1), [])
    candidate = result.record["candidate"]
    manifest = registry.verify(candidate)
    assert manifest["graphs"]["int8"]["file"] == "onnx/model.int8.onnx" and "onnx/model.int8.onnx" in manifest["files"]
    assert len(built) == 1 and built[0].parent == registry.store  # built from the files being published


def test_head_rounds_encode_only_the_texts_no_earlier_round_encoded(setup, monkeypatch):
    import dataclasses

    import pgkd.features

    registry, ledger, _, seed = setup
    encoded: list[str] = []
    real = pgkd.features.head_features
    monkeypatch.setattr(pgkd.features, "head_features",
                        lambda student, texts, batch_size=64: encoded.extend(texts) or real(student, texts, batch_size))
    cfg = RoundConfig("head", TrainConfig(epochs=3, batch_size=4, lr=2e-2, progress=False, device="cpu"),
                      GateConfig(min_macro_f1_gain=-1.0, max_accuracy_drop=1.0, max_class_f1_drop=1.0),
                      feature_cache_mb=1)
    runner = RoundRunner(registry, ledger, SeedData(TRAIN, VAL), cfg, max_attempts=2, claim_ttl_s=60)
    first = [Sample("x1", "card missing since monday", "card_lost", "teacher", "sim", seed, 0.0, "refund", 0.6)]
    one = runner.process(request(1), first)
    assert one.record["outcome"] == "promoted" and one.record["train"]["mode"] == "head"
    assert sorted(encoded) == sorted({*TRAIN.texts, *VAL.texts, "card missing since monday"})  # each once
    # the validation set's encodings served both versions' gate scores
    assert one.record["train"]["features"] == {"encoded": len(encoded), "cached": 2 * len(VAL)}
    encoded.clear()
    second = [*first, Sample("x2", "where is my refund", "refund", "teacher", "sim", seed, 0.0, "top_up", 0.5)]
    two = runner.process(request(2), second)
    assert two.record["current"] == one.record["candidate"]  # round 1's head on the same encoder
    assert encoded == ["where is my refund"]
    assert two.record["train"]["features"] == {"encoded": 1, "cached": len(TRAIN) + 1 + 3 * len(VAL)}
    assert dataclasses.replace(cfg, feature_cache_mb=0).feature_cache() is None


def test_an_exception_mid_round_is_recorded_as_failed(setup, monkeypatch):
    registry, ledger, runner, seed = setup

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory\nmore lines")

    monkeypatch.setattr(retrain, "run_round", boom)
    result = runner.process(request(2), [])
    assert result.record["outcome"] == "failed"
    assert result.record["error"] == "RuntimeError: CUDA out of memory"
    assert registry.current() == seed and ledger.get("t-round-2")["status"] == "failed"


def test_a_round_whose_trainer_died_is_retried_then_failed_after_max_attempts(setup, monkeypatch):
    registry, ledger, runner, seed = setup
    # what a trainer killed mid-round leaves: the ledger says running, the claim is held
    ledger.put("t-round-3", {"status": "running", "round": 3, "attempts": 2, "by": "host:1"})
    assert registry.claim_round("t-round-3", 60)
    monkeypatch.setattr(retrain, "run_round", lambda *a, **k: pytest.fail("max attempts reached: no third try"))
    result = runner.process(request(3), [])
    assert result.record["outcome"] == "failed" and result.record["attempts"] == 2
    assert "stopped mid-round 2 time(s)" in result.record["error"]
    assert registry.current() == seed

    monkeypatch.undo()
    ledger.put("t-round-4", {"status": "running", "round": 4, "attempts": 1, "by": "host:1"})
    assert registry.claim_round("t-round-4", 60)
    retried = runner.process(request(4), [])  # one attempt left: the round runs again, to its end
    assert retried.record["attempts"] == 2 and retried.record["outcome"] == "promoted"


def test_a_trainer_that_died_after_promoting_is_not_run_again(setup, monkeypatch):
    registry, ledger, runner, seed = setup
    from pgkd.student import Student

    candidate = registry.publish(Student.load(registry.path(seed)), parent=seed, round=5, data={}, metrics={},
                                 settings={})
    record = {"round": 5, "outcome": "promoted", "request_id": "t-round-5", "candidate": candidate, "current": seed,
              "metrics": {}, "gate": {"passed": True}, "reason": "passed"}
    ledger.put("t-round-5", {"status": "running", "round": 5, "attempts": 1, "candidate": candidate,
                             "record": record})
    registry.promote(candidate, reason="round 5", round=5)  # ... and then the trainer died
    monkeypatch.setattr(retrain, "run_round", lambda *a, **k: pytest.fail("the round was done: no retraining"))
    result = runner.process(request(5), [])
    assert result.record["outcome"] == "promoted" and result.promotion["version"] == candidate
    assert [r["round"] for r in registry.rounds()] == [5]
    assert [e["version"] for e in registry.history()] == [seed, candidate]


def test_a_trainer_that_died_after_recording_the_round_is_not_run_nor_recorded_again(setup, monkeypatch):
    """SIGKILL between ``record_round`` and the ledger's final status: the
    ledger still says "running", but the round is recorded, so it is done."""
    registry, ledger, runner, seed = setup
    real_update = ledger.update

    def die_on_final(rid, **changes):
        if "status" in changes:
            raise SystemExit("killed")  # as if the process died here
        real_update(rid, **changes)

    monkeypatch.setattr(ledger, "update", die_on_final)
    with pytest.raises(SystemExit):
        runner.process(request(6), [])
    assert ledger.get("t-round-6")["status"] == "running" and len(registry.rounds()) == 1
    monkeypatch.setattr(ledger, "update", real_update)
    monkeypatch.setattr(retrain, "run_round", lambda *a, **k: pytest.fail("the round was recorded: no retraining"))
    assert runner.process(request(6), []).record is None
    assert [r["request_id"] for r in registry.rounds()] == ["t-round-6"]
    assert ledger.get("t-round-6")["status"] == registry.recorded_round("t-round-6")["outcome"]


def test_a_round_is_recorded_at_most_once_per_request(setup):
    registry, *_ = setup
    record = {"round": 7, "outcome": "rejected", "request_id": "t-round-7"}
    assert registry.record_round(record) is True
    assert registry.record_round({**record, "outcome": "promoted"}) is False
    assert registry.record_round({"round": 8, "outcome": "failed"}) is True  # no request id: always appended
    assert [(r["round"], r["outcome"]) for r in registry.rounds()] == [(7, "rejected"), (8, "failed")]
    assert registry.recorded_round("t-round-7")["outcome"] == "rejected"
    assert registry.recorded_round("t-round-9") is None
