"""``pgkd dlq summary|replay`` on a real Kafka and Redis: a teacher outage's dead
letters replayed once it is over, and the letters a replay must leave alone."""

import json
import os
import subprocess
import sys

import pytest

from pgkd.simulator import SimulatorServer
from streams.schemas import DeadLetter
from streaming_support import StreamEnv, collect_sync, produce_sync, text_message

pytestmark = pytest.mark.integration


def pgkd(env: StreamEnv, *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")}
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=clean | env.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def summary_row(env: StreamEnv, stage: str, reason: str) -> list[str]:
    rows = [line.split("\t") for line in pgkd(env, "dlq", "summary").stdout.splitlines()]
    (row,) = [r for r in rows if r[:2] == [stage, reason]]
    return row


@pytest.mark.slow
def test_a_teacher_outage_dead_letters_are_replayed_into_teacher_labels_once_it_is_over(stream, tiny_student,
                                                                                       sim_pool):
    sim = SimulatorServer(sim_pool, fail_rate=1.0)  # the outage: every request answers 500
    env = stream(tiny_student, teacher_base_url=sim.url, low_conf_threshold=1.0, teacher_max_retries=1,
                 teacher_timeout_s=1.0, teacher_batch_size=8, teacher_concurrency=1, teacher_batch_within_s=0.5)
    t = env.topics
    ids = [f"outage-{i}" for i in range(8)]
    try:
        classify, teacher = env.start("classify"), env.start("teacher")
        classify.wait_ready()
        teacher.wait_ready()
        produce_sync(env.bootstrap, t["texts_in"], [text_message(i, f"my card {i} was declined") for i in ids])
        got = collect_sync(env.bootstrap, [t["dlq"]], lambda g: {r["id"] for r in g.of(t["dlq"])} >= set(ids),
                           timeout_s=120, workers=[classify, teacher])
        assert {(r["stage"], r["reason"]) for r in got.of(t["dlq"])} == {("teacher", "server_error")}
        assert summary_row(env, "teacher", "server_error")[2:4] == ["8", "0"]

        sim.fail_rate = 0.0  # the outage is over
        dry = pgkd(env, "dlq", "replay", "--stage", "teacher", "--reason", "server_error", "--dry-run").stdout
        assert dry.startswith("would replay 8 letter(s)"), dry
        assert summary_row(env, "teacher", "server_error")[2:4] == ["8", "0"]  # a dry run marks nothing

        done = pgkd(env, "dlq", "replay", "--stage", "teacher", "--reason", "server_error").stdout
        assert done.splitlines()[0] == f"replayed 8 letter(s); 8 to {t['teacher_requests']}"
        labels = collect_sync(env.bootstrap, [t["teacher_labels"]],
                              lambda g: {r["id"] for r in g.of(t["teacher_labels"])} >= set(ids),
                              timeout_s=120, workers=[classify, teacher])
        assert sorted(r["id"] for r in labels.of(t["teacher_labels"])) == sorted(ids)  # each once

        again = pgkd(env, "dlq", "replay", "--stage", "teacher").stdout.splitlines()
        assert again == ["replayed 0 letter(s)", "skipped 8: replayed before"]
        assert summary_row(env, "teacher", "server_error")[2:4] == ["8", "8"]
    finally:
        sim.close()


def test_a_replay_sends_only_whole_originals_to_this_deployments_input_topics(stream, tiny_student,
                                                                             kafka_bootstrap):
    env = stream(tiny_student)  # no worker: the letters are written here as a classify worker writes them
    t = env.topics
    good_key, good = text_message("long-1", "a text the old PGKD_MAX_TEXT_CHARS refused")

    def letter(offset: int, value: bytes, topic: str = t["texts_in"], limit: int = 1 << 16) -> tuple[bytes, bytes]:
        dead = DeadLetter.of(stage="parse", reason="text_too_long", error="text over 20 characters", topic=topic,
                             partition=0, offset=offset, value=value, ts=1795813387.0, max_original_bytes=limit,
                             id=json.loads(value)["id"])
        return dead.key().encode(), dead.dumps()

    produce_sync(kafka_bootstrap, t["dlq"], [
        letter(1, good),
        letter(2, text_message("cut-2", "x" * 500)[1], limit=100),  # its original was cut: never replayed
        letter(3, text_message("other-3", "elsewhere")[1], topic="someone-elses.topic"),
        (b"junk", b"not a dead letter"),
    ])
    done = pgkd(env, "dlq", "replay", "--stage", "parse").stdout.splitlines()
    assert done == [f"replayed 1 letter(s); 1 to {t['texts_in']}",
                    "skipped 1: from someone-elses.topic, not an input topic of this deployment",
                    "skipped 1: not a dead letter",
                    "skipped 1: original cut (PGKD_DLQ_MAX_ORIGINAL_BYTES)"]
    got = collect_sync(kafka_bootstrap, [t["texts_in"]], lambda g: len(g.of(t["texts_in"])) >= 1, timeout_s=30,
                       linger_s=1)
    assert got.records[t["texts_in"]] == [(good_key.decode(), json.loads(good))]  # the same bytes, keyed by id
    skipped = pgkd(env, "dlq", "replay", "--stage", "inference").stdout.splitlines()
    assert skipped[0] == "replayed 0 letter(s)" and "skipped 3: not selected" in skipped
