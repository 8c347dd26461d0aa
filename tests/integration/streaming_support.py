"""Helpers of the streaming tests (not a test module): worker subprocesses,
producing into and reading from the real broker, scraping /metrics.

Workers run as real processes (``pgkd worker <role>`` or ``faust -A``),
configured only by ``PGKD_*`` variables, on one thread: the test machine has
two cores shared with other test runs. Classify workers serve as the compose
deployment does (ONNX Runtime, int8: a model directory with a stored graph
loads without torch); tests of the torch path, or of versions published
without a graph, pass ``**TORCH_SERVING``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pgkd.data import LabelledTexts, load_labelled
from pgkd.settings import Settings
from streams.topics import TopicState, ensure_topics

REPO_ROOT = Path(__file__).resolve().parents[2]
BANKING = Path(os.environ.get("PGKD_TEST_BANKING77", REPO_ROOT.parent / "shared" / "datasets" / "banking77"))

# The settings' own serving defaults, for a test that serves the torch path: exact fp32
# answers, and nothing to build for a version published without an ONNX graph.
METRICS_LINE = re.compile(r"metrics on http://[^/]+:(\d+)/metrics")  # streams.metrics.start_metrics_server
TORCH_SERVING = {"inference_graph": "torchscript", "inference_quantize": "fp32"}

TOPIC_SETTINGS = {
    "texts_in": "PGKD_TOPIC_TEXTS_IN",
    "labels_out": "PGKD_TOPIC_LABELS_OUT",
    "teacher_requests": "PGKD_TOPIC_TEACHER_REQUESTS",
    "teacher_labels": "PGKD_TOPIC_TEACHER_LABELS",
    "dlq": "PGKD_TOPIC_DLQ",
    "retrain_requests": "PGKD_TOPIC_RETRAIN_REQUESTS",
    "model_updates": "PGKD_TOPIC_MODEL_UPDATES",
}


def banking(split: str) -> LabelledTexts:
    """A Banking77 split (``train`` / ``test``); skips the test when the dataset is missing."""
    path = BANKING / f"{split}.csv"
    if not path.is_file():
        pytest.skip(f"Banking77 not found at {path} (set PGKD_TEST_BANKING77)")
    return load_labelled(path, ["text"], "category")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` different free loopback ports, picked with every socket held open (two
    single picks can return the same port)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class StreamEnv:
    """Fresh topic names, app prefix and Redis db for one test, as PGKD_* variables."""

    bootstrap: str
    topics: dict[str, str]
    env: dict[str, str]
    workdir: Path
    workers: list[Worker] = field(default_factory=list)

    @classmethod
    def make(cls, bootstrap: str, redis_url: str, unique: Callable[[str], str], workdir: Path,
             model_dir: Path, *, create_topics: bool = True, **overrides: object) -> StreamEnv:
        """With ``create_topics`` the topics exist before anything sends, as a
        deployment's ``pgkd topics create`` makes them (the brokers of deploy/local
        do not auto-create topics); without, the first worker creates them."""
        prefix = unique("app")
        topics = {name: f"{prefix}.{name.replace('_', '.')}" for name in TOPIC_SETTINGS}
        env = {
            "PGKD_KAFKA_BOOTSTRAP": bootstrap,
            "PGKD_REDIS_URL": redis_url,
            "PGKD_SERVE_MODEL": str(model_dir),
            "PGKD_APP_ID_PREFIX": prefix,
            "PGKD_FAUST_DATADIR": str(workdir / "faust"),
            "PGKD_TORCH_THREADS": "1",
            # the compose deployment's serving profile; a test of the torch path says so
            "PGKD_INFERENCE_GRAPH": "onnxruntime",
            "PGKD_INFERENCE_QUANTIZE": "int8",
            "PGKD_METRICS_PORT": "0",
            "PGKD_BATCH_SIZE": "32",
            "PGKD_BATCH_WITHIN_S": "0.2",
            "PGKD_TEACHER_BATCH_WITHIN_S": "0.3",
            **{TOPIC_SETTINGS[name]: topic for name, topic in topics.items()},
        }
        env |= {f"PGKD_{k.upper()}": str(v) for k, v in overrides.items()}
        made = cls(bootstrap, topics, env, workdir)
        if create_topics:
            made.create_topics()
        return made

    def settings(self) -> Settings:
        return Settings(**{name.removeprefix("PGKD_").lower(): value for name, value in self.env.items()})

    def create_topics(self) -> list[TopicState]:
        """``pgkd topics create``, in-process (in a thread: callable from a running event loop too)."""
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, ensure_topics(self.settings())).result()

    def start(self, role: str, *, via_faust: bool = False, app_module: str | None = None,
              **overrides: object) -> Worker:
        """``pgkd worker <role>``; with ``via_faust``, ``faust -A <its module> worker``; with
        ``app_module``, ``faust -A <app_module> worker`` (a test app of this directory)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")}
        env |= self.env | {f"PGKD_{k.upper()}": str(v) for k, v in overrides.items()}
        env["PGKD_METRICS_PORT"] = "0"  # the worker binds a free port and logs it (Worker.metrics_port)
        env["OMP_NUM_THREADS"] = "1"
        if app_module:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
        if via_faust or app_module:
            module = app_module or {"classify": "streams.classify", "teacher": "streams.teacher_agent"}[role]
            cmd = [sys.executable, "-m", "faust", "-A", module, "worker", "-l", "info"]
        else:
            cmd = [sys.executable, "-m", "pgkd.cli", "worker", role]
        n = sum(w.role == role for w in self.workers)
        log = self.workdir / f"{role}-{n}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        worker = Worker(role, proc, log)
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:  # all at once: each takes seconds to leave its group
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop()

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"----- {w.log.name} (exit {w.proc.poll()}) -----\n{w.tail(tail)}" for w in self.workers)


@dataclass
class Worker:
    role: str
    proc: subprocess.Popen
    log: Path
    _metrics_port: int | None = None

    @property
    def metrics_port(self) -> int:
        """The port of its /metrics, from its log: it binds a free one itself
        (PGKD_METRICS_PORT=0), so no port picked here can be taken meanwhile by
        another process, a parallel test's or a Kafka client's outgoing socket."""
        deadline = time.monotonic() + 120
        while self._metrics_port is None:
            found = METRICS_LINE.search(self.tail(10**7))
            if found:
                self._metrics_port = int(found[1])
                break
            assert self.alive(), f"{self.role} worker exited with {self.proc.returncode}:\n{self.tail()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} worker logged no metrics port in 120 s:\n{self.tail()}")
            time.sleep(0.1)
        return self._metrics_port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until Faust says the worker is ready and partitions are assigned."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.alive(), f"{self.role} worker exited with {self.proc.returncode}:\n{self.tail()}"
            if "Worker]: Ready" in self.tail(10**7):
                return
            time.sleep(0.25)
        raise TimeoutError(f"{self.role} worker not ready after {timeout_s}s:\n{self.tail()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics as {'name{labels}': value}."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if all(pairs.get(k) == v for k, v in labels.items()):
            total += value
    return total


# --- services of one test (fault tests stop and restart them) ---------------------


@dataclass
class LocalService:
    """A Kafka broker or Redis of its own, from ``deploy/local/<script>`` on free
    loopback ports with its data in ``data_dir``, for tests that stop, kill and
    restart it. The broker keeps its data dir across restarts (topics, offsets,
    committed groups); Redis runs without persistence, so a restart empties it."""

    script: str  # "kafka" | "redis"
    data_dir: Path
    port: int = 0  # 0: free ports picked together (__post_init__)
    controller_port: int = 0

    def __post_init__(self) -> None:
        picked = iter(free_ports(2))
        self.port = self.port or next(picked)
        self.controller_port = self.controller_port or next(picked)

    @property
    def args(self) -> list[str]:
        extra = ["--controller-port", str(self.controller_port)] if self.script == "kafka" else []
        return ["--port", str(self.port), *extra, "--data-dir", str(self.data_dir)]

    @property
    def address(self) -> str:
        """Kafka: ``127.0.0.1:port``; Redis: ``redis://127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}" if self.script == "kafka" else f"redis://127.0.0.1:{self.port}"

    def _run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO_ROOT / "deploy" / "local" / self.script), command, *self.args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)

    def start(self) -> None:
        done = self._run("start")
        if done.returncode != 0:
            raise RuntimeError(f"deploy/local/{self.script} start failed:\n{done.stdout}{done.stderr}")

    def stop(self) -> None:
        """Graceful: SIGTERM, then wait (the script's own stop)."""
        self._run("stop")

    @property
    def pid(self) -> int:
        return int((self.data_dir / f"{self.script}.pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL, as a crash would: no controlled shutdown, no flush beyond the page cache."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def freeze(self) -> None:
        """SIGSTOP: the process hangs with its sockets open, as behind a network
        partition or in a long GC pause: clients get no error, only no answer."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that init has not reaped yet is gone for our purposes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# --- Kafka I/O ---------------------------------------------------------------------


def text_message(ident: str, text: str, **extra: object) -> tuple[bytes, bytes]:
    return ident.encode(), json.dumps({"id": ident, "text": text, **extra}).encode()


async def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]],
                  rate_per_s: float | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2 * 1024 * 1024,
                                linger_ms=5)
    await producer.start()
    try:
        for i, (key, value) in enumerate(messages):
            await producer.send(topic, key=key, value=value)
            if rate_per_s and i % 10 == 9:
                await asyncio.sleep(10 / rate_per_s)
        await producer.flush()
    finally:
        await producer.stop()


def produce_sync(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]) -> None:
    asyncio.run(produce(bootstrap, topic, list(messages)))


@contextlib.contextmanager
def producing(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]],
              rate_per_s: float) -> Iterator[None]:
    """Produce ``messages`` at ``rate_per_s`` from a thread while the block runs (faults, promotions
    under traffic); at its end, wait until the last one is sent."""
    messages = list(messages)
    thread = threading.Thread(target=lambda: asyncio.run(produce(bootstrap, topic, messages, rate_per_s=rate_per_s)))
    thread.start()
    try:
        yield
    finally:
        thread.join()


@dataclass
class Collected:
    """Every record read so far, by topic: (key, parsed JSON value)."""

    records: dict[str, list[tuple[str, dict]]]
    stamps: dict[str, list[float]] = field(default_factory=dict)  # Kafka timestamps (s), parallel to records

    def of(self, topic: str) -> list[dict]:
        return [value for _key, value in self.records.get(topic, [])]

    def stamped(self, topic: str) -> list[tuple[float, dict]]:
        """(the record's Kafka timestamp in seconds: when the broker got it, value), in reading order."""
        return list(zip(self.stamps.get(topic, []), self.of(topic), strict=True))


async def collect(
    bootstrap: str,
    topics: list[str],
    done: Callable[[Collected], bool],
    timeout_s: float,
    workers: Iterable[Worker] = (),
    linger_s: float = 0.0,
) -> Collected:
    """Read ``topics`` from the beginning until ``done`` (then ``linger_s`` more
    seconds, to catch duplicates); fails if a worker dies or time runs out."""
    got = Collected({t: [] for t in topics}, {t: [] for t in topics})
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=None, fetch_max_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        finished_at: float | None = None
        while True:
            for worker in workers:
                assert worker.alive(), f"{worker.role} worker exited with {worker.proc.returncode}:\n{worker.tail()}"
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                for r in records:
                    got.records[tp.topic].append(((r.key or b"").decode(), json.loads(r.value)))
                    got.stamps[tp.topic].append(r.timestamp / 1000)
            now = time.monotonic()
            if finished_at is None and done(got):
                finished_at = now
            if finished_at is not None and now - finished_at >= linger_s:
                return got
            if now > deadline:
                sizes = {t: len(v) for t, v in got.records.items()}
                raise TimeoutError(f"not done after {timeout_s}s; records so far: {sizes}")
    finally:
        await consumer.stop()


def collect_sync(*args, **kwargs) -> Collected:
    return asyncio.run(collect(*args, **kwargs))


# --- models ------------------------------------------------------------------------


def probe_student(rows: int = 1000, steps: int = 200, lr: float = 1e-2, wd: float = 1e-4, max_length: int = 64,
                  seed: int = 0):
    """The default MiniLM student with only its head fitted on ``rows`` stratified
    Banking77 train rows (encoder frozen: a linear probe on the pooled output, full
    batch Adam). About a minute on two cores, ~77% test accuracy, confidences
    over the whole range. Used by the streaming tests and bench/."""
    import torch

    from pgkd.data import stratified_split
    from pgkd.student import Student

    torch.manual_seed(seed)
    data = banking("train")
    _, sample = stratified_split(data, rows / len(data), seed=seed)
    student = Student.from_pretrained(None, data.classes(), max_length=max_length, device="cpu")
    index = {label: i for i, label in enumerate(student.labels)}
    student.model.eval()
    with torch.inference_mode():
        features = torch.cat([student.model.base_model(**student.encode(sample.texts[i : i + 64])).pooler_output
                              for i in range(0, len(sample), 64)])
    features = features.clone()  # a normal tensor: inference-mode tensors cannot be saved for backward
    targets = torch.tensor([index[label] for label in sample.labels])
    head = student.model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):  # full batch: rows x 384 features
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(features), targets).backward()
        opt.step()
    return student
