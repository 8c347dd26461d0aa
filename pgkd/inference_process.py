"""The served student in a child process (``PGKD_INFERENCE_PROCESS=true``).

Each version a classify worker serves lives in a process of its own, which
loads, verifies and warms it; the worker's inference thread sends it a take's
texts and waits for the probabilities on a pipe. What this buys is isolation:
a native crash (a segfault in the runtime, the kernel's OOM killer) takes down
that process, not the worker. The call fails with
:class:`InferenceProcessError`, the worker retries the batch text by text, and
the next call starts a process with the same version. What it costs, measured
on 2 cores (docs/BENCHMARKS.md, "Session 21"): nothing in sustained rate (the
GIL the inference thread shares with the event loop was not what held it
back), a new version's longest hot-swap gap ~2x the in-process one (its load
shares no tokenizer and no warm memory with the worker's), and memory.

A fresh Python process also spends about a second of CPU importing numpy, ONNX
Runtime and the tokenizer before it can load anything. So one *spare* process
is kept ready: started once a version serves, it imports on a thread at
:data:`PREPARE_NICE` and waits; the next version (a hot swap, a restart) loads
in it (a swap in 0.4-0.6 s instead of 0.6-1.0 s).

The protocol is one :func:`multiprocessing.Pipe` per process, carrying bytes,
never pickles (multiprocessing's start-up pickles only the function the child
runs and its end of the pipe): JSON requests, and answers that are a kind byte and a body. The
parent sends a load request (the settings, without the teacher's and Kafka's
secrets, which a child never uses; the version; the nice value to load at)
once, and the child answers ``R`` + JSON attributes or ``E`` + a JSON error;
then one request at a time, ``{"texts": [...], "batch_size": n}``, answered
``P`` + rows, columns and float32 probabilities, or ``E``. An empty message
(or the parent's end closing, also when the worker is killed) makes the child
exit.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pgkd import errors
from pgkd.errors import InferenceProcessError, ModelError
from pgkd.priority import at_base_priority, lower_thread_priority, thread_nice_increment

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from pgkd.serving import ServingModel
    from pgkd.settings import Settings

log = logging.getLogger(__name__)

# Restarts of a dead process in a row (no answer between them) before calls fail
# without one: a model that kills its process on every text must not reload for
# every text of a batch; the worker's all-texts-fail rule then stops the worker.
MAX_RESTARTS_IN_A_ROW = 3
# Called with the version after each restart of a dead process (a classify worker
# counts them: pgkd_inference_process_restarts_total).
on_restart: list[Callable[[str], None]] = []
# Added to a spare process's nice value while it imports: it must not slow the version serving.
PREPARE_NICE = 10
# What a spare imports before it is asked to load (the ONNX Runtime serving path; torch loads on demand).
PREPARED_MODULES = ("numpy", "onnxruntime", "tokenizers", "pgkd.serving", "pgkd.graph_student", "pgkd.inference_onnx")
_spare: list[tuple[Connection, multiprocessing.Process]] = []  # at most one, ready to load
_spare_lock = threading.Lock()


def _spawn() -> tuple[Connection, multiprocessing.Process]:
    """A new child process, importing :data:`PREPARED_MODULES` and then waiting for its load request."""
    multiprocessing.active_children()  # reaps the processes of versions let go since the last start
    ctx = multiprocessing.get_context("spawn")  # no fork: the worker has threads and an event loop
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(child_conn,), name="pgkd-inference", daemon=True)
    at_base_priority(proc.start)  # a child inherits its parent thread's nice: it must not serve lowered
    child_conn.close()
    return conn, proc


def _take_process() -> tuple[Connection, multiprocessing.Process]:
    """The spare process if it is alive, else a new one."""
    with _spare_lock:
        while _spare:
            conn, proc = _spare.pop()
            if proc.is_alive():
                return conn, proc
            conn.close()
    return _spawn()


def _keep_a_spare() -> None:
    """Start the spare process unless one is waiting (the caller waits only for the start, not the imports)."""
    with _spare_lock:
        if _spare and _spare[0][1].is_alive():
            return
        _spare.clear()
        _spare.append(_spawn())


def load_in_child(settings: Settings, version: str | None) -> ServingModel:
    """A :class:`pgkd.serving.ServingModel` whose student runs in a new child
    process: the registry ``version`` (verified against its checksums), or with
    ``None`` the PGKD_SERVE_MODEL directory (:func:`pgkd.serving.load_fallback`).
    The child loads and warms at the calling thread's priority (a hot swap's load
    thread runs lowered, beside the version that serves) and then serves at the
    worker's. Raises what the load raised in the child (ModelIntegrityError,
    RegistryError, ...), or InferenceProcessError."""
    from pgkd.serving import ServingModel

    student = ChildStudent(settings, version, nice=thread_nice_increment())
    return ServingModel(student=student, version=student.version, path=student.path)


class ChildStudent:
    """``predict_proba`` of a student loaded in a child process (see the module).

    ``labels``, ``version``, ``path``, ``device``, ``quantize`` and ``graph`` are
    the child's student's. Thread-safe (one request at a time). The process
    exits when :meth:`close` is called or this object is garbage collected."""

    model = None  # no weights in this process

    def __init__(self, settings: Settings, version: str | None, nice: int = 0):
        self._settings = _child_settings(settings)
        self._version, self._nice = version, nice
        self._lock = threading.Lock()
        self._deaths = 0  # in a row, without an answer between them
        self._dead = False  # died during a call (it may not be reaped yet: is_alive() can still say True)
        self._killed_for: str | None = None  # why kill() was called on the current process
        self.restarts = 0
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _start(self) -> None:
        conn, proc = _take_process()
        self._conn, self._proc = conn, proc
        self._finalizer = weakref.finalize(self, _stop, conn)
        request = {"settings": self._settings, "version": self._version, "nice": self._nice}
        try:
            conn.send_bytes(json.dumps(request).encode())
            answer = conn.recv_bytes()
        except (EOFError, OSError):
            proc.join(5)
            self._finalizer()
            raise InferenceProcessError(f"the inference process exited while loading (exit code {proc.exitcode})") \
                from None
        if answer[:1] != b"R":
            self._finalizer()
            raise _error_from(answer)
        for name, attr in json.loads(answer[1:]).items():
            setattr(self, name, attr)
        self._dead, self._killed_for = False, None
        self.path = Path(self.path)
        log.info("inference process %d serves %s", proc.pid, self.version)
        _keep_a_spare()

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """The child student's ``predict_proba(texts, batch_size)``. A process found
        dead is restarted first (at most :data:`MAX_RESTARTS_IN_A_ROW` in a row);
        InferenceProcessError when it dies during the call."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        with self._lock:
            if self._dead or not self._proc.is_alive():
                self._restart()
            try:
                self._conn.send_bytes(json.dumps({"texts": list(texts), "batch_size": batch_size}).encode())
                answer = self._conn.recv_bytes()
            except (EOFError, OSError):
                self._proc.join(5)
                self._dead = True
                self._deaths += 1
                how = f"was killed ({self._killed_for})" if self._killed_for else "died"
                raise InferenceProcessError(
                    f"the inference process {self._proc.pid} of {self.version} {how} during a batch of "
                    f"{len(texts)} texts (exit code {self._proc.exitcode}); the next call restarts it") from None
        if answer[:1] != b"P":
            raise _error_from(answer)
        self._deaths = 0
        rows, cols = struct.unpack_from("<II", answer, 1)
        return np.frombuffer(answer, dtype=np.float32, count=rows * cols, offset=9).reshape(rows, cols).copy()

    def _restart(self) -> None:
        if self._deaths >= MAX_RESTARTS_IN_A_ROW:
            raise InferenceProcessError(
                f"the inference process of {self.version} died {self._deaths} times in a row; not restarted")
        self._finalizer()
        started = time.perf_counter()
        try:
            self._start()
        except Exception:
            self._deaths += 1  # a start that fails counts as a death: no reload on every call
            raise
        self.restarts += 1
        for hook in on_restart:
            hook(self.version)
        log.warning("restarted the inference process of %s in %.1fs (pid %d)", self.version,
                    time.perf_counter() - started, self._proc.pid)

    def kill(self, reason: str) -> None:
        """SIGKILL the process, from any thread (the watchdog's, for a call that does
        not return: streams.watchdog): a call waiting for it fails with
        InferenceProcessError naming ``reason``, and the next call restarts it."""
        self._killed_for = reason
        log.warning("killing the inference process %s of %s: %s", self._proc.pid, self.version, reason)
        self._proc.kill()

    def close(self) -> None:
        """Stop the process (idempotent)."""
        self._finalizer()


def _stop(conn: Connection) -> None:
    # The child exits on an empty message, or on EOF when the send fails or the pipe closes.
    try:
        conn.send_bytes(b"")
    except OSError:
        pass
    conn.close()


def _child_settings(settings: Settings) -> dict:
    """The settings a child loads with, as JSON values: every field, serving in
    this process (PGKD_INFERENCE_PROCESS off), the secret files already read, and
    without the secrets of the teacher and of Kafka, which a child never uses."""
    from pydantic import SecretStr

    from pgkd.settings import SECRET_FILES

    values = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        values[name] = str(value) if isinstance(value, Path) else value
    return values | {f"{secret}_file": "" for secret in SECRET_FILES} | {
        "inference_process": False, "teacher_api_key": "", "kafka_sasl_password": ""}


# The exceptions a child's error may come back as (by name); any other is a ModelError naming its type.
_RAISABLE = {cls.__name__: cls for cls in (
    errors.ConfigError, errors.DataError, errors.ModelError, errors.ModelIntegrityError, errors.RegistryError,
    errors.RegistryUnavailable, InferenceProcessError, TypeError, ValueError, RuntimeError, OSError, MemoryError)}


def _error_message(err: BaseException) -> bytes:
    return b"E" + json.dumps({"type": type(err).__name__, "message": str(err)}).encode()


def _error_from(answer: bytes) -> Exception:
    """The exception a child's ``E`` answer names (or an InferenceProcessError for anything else)."""
    if answer[:1] != b"E":
        return InferenceProcessError(f"the inference process answered an unknown message ({answer[:1]!r})")
    error = json.loads(answer[1:])
    kind = _RAISABLE.get(error["type"])
    return kind(error["message"]) if kind else ModelError(f"{error['type']}: {error['message']}")


def _child_main(conn: Connection) -> None:
    """The child: import on a lowered thread, wait for the load request, load
    and warm on a thread at the nice it asks for (the version serving meanwhile
    keeps the CPU), then answer requests on the main thread at the priority
    inherited from the worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the worker, which stops this process
    try:
        _on_lowered_thread(_prepare, PREPARE_NICE)
        request = conn.recv_bytes()
        if not request:
            return
        load = json.loads(request)
        try:
            model = _on_lowered_thread(lambda: _load(load["settings"], load["version"]), load["nice"])
        except Exception as err:  # noqa: BLE001 - sent to the parent, which raises it
            conn.send_bytes(_error_message(err))
            return
        student = model.student
        ready = {"labels": list(student.labels), "version": model.version, "path": str(model.path),
                 "device": student.device, "quantize": student.quantize, "graph": student.graph}
        conn.send_bytes(b"R" + json.dumps(ready).encode())
        while True:
            request = conn.recv_bytes()
            if not request:
                return
            batch = json.loads(request)
            try:
                probs = np.ascontiguousarray(student.predict_proba(batch["texts"], batch["batch_size"]),
                                             dtype=np.float32)
                answer = b"P" + struct.pack("<II", *probs.shape) + probs.tobytes()
            except Exception as err:  # noqa: BLE001 - one batch's failure is the parent's to handle
                answer = _error_message(err)
            conn.send_bytes(answer)
    except (EOFError, OSError):  # the worker is gone
        return
    finally:
        conn.close()
        os._exit(0)  # no interpreter teardown: the runtime's threads need no orderly exit


def _prepare() -> None:
    import importlib

    for name in PREPARED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional runtime: the load says so if it needs it
            pass


def _load(values: dict, version: str | None) -> ServingModel:
    from pgkd.serving import WARMUP_TEXT, load_fallback, load_version
    from pgkd.settings import Settings

    settings = Settings(**values)
    model = load_version(settings, version) if version is not None else load_fallback(settings)
    model.student.predict_proba([WARMUP_TEXT], 1)
    return model


def _on_lowered_thread(fn: Callable[[], object], nice: int) -> object:
    """``fn()`` on a new thread whose nice value is raised by ``nice``; its result, or its exception."""
    out: dict = {}

    def run() -> None:
        if nice:
            lower_thread_priority(nice)
        try:
            out["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised on the calling thread
            out["error"] = err

    thread = threading.Thread(target=run, name="pgkd-inference-load")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]
