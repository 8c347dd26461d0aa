"""A classify worker whose model hangs in its own threads (the default serving:
no inference process to kill) exits after PGKD_INFERENCE_TIMEOUT_S without
acknowledging the batch, and a restarted worker answers every text: nothing is
lost to the hang (docs/RELIABILITY.md, "A hung model")."""

from __future__ import annotations

import time

import pytest
from streaming_support import collect_sync, produce_sync, text_message

from streams.delivery import EXIT_INFERENCE_HUNG

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HANGS_ON = "never returns"  # hang_app.HANGS_ON (importing hang_app here would build a classify worker)


def test_a_worker_whose_model_hangs_exits_unacked_and_its_restart_answers_everything(stream, tiny_student):
    env = stream(tiny_student, batch_size=16, inference_timeout_s=3)
    t = env.topics
    hung = env.start("classify", app_module="hang_app")
    hung.wait_ready()
    ids = [f"g{i}" for i in range(120)]
    texts = {i: f"my card {i} has not arrived" for i in ids}
    texts["g60"] = f"this text {HANGS_ON}"
    produce_sync(env.bootstrap, t["texts_in"], [text_message(i, texts[i]) for i in ids])
    started = time.monotonic()
    deadline = started + 90
    while hung.alive():
        assert time.monotonic() < deadline, hung.tail()
        time.sleep(0.2)
    exited_after = time.monotonic() - started
    assert hung.proc.returncode == EXIT_INFERENCE_HUNG, hung.tail()
    assert "the model is hung and cannot be stopped inside the worker" in hung.tail(10**7)

    worker = env.start("classify")  # the shipped worker: its model does not hang on that text
    got = collect_sync(env.bootstrap, [t["labels_out"], t["dlq"]],
                       lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids),
                       timeout_s=180, workers=[worker], linger_s=2)
    answers = got.of(t["labels_out"])
    assert {r["id"] for r in answers} == set(ids)  # the hung batch was redelivered, not skipped
    assert got.of(t["dlq"]) == []
    # what it answered before the hang was committed before it exited: not answered again (48 were, before)
    assert len(answers) - len(ids) < 16
    print(f"RELIABILITY inference-hang-in-worker: {len(ids)} ids, 0 lost, {len(answers) - len(ids)} answered "
          f"twice; the hung worker committed what it had acked and exited {EXIT_INFERENCE_HUNG} {exited_after:.1f} s "
          "after the texts were sent (PGKD_INFERENCE_TIMEOUT_S=3); its restart answered the rest")
