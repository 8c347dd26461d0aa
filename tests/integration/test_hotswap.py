"""Hot swap on the real broker and Redis: classifier workers follow the
registry's current version through ``model.updates`` (promotions and a
rollback by ``pgkd models``, which finds the previous version in memory), and refuse a version whose files were tampered with.

The models are tiny random encoders (what is served does not matter here, only
which version answered)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streaming_support import REPO_ROOT, TORCH_SERVING, collect_sync, metric_sum, produce, producing, text_message

from pgkd.registry import Registry
from pgkd.settings import Settings
from streams.announce import announce_model_update

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A record may carry the previous version if its batch started before the swap;
# a worker swaps within a second of an announcement (tiny model), so 10 s is generous.
SWAP_WINDOW_S = 10.0


def publish_versions(registry: Registry, model_dir: Path, n: int) -> list[str]:
    """``n`` versions of the tiny student, each with its own random head."""
    import torch

    from pgkd.student import Student

    student = Student.load(model_dir, device="cpu")
    versions = []
    for seed in range(n):
        torch.manual_seed(seed)
        student.model.classifier.reset_parameters()
        versions.append(registry.publish(student, parent=versions[-1] if versions else None, round=seed,
                                         data={}, metrics={}, settings={}))
    return versions


def pgkd_cli(env, *args: str) -> subprocess.CompletedProcess:
    """``pgkd ARGS`` in a subprocess with the test's PGKD_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")}
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", *args], cwd=REPO_ROOT, env=base | env.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pgkd {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def registry_env(stream, tiny_student, tmp_path, redis_db_url):
    """A StreamEnv whose registry (store + Redis namespace) the test also holds."""

    def make(**overrides):
        env = stream(tiny_student, model_store=tmp_path / "models", **(TORCH_SERVING | overrides))
        registry = Registry(tmp_path / "models", redis_db_url, namespace=env.env["PGKD_APP_ID_PREFIX"])
        return env, registry

    return make


def current_at(history: list[dict], t: float) -> str | None:
    """The version that was current at time ``t`` according to the registry history."""
    version = None
    for entry in history:
        if entry["ts"] <= t:
            version = entry["version"]
    return version


def test_two_promotions_and_a_rollback_under_load(registry_env, tiny_student):
    env, registry = registry_env(model_poll_s=0, batch_size=16)
    t = env.topics
    v1, v2, v3 = publish_versions(registry, tiny_student, 3)
    registry.promote(v1, reason="seed")
    workers = [env.start("classify"), env.start("classify")]
    for w in workers:
        w.wait_ready()
    time.sleep(3)  # both members settled in the group

    n = 1500
    ids = [f"h{i}" for i in range(n)]
    messages = [text_message(i, f"my transfer number {i} has not arrived yet") for i in ids]
    with producing(env.bootstrap, t["texts_in"], messages, rate_per_s=60):
        time.sleep(4)
        pgkd_cli(env, "models", "promote", v2, "--reason", "test: first promotion")
        time.sleep(4)
        pgkd_cli(env, "models", "promote", v3, "--reason", "test: second promotion")
        time.sleep(4)
        out = pgkd_cli(env, "models", "rollback", "--reason", "test: rollback")
        assert f"rolled back to {v2}" in out.stdout
    # once the swap window after the rollback has passed, only v2 may answer
    time.sleep(max(0.0, registry.history()[-1]["ts"] + SWAP_WINDOW_S - time.time()))
    tail = [f"z{i}" for i in range(100)]
    asyncio.run(produce(env.bootstrap, t["texts_in"], [text_message(i, f"top up {i} failed") for i in tail]))
    ids += tail
    got = collect_sync(env.bootstrap, [t["labels_out"]],
                       lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids),
                       timeout_s=180, workers=workers, linger_s=3)

    # every id, once, from the student
    records = got.stamped(t["labels_out"])
    assert sorted(r["id"] for _, r in records) == sorted(ids)
    assert all(r["source"] == "student" for _, r in records)

    history = registry.history()
    assert [e["version"] for e in history] == [v1, v2, v3, v2]
    served = {r["model_version"] for _, r in records}
    assert {v1, v2, v3} <= served, f"every promoted version answered something: {served}"
    for at, r in records:
        # the version was current at some moment of the swap window before the answer
        window = {current_at(history, at - dt) for dt in (0, SWAP_WINDOW_S)} | {
            e["version"] for e in history if at - SWAP_WINDOW_S <= e["ts"] <= at}
        assert r["model_version"] in window, (r, at, history)
    assert {r["model_version"] for _, r in records if r["id"] in set(tail)} == {v2}
    for w in workers:  # each worker of the group saw every announcement
        assert metric_sum(w.metrics(), "pgkd_model_info", model_version=v2) == 1
        log = w.tail(10**7)
        assert f"swapped {v1} -> {v2} (loaded and warmed" in log and f"swapped {v2} -> {v3} (loaded and warmed" in log
        # the rollback found v2 in memory (PGKD_KEEP_PREVIOUS_MODEL): nothing was loaded for it
        assert f"swapped {v3} -> {v2} (kept in memory" in log and log.count(f"loading {v2} ") == 1


def test_tampered_version_is_refused_and_the_old_one_keeps_serving(registry_env, tiny_student):
    env, registry = registry_env(model_poll_s=0)
    t = env.topics
    v1, v2 = publish_versions(registry, tiny_student, 2)
    registry.promote(v1, reason="seed")
    worker = env.start("classify")
    worker.wait_ready()

    # v2 becomes current, then a byte of its weights changes before the workers hear of it
    entry = registry.promote(v2, reason="test")
    weights = registry.path(v2) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    settings = Settings(**{k.removeprefix("PGKD_").lower(): v for k, v in env.env.items()})
    announce_model_update(settings, entry)

    deadline = time.monotonic() + 60
    while "refused model" not in worker.tail(10**7):
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.5)
    assert f"refused model {v2} (checksum)" in worker.tail(10**7)
    assert "model.safetensors does not match its sha256" in worker.tail(10**7)
    assert metric_sum(worker.metrics(), "pgkd_model_load_failures_total", reason="checksum") >= 1

    ids = [f"c{i}" for i in range(100)]
    asyncio.run(produce(env.bootstrap, t["texts_in"], [text_message(i, f"card {i} declined") for i in ids]))
    got = collect_sync(env.bootstrap, [t["labels_out"]],
                       lambda g: {r["id"] for r in g.of(t["labels_out"])} >= set(ids), timeout_s=120,
                       workers=[worker])
    assert {r["model_version"] for r in got.of(t["labels_out"])} == {v1}
    assert metric_sum(worker.metrics(), "pgkd_model_info", model_version=v1) == 1

    # a worker starting now is pointed at the tampered version: it says why and stops, it never serves it
    late = env.start("classify")
    assert late.proc.wait(timeout=120) == 78
    assert f"{v2} refused: model.safetensors does not match its sha256" in late.tail(10**7)
