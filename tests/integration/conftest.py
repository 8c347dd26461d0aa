"""Fixtures of the streaming tests (worker subprocesses on the real broker and
Redis); the helpers they use are in ``streaming_support.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from streaming_support import StreamEnv, banking


@pytest.fixture(scope="session")
def tiny_student(tiny_encoder_dir, tmp_path_factory) -> Path:
    """The tiny random encoder (``tiny_encoder_dir``) with the Banking77 labels,
    saved by ``Student.save``: fast to load and run."""
    from pgkd.student import Student

    out = tmp_path_factory.mktemp("models") / "tiny-v1"
    Student.from_pretrained(tiny_encoder_dir, banking("test").classes(), max_length=64, device="cpu").save(out)
    return out


@pytest.fixture
def sim_pool():
    return banking("train")


@pytest.fixture
def stream(kafka_bootstrap, redis_db_url, unique_topic, tmp_path, request):
    """A factory of StreamEnv for this test; stops every worker at the end and
    prints their logs (shown when the test fails)."""
    made: list[StreamEnv] = []

    def make(model_dir: Path, **overrides) -> StreamEnv:
        env = StreamEnv.make(kafka_bootstrap, redis_db_url, unique_topic, tmp_path, model_dir,
                             kafka_session_timeout_s=10, **overrides)
        made.append(env)
        return env

    yield make
    for env in made:
        env.stop_all()
        print(env.logs())
