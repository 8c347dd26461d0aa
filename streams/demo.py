"""``pgkd demo``: the whole continual-distillation loop on one machine.

    services   Kafka and Redis from settings when they answer, else local ones (deploy/local)
    data       a labelled file split as in the paper: seed train / gold validation / pool / test
    teacher    the simulator over the pool (an offline stand-in for an LLM), or --teacher-url
    seed       a weak first version: the encoder frozen, its head fitted on the seed set; promoted
    workers    classify, teacher, curator, trainer: subprocesses, each in its own process group
    producer   the pool's texts into texts.in at --rate, gold labels in an extra field
    progress   every --interval seconds: throughput, low-confidence rate, teacher calls and cost,
               rounds with gate decisions, the serving version, accuracy per version on the stream
    stop       after --rounds rounds (and --tail-s more seconds of traffic) or Ctrl-C: every process
               started here gets SIGTERM, then SIGKILL; services started here are stopped; a summary

Everything of one run lives under its own prefix (topics, consumer groups, Redis
keys) and under ``--out/<prefix>/`` (data splits, model store, worker logs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL = REPO_ROOT / "deploy" / "local"
DATASETS = REPO_ROOT.parent / "shared" / "datasets"
ROLES = ("classify", "teacher", "curator", "trainer")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pgkd demo`` on the ``pgkd`` parser."""
    p = subparsers.add_parser(
        "demo", help="the whole loop on this machine: services, simulator, workers, a producer, live progress",
        description="Run classify, teacher, curator and trainer workers against a replayed dataset until "
        "--rounds retrain rounds are done or Ctrl-C; clean up everything started. Settings (PGKD_*) are "
        "passed to the workers; the demo sets the topics, prefix and seed files of its own run.",
    )
    banking = DATASETS / "banking77"
    p.add_argument("--data", default=str(banking / "train.csv"), help="labelled CSV/JSONL (default: Banking77 train)")
    p.add_argument("--test", default=None, help="a separate test file (default: Banking77 test with the default "
                   "--data; else --n-test rows are carved from --data)")
    p.add_argument("--text-col", default=None, help="text column(s), comma-separated (default: text)")
    p.add_argument("--label-col", default=None, help="label column (default: category for Banking77, else label)")
    p.add_argument("--n-seed", type=int, default=500, help="labelled seed texts, 80%% train / 20%% gold validation")
    p.add_argument("--n-test", type=int, default=1000, help="test rows kept out of everything (never streamed)")
    p.add_argument("--rate", type=float, default=20.0, help="texts per second into texts.in")
    p.add_argument("--rounds", type=int, default=3, help="stop after this many retrain rounds (0 = until Ctrl-C)")
    p.add_argument("--tail-s", type=float, default=20.0, help="seconds of traffic after the last round")
    p.add_argument("--batch", type=int, default=200, help="teacher-labelled samples per retrain batch")
    p.add_argument("--generate", type=int, default=32, help="samples the teacher writes per batch")
    p.add_argument("--low-conf", type=float, default=0.5, help="student confidence below this goes to the teacher")
    p.add_argument("--teacher-url", default=None, help="an OpenAI-compatible endpoint instead of the simulator "
                   "(also PGKD_TEACHER_BASE_URL); the key comes from PGKD_TEACHER_API_KEY or OPENAI_API_KEY")
    p.add_argument("--teacher-model", default=None, help="model name at --teacher-url (also PGKD_TEACHER_MODEL)")
    p.add_argument("--label-noise", type=float, default=0.0, help="simulator: fraction of wrong teacher labels")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--out", default="runs/demo", help="where the run's data, models and logs go")
    p.add_argument("--prefix", default=None, help="topic/group/Redis prefix of this run (default: demo-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-setup", action="store_true", help="never run deploy/local/setup")
    p.add_argument("--keep-services", action="store_true", help="leave Kafka/Redis running if the demo started them")
    p.set_defaults(func=run_demo)


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class Procs:
    """Every process the demo started, each the leader of its own process group."""

    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM to every group, then SIGKILL to what is left after ``grace_s``."""
        for proc in self.procs:
            _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            _signal_group(proc.popen, signal.SIGKILL)  # the leader and anything it left behind
            if proc.alive():
                proc.popen.wait(timeout=10)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(text: str) -> None:
    print(text, flush=True)


# --- services -------------------------------------------------------------------------------


def _kafka_up(bootstrap: str) -> bool:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kafka_probe", LOCAL / "kafka_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        return probe.metadata_brokers(host, int(port)) > 0
    except (OSError, ValueError):
        return False


def _redis_up(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


@dataclass
class Services:
    """Kafka and Redis: the ones in settings when they answer, else local ones started here."""

    started: list[tuple[str, list[str]]] = field(default_factory=list)  # (script, args) to stop

    def ensure(self, settings, allow_setup: bool) -> None:
        bootstrap = settings.kafka_bootstrap
        redis_url = settings.redis_url.get_secret_value()
        need = []
        if _kafka_up(bootstrap):
            say(f"kafka: using {bootstrap}")
        else:
            need.append("kafka")
        if _redis_up(redis_url):
            say("redis: using the one in PGKD_REDIS_URL")
        else:
            need.append("redis")
        if not need:
            return
        if allow_setup and not self._installed(need):
            say("installing what is missing (deploy/local/setup) ...")
            subprocess.run([str(LOCAL / "setup")], cwd=REPO_ROOT, check=True)
        if "kafka" in need:
            host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
            if not _local(host):
                raise SystemExit(f"pgkd demo: Kafka at {bootstrap} does not answer (and is not local to start it)")
            # the data dir of `make services-up` on the default port, one of its own on another
            data_dir = REPO_ROOT / ".local" / ("kafka" if port == "9092" else f"kafka-{port}")
            args = ["--port", port, "--data-dir", str(data_dir)]
            self._start("kafka", args)
        if "redis" in need:
            parts = urlsplit(redis_url)
            if not _local(parts.hostname or ""):
                raise SystemExit("pgkd demo: Redis in PGKD_REDIS_URL does not answer (and is not local to start it)")
            port = parts.port or 6379
            data_dir = REPO_ROOT / ".local" / ("redis" if port == 6379 else f"redis-{port}")
            args = ["--port", str(port), "--data-dir", str(data_dir)]
            self._start("redis", args)

    @staticmethod
    def _installed(need: list[str]) -> bool:
        if "redis" in need and not shutil.which("redis-server"):
            return False
        if "kafka" in need:
            jars = list((LOCAL / ".cache" / "kafka-libs").glob("kafka_2.13-*.jar"))
            return bool(shutil.which("java")) and bool(jars)
        return True

    def _start(self, script: str, args: list[str]) -> None:
        say(f"{script}: starting a local one (deploy/local/{script} start {' '.join(args)})")
        done = subprocess.run([str(LOCAL / script), "start", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pgkd demo: deploy/local/{script} could not start:\n{done.stdout}{done.stderr}")
        self.started.append((script, args))

    def stop(self) -> None:
        for script, args in reversed(self.started):
            say(f"{script}: stopping the local one this demo started")
            subprocess.run([str(LOCAL / script), "stop", *args], cwd=REPO_ROOT, capture_output=True, text=True)


# --- data and the seed model ---------------------------------------------------------------


def prepare_data(args, run_dir: Path):
    """The paper's splits as CSV files (text,label) in ``run_dir``."""
    from pgkd.data import load_labelled, paper_splits, write_labelled

    default_data = Path(args.data) == DATASETS / "banking77" / "train.csv"
    text_cols = [c.strip() for c in (args.text_col or "text").split(",") if c.strip()]
    label_col = args.label_col or ("category" if default_data else "label")
    data = load_labelled(args.data, text_cols, label_col)
    test_path = args.test or (str(DATASETS / "banking77" / "test.csv") if default_data else None)
    test = load_labelled(test_path, text_cols, label_col, min_classes=1) if test_path else None
    splits = paper_splits(data, n_seed=args.n_seed, val_fraction=0.2, n_test=args.n_test, seed=args.seed, test=test)
    files = {name: write_labelled(run_dir / f"{name}.csv", part)
             for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test),
                                ("pool", splits.pool))}
    say(f"data: {args.data}: {splits.sizes()} ({len(data.classes())} classes) -> {run_dir}")
    return splits, files


def seed_version(settings, splits, seed: int) -> tuple[str, dict]:
    """Fit the head of a fresh student on the seed set (encoder frozen: quick on a CPU),
    publish it as round 0 and make it current."""
    from pgkd.registry import Registry
    from pgkd.retrain import score
    from pgkd.serving import graphs_to_publish
    from pgkd.student import Student
    from pgkd.training import TrainConfig, train_head

    started = time.perf_counter()
    student = Student.from_pretrained(settings.student_model or None, splits.train.classes(),
                                      max_length=settings.max_length, seed=seed)
    cfg = TrainConfig(epochs=60, batch_size=32, lr=2e-2, patience=10, seed=seed, progress=False)
    fit = train_head(student, splits.train, splits.val, cfg)
    report, _ = score(student, splits.val)
    with Registry.from_settings(settings) as registry:
        version = registry.publish(student, parent=None, round=0,
                                   data={"train": len(splits.train), "val": len(splits.val)}, metrics=report,
                                   settings={"mode": "head", "train": cfg.__dict__, "device": fit.device},
                                   graphs=graphs_to_publish(settings))
        registry.promote(version, reason="demo: the seed model", round=0)
    say(f"seed model {version}: head fitted on {len(splits.train)} texts in {time.perf_counter() - started:.0f}s, "
        f"validation accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    return version, report


# --- the run --------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the demo has seen on labels.out, and what it produced."""

    produced: int = 0
    student: int = 0
    teacher: int = 0
    low_conf: int = 0
    correct: Counter = field(default_factory=Counter)  # version -> student answers equal to gold
    answered: Counter = field(default_factory=Counter)  # version -> student answers with a gold label
    first_seen: dict = field(default_factory=dict)  # version -> when its first answer arrived
    rate_window: list = field(default_factory=list)  # (time, student count)

    def accuracy(self) -> dict[str, tuple[float, int]]:
        return {v: (self.correct[v] / n, n) for v, n in self.answered.items() if n}


def run_demo(args: argparse.Namespace) -> int:
    from pgkd.settings import load_settings
    from streams.topics import FIELDS, ensure_topics

    base = load_settings()
    prefix = args.prefix or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.out).resolve() / prefix
    run_dir.mkdir(parents=True, exist_ok=True)
    services, procs = Services(), Procs()
    stop = asyncio.Event()
    summary: dict = {}
    try:
        services.ensure(base, allow_setup=not args.no_setup)
        splits, files = prepare_data(args, run_dir)
        teacher_url = args.teacher_url or os.environ.get("PGKD_TEACHER_BASE_URL")
        teacher_model = args.teacher_model or os.environ.get("PGKD_TEACHER_MODEL") or "teacher-sim"
        if teacher_url is None:
            port = _free_port()
            teacher_url = f"http://127.0.0.1:{port}/v1"
            sim_cmd = [sys.executable, "-m", "pgkd.cli", "teacher-sim", "--pool", str(files["pool"]), "--text-col",
                       "text", "--label-col", "label", "--port", str(port), "--model", teacher_model,
                       "--label-noise", str(args.label_noise), "--seed", str(args.seed)]
            procs.start("simulator", sim_cmd, dict(os.environ), run_dir / "logs" / "simulator.log")
            say(f"teacher: the SIMULATOR (a test double of an LLM) over {len(splits.pool)} pool texts at {teacher_url}")
        else:
            say(f"teacher: {teacher_model} at {teacher_url}")

        import torch

        cuda = torch.cuda.is_available()
        overrides = {
            "app_id_prefix": prefix, "model_store": run_dir / "models", "faust_datadir": run_dir / "faust",
            "seed_train": str(files["train"]), "seed_val": str(files["val"]), "seed_test": str(files["test"]),
            "seed_text_col": "text", "seed_label_col": "label",
            "teacher_base_url": teacher_url, "teacher_model": teacher_model, "low_conf_threshold": args.low_conf,
            "curator_batch_size": args.batch, "curator_generate": args.generate,
            "curator_batch_window_s": 0, "model_poll_s": 10,
            # head-only rounds on a CPU are cheap: more epochs; a full fine-tune on a GPU: few
            "trainer_epochs": 5 if cuda else 60, "trainer_patience": 2 if cuda else 10,
            "torch_threads": base.torch_threads or (0 if cuda else 1),
            **{f"topic_{name}": f"{prefix}.{name.replace('_', '.')}" for name in FIELDS},
        }
        env = {k: v for k, v in os.environ.items() if not (k.startswith("PGKD_") and k[5:].lower() in overrides)}
        env |= {f"PGKD_{k.upper()}": str(v) for k, v in overrides.items()} | {"OMP_NUM_THREADS": "1"}
        settings = load_settings(**overrides)

        asyncio.run(ensure_topics(settings))  # before anything sends: labels.out compacted
        version, _report = seed_version(settings, splits, args.seed)
        ports = {}
        for role in ROLES:
            ports[role] = _free_port()
            procs.start(role, [sys.executable, "-m", "pgkd.cli", "worker", role],
                        env | {"PGKD_METRICS_PORT": str(ports[role])}, run_dir / "logs" / f"{role}.log")
        say(f"workers: {', '.join(ROLES)} (logs in {run_dir / 'logs'}); trainer mode "
            f"{'full fine-tune (CUDA)' if cuda else 'head only (CPU)'}; producing {args.rate:g} texts/s; "
            f"Ctrl-C stops")
        summary = asyncio.run(_run(args, settings, splits, procs, ports, stop))
    except KeyboardInterrupt:
        say("\ninterrupted")
    finally:
        say("stopping every process the demo started ...")
        procs.stop_all()
        if not args.keep_services:
            services.stop()
    if summary:
        # Redis holds the rounds and the pointer: worth pointing at only while it still runs
        kept = args.keep_services or not services.started
        _print_summary(summary, run_dir, prefix, base.redis_url.get_secret_value() if kept else None)
    return 0 if summary.get("ok", False) else 1


async def _run(args, settings, splits, procs: Procs, ports: dict, stop: asyncio.Event) -> dict:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    progress = Progress()
    started = time.monotonic()
    tasks = [asyncio.create_task(_produce(settings, splits.pool, args.rate, progress, stop)),
             asyncio.create_task(_consume(settings, progress, stop))]
    from pgkd.registry import Registry

    registry = Registry.from_settings(settings)
    done_at: float | None = None
    why, ok = "interrupted", True
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.interval)
            except asyncio.TimeoutError:
                pass
            dead = [p for p in procs.procs if not p.alive()]
            if dead:
                why = f"the {dead[0].name} process exited ({dead[0].popen.returncode}); its log ends:\n{dead[0].tail()}"
                ok = False
                break
            rounds = await asyncio.to_thread(registry.rounds, 1000)
            current = await asyncio.to_thread(registry.current)
            spent = await asyncio.to_thread(_redis_float, settings, f"{settings.app_id_prefix}:teacher:spent_usd")
            calls = _scrape(ports["teacher"], "pgkd_teacher_calls_total")
            _print_progress(time.monotonic() - started, progress, rounds, current, spent, calls)
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()
            if args.rounds and len(rounds) >= args.rounds and done_at is None:
                done_at = time.monotonic()
                say(f"{args.rounds} round(s) done; {args.tail_s:g}s more traffic for the last version's numbers")
            if done_at is not None and time.monotonic() - done_at >= args.tail_s:
                why, ok = f"{len(rounds)} round(s) done (--rounds {args.rounds}, then {args.tail_s:g}s of traffic)", True
                break
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        rounds = registry.rounds(1000)
        current = registry.current()
        spent = _redis_float(settings, f"{settings.app_id_prefix}:teacher:spent_usd")
        calls = _scrape(ports["teacher"], "pgkd_teacher_calls_total")
        registry.close()
    return {"ok": ok, "why": why, "seconds": time.monotonic() - started, "progress": progress, "rounds": rounds,
            "current": current, "spent": spent, "calls": calls}


async def _produce(settings, pool, rate: float, progress: Progress, stop: asyncio.Event) -> None:
    """The pool's texts, shuffled, forever (new ids each pass), at ``rate`` per second."""
    import random

    from aiokafka import AIOKafkaProducer

    from streams.topics import kafka_kwargs

    order = list(range(len(pool)))
    random.Random(0).shuffle(order)
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=5)
    await producer.start()
    try:
        n, t0 = 0, time.monotonic()
        while not stop.is_set():
            i = order[n % len(order)]
            ident = f"d{n}"
            value = json.dumps({"id": ident, "text": pool.texts[i], "gold": pool.labels[i]}).encode()
            await producer.send(settings.topic_texts_in, key=ident.encode(), value=value)
            n += 1
            progress.produced = n
            ahead = n / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
        await producer.flush()
    finally:
        await producer.stop()


async def _consume(settings, progress: Progress, stop: asyncio.Event) -> None:
    """labels.out from the start: counts, low-confidence share, accuracy per version."""
    from aiokafka import AIOKafkaConsumer

    from streams.topics import kafka_kwargs

    consumer = AIOKafkaConsumer(settings.topic_labels_out, **kafka_kwargs(settings), group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    out = json.loads(r.value)
                    if out.get("source") == "teacher":
                        progress.teacher += 1
                        continue
                    progress.student += 1
                    progress.low_conf += bool(out.get("needs_review"))
                    version = out.get("model_version")
                    progress.first_seen.setdefault(version, time.time())
                    gold = (out.get("extra") or {}).get("gold")
                    if gold is not None:
                        progress.answered[version] += 1
                        progress.correct[version] += out.get("label") == gold
            now = time.monotonic()
            progress.rate_window.append((now, progress.student))
            while progress.rate_window and now - progress.rate_window[0][0] > 30:
                progress.rate_window.pop(0)
    finally:
        await consumer.stop()


def _redis_float(settings, key: str) -> float:
    import redis

    try:
        client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=2)
        try:
            return float(client.get(key) or 0.0)
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return 0.0


def _scrape(port: int, name: str) -> float:
    """Sum of a metric's samples on a worker's /metrics (0 when it does not answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in "{ "):
            total += float(line.rpartition(" ")[2])
    return total


def _rate(progress: Progress) -> float:
    window = progress.rate_window
    if len(window) < 2 or window[-1][0] == window[0][0]:
        return 0.0
    return (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])


def _round_text(r: dict) -> str:
    m = r.get("metrics") or {}
    f1 = ""
    if m.get("candidate"):
        f1 = f" macro-F1 {m['current']['macro_f1']:.3f} -> {m['candidate']['macro_f1']:.3f}"
    outcome = r["outcome"]
    if outcome == "promoted":
        return f"#{r['round']} promoted {r['candidate']}{f1}"
    if outcome == "rejected":
        return f"#{r['round']} rejected {r['candidate']}{f1} ({'; '.join((r.get('gate') or {}).get('reasons') or [])})"
    return f"#{r['round']} failed ({r.get('error')})"


def _accuracy_text(progress: Progress) -> str:
    acc = progress.accuracy()
    order = sorted(acc, key=lambda v: progress.first_seen.get(v, 0))
    return " | ".join(f"{v} {a * 100:.1f}% of {n}" for v, (a, n) in ((v, acc[v]) for v in order)) or "-"


def _print_progress(elapsed: float, progress: Progress, rounds: list[dict], current: str | None, spent: float,
                    calls: float) -> None:
    low = progress.low_conf / progress.student if progress.student else 0.0
    say(f"[{elapsed:5.0f}s] produced {progress.produced} | classified {progress.student} ({_rate(progress):.1f}/s) "
        f"| low-confidence {low * 100:.0f}% | teacher {progress.teacher} labels, {calls:.0f} calls, ${spent:.4f} "
        f"| serving {current}")
    if rounds:
        say(f"        rounds: {'  '.join(_round_text(r) for r in rounds[-4:])}")
    say(f"        accuracy on the stream (gold labels): {_accuracy_text(progress)}")


def _print_summary(summary: dict, run_dir: Path, prefix: str, redis_url: str | None) -> None:
    progress: Progress = summary["progress"]
    say("")
    say(f"=== pgkd demo: {summary['why']} after {summary['seconds']:.0f}s ===")
    say(f"texts produced {progress.produced}, classified {progress.student} (low confidence "
        f"{(progress.low_conf / progress.student * 100) if progress.student else 0:.0f}%), "
        f"teacher labels {progress.teacher}, teacher calls {summary['calls']:.0f}, spent ${summary['spent']:.4f}")
    by_outcome = defaultdict(int)
    for r in summary["rounds"]:
        by_outcome[r["outcome"]] += 1
        say(f"  round {_round_text(r)}")
    say(f"rounds: {len(summary['rounds'])} ({dict(by_outcome) or 'none'}); serving {summary['current']}")
    say(f"accuracy on the stream by version (student answers vs gold): {_accuracy_text(progress)}")
    say(f"run directory: {run_dir} (splits, models/, logs/)")
    if redis_url is not None:
        from pgkd.registry import redact_url

        say(f"inspect: PGKD_REDIS_URL={redact_url(redis_url)} PGKD_APP_ID_PREFIX={prefix} "
            f"PGKD_MODEL_STORE={run_dir / 'models'} pgkd models rounds")
