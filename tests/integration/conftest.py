"""Fixtures of the streaming tests (worker subprocesses on the real broker and
Redis); the helpers they use are in ``streaming_support.py``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from streaming_support import StreamEnv, banking

from pgkd.registry import stored_graph


@pytest.fixture(scope="session")
def tiny_student(tiny_encoder_dir, tmp_path_factory, redis_url) -> Path:
    """The tiny random encoder (``tiny_encoder_dir``) with the Banking77 labels,
    published as a registry version with its int8 ONNX graph (the directory
    ``v0001`` of a store of its own): fast to load and run. Served as
    PGKD_SERVE_MODEL with the tests' default serving profile (onnxruntime int8,
    as the compose deployment serves), a classify worker loads the stored graph
    and never imports torch."""
    from pgkd.registry import Registry
    from pgkd.student import Student

    registry = Registry(tmp_path_factory.mktemp("models"), redis_url, namespace=f"tiny-{uuid.uuid4().hex[:8]}")
    student = Student.from_pretrained(tiny_encoder_dir, banking("test").classes(), max_length=64, device="cpu")
    with registry:
        version = registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={}, graphs=("int8",))
        assert stored_graph(registry.manifest(version), "int8"), "the tiny student's graph was not built"
        return registry.path(version)


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
