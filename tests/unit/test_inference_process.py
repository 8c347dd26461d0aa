"""PGKD_INFERENCE_PROCESS: a served version in a child process of its own
(pgkd/inference_process.py), on the tiny model's stored int8 graph."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from model_support import fallback_settings

from pgkd import inference_process
from pgkd.errors import InferenceProcessError, ModelIntegrityError
from pgkd.inference_process import ChildStudent, load_in_child
from pgkd.priority import lower_thread_priority, thread_nice_increment
from pgkd.serving import load_serving_model

TEXTS = ["hello", "a longer text to pad against the first", "third"]


@pytest.fixture
def settings(version_copy, tmp_path):
    return fallback_settings(version_copy, tmp_path, inference_graph="onnxruntime", inference_quantize="int8",
                             torch_threads=1, inference_process=True)


@pytest.fixture
def served(settings):
    model = load_serving_model(settings)
    yield model
    model.student.close()


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Whether the process ``pid`` exited within ``timeout_s``: every thread gone (a zombie
    counts once its main thread is all that is left; before that, the kernel is still
    tearing down its other threads and its parent cannot see the exit yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            if state in ("Z", "X") and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[16])


def test_a_child_process_serves_the_version_as_the_worker_would(served, settings):
    assert isinstance(served.student, ChildStudent)
    assert served.version == "v0007" and served.student.pid != os.getpid()
    assert served.labels == ["neg", "neu", "pos"] and served.student.graph == "onnxruntime"
    in_process = load_serving_model(settings.model_copy(update={"inference_process": False}))
    expected = in_process.student.predict_proba(TEXTS, 2)
    got = served.student.predict_proba(TEXTS, 2)
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)  # the same graph, the same passes


def test_an_error_in_the_child_is_raised_here_and_the_child_serves_on(served):
    with pytest.raises(TypeError):
        served.student.predict_proba([None, "hello"], 2)  # the tokenizer refuses a None, in the child
    with pytest.raises(TypeError, match="a single str"):
        served.student.predict_proba("hello")
    assert served.student.predict_proba(["hello"]).shape == (1, 3)
    assert served.student.restarts == 0


def test_a_child_killed_between_batches_is_restarted_with_the_same_version(served):
    restarted = []
    inference_process.on_restart.append(restarted.append)
    try:
        before = served.student.predict_proba(TEXTS)
        old = served.student.pid
        os.kill(old, signal.SIGKILL)
        assert _gone(old)
        np.testing.assert_allclose(served.student.predict_proba(TEXTS), before, atol=1e-6)
    finally:
        inference_process.on_restart.remove(restarted.append)
    assert served.student.pid != old and served.student.restarts == 1 and restarted == ["v0007"]


def _kill_during_a_call(student: ChildStudent, kill=None) -> InferenceProcessError:
    """Kill the child while it works on a batch that takes seconds; the call's error."""
    pid = student.pid
    timer = threading.Timer(0.3, kill or (lambda: os.kill(pid, signal.SIGKILL)))
    timer.start()
    try:
        with pytest.raises(InferenceProcessError) as err:
            student.predict_proba(["a text of a few words, tokenized and classified"] * 200_000, 16)
    finally:
        timer.cancel()
    return err.value


def test_a_child_that_dies_during_a_batch_fails_that_call_and_the_next_call_restarts_it(served):
    err = _kill_during_a_call(served.student)
    assert "died during a batch of 200000 texts (exit code -9); the next call restarts it" in str(err)
    assert served.student.predict_proba(["hello"]).shape == (1, 3)
    assert served.student.restarts == 1


def test_the_watchdogs_kill_fails_the_call_with_its_reason_and_the_next_call_restarts_it(served):
    old = served.student.pid
    err = _kill_during_a_call(served.student, lambda: served.student.kill("no answer in 0.3 s"))
    assert f"process {old} of v0007 was killed (no answer in 0.3 s) during a batch of 200000 texts" in str(err)
    assert served.student.predict_proba(["hello"]).shape == (1, 3)
    assert served.student.pid != old and served.student.restarts == 1
    err = _kill_during_a_call(served.student)  # a death after a restart is not blamed on the old kill
    assert "died during a batch" in str(err)


def test_a_child_that_keeps_dying_is_not_restarted_for_every_call(served, monkeypatch):
    monkeypatch.setattr(inference_process, "MAX_RESTARTS_IN_A_ROW", 1)
    _kill_during_a_call(served.student)
    with pytest.raises(InferenceProcessError, match="died 1 times in a row; not restarted"):
        served.student.predict_proba(["hello"])
    assert served.student.restarts == 0


def test_what_the_child_refuses_to_load_is_raised_here_with_its_type(version_copy, tmp_path):
    import shutil

    path = tmp_path / "tampered"
    shutil.copytree(version_copy, path)
    with (path / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    settings = fallback_settings(path, tmp_path, inference_graph="onnxruntime", inference_quantize="int8",
                                 inference_process=True)
    with pytest.raises(ModelIntegrityError, match=r"^v0007 refused: tokenizer\.json does not match its sha256"):
        load_serving_model(settings)


def test_closing_or_dropping_the_student_stops_its_process(settings):
    first = load_in_child(settings, None).student
    pid = first.pid
    first.close()
    assert _gone(pid)
    second = load_in_child(settings, None)
    pid = second.student.pid
    del second  # a version the hot swap lets go
    assert _gone(pid)


def test_the_child_serves_at_the_workers_priority_when_loaded_from_a_lowered_thread(settings):
    got = {}

    def load() -> None:  # as the hot swap's load thread: lowered by streams.hotswap.LOAD_NICE
        got["lowered"] = lower_thread_priority(5)
        got["increment"] = thread_nice_increment()
        got["model"] = load_in_child(settings, None)

    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    student = got["model"].student
    try:
        if not got["lowered"]:
            pytest.skip("this OS refuses a thread's nice value")
        assert got["increment"] == 5  # the child loaded 5 below the worker ...
        assert _nice(student.pid) == _nice(os.getpid())  # ... and serves at the worker's priority
    finally:
        student.close()


def test_a_child_gets_json_settings_without_the_teachers_and_kafkas_secrets(settings):
    import json

    from pydantic import SecretStr

    from pgkd.settings import Settings

    secret = settings.model_copy(update={"teacher_api_key": SecretStr("sk-not-for-the-child"),
                                         "kafka_sasl_password": SecretStr("not-for-the-child")})
    values = json.loads(json.dumps(inference_process._child_settings(secret)))  # the pipe carries JSON, no pickle
    assert "not-for-the-child" not in json.dumps(values)
    child = Settings(**values)
    assert child.inference_process is False and child.redis_url == settings.redis_url
    assert child.serve_model == settings.serve_model and child.inference_quantize == "int8"
