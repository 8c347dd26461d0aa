"""Hot swap under traffic: the gap in labels.out while a classifier changes model.

Starts its own Kafka and Redis (deploy/local, free loopback ports) unless
--bootstrap/--redis are given, a model registry (a model store in a temporary
directory + the pointer in Redis) holding versions of the same architecture:
A, the trained-head MiniLM of the streaming tests, and new versions, the same
model with its head perturbed (so their answers differ). One classify worker
(streaming_support.StreamEnv, ``pgkd worker classify``) serves A. A paced
producer sends texts at a fixed rate (half of what the worker sustains, found
by a backlog first); meanwhile a new version and a rollback to A are promoted
in turn, --promotions times, each after --quiet seconds, the way
``pgkd models promote`` does it (Registry.promote, then the announcement on
model.updates), on a thread of its own at the CPU priority that command gives
itself (``pgkd.priority.ADMIN_NICE``). A new version is loaded; a rollback finds
A kept in memory (PGKD_KEEP_PREVIOUS_MODEL).

Measured, over the paced traffic only:

- the gaps between consecutive student answers on labels.out, by the Kafka
  timestamp of each answer (when the worker sent it) and by its arrival at a
  consumer here;
- per promotion, the window from the promote call to the first answer that
  carries the new version plus --margin seconds; the longest gap that overlaps
  the window, against the normal gap: median, p99 and max of the gaps wholly
  outside every window; and, as a control, the longest gap in windows of the
  same lengths 5 s before each promotion, when nothing is swapped;
- the longest gap in the traffic itself in each window (the inputs' produce
  timestamps, which the answers carry): a pause of the traffic generator would
  show as a gap in the answers too;
- zero lost (every produced id answered by the student) and zero duplicated
  (each id answered once);
- the swap's own time (load, verify, quantize, trace and warm up a new version,
  or take the one kept in memory: the worker's "swapped ... in N s" log line) and the worker's inference time per
  batch inside the windows vs outside (its /metrics);
- where the CPU went (:class:`CpuSampler`, every 0.1 s): the machine's busy cores
  and the time some task waited for one (PSI), and the worker's event loop,
  inference thread and other threads, each running and waiting on a run queue,
  in the quiet traffic, the windows and the loads.

    python bench/hotswap_bench.py                  # ~3 min on 2 busy cores
    python bench/hotswap_bench.py --promotions 2 --quiet 5 --no-docs   # a quick look

Writes bench/out/hotswap.json and its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import (
    OUT,
    Outputs,
    backlog,
    banking,
    fmt,
    machine_line,
    messages,
    probe_model_dir,
    run_with_services,
    settings_from_args,
    summary,
    worker_args,
)
from aiokafka import AIOKafkaProducer
from streaming_support import StreamEnv

from pgkd.priority import ADMIN_NICE, lower_thread_priority
from pgkd.registry import Registry
from pgkd.serving import graphs_to_publish
from pgkd.settings import Settings
from streams.announce import aannounce_model_update

SWAPPED = re.compile(r"swapped (v\d+) -> (v\d+) \((loaded and warmed|kept in memory) in ([\d.]+)s\)")
STAMPED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\].*?(loading v\d+|swapped v\d+ -> v\d+)", re.MULTILINE)


def log_events(log: str) -> list[tuple[float, str]]:
    """(epoch seconds, "loading vX" / "swapped vX -> vY") from the worker's log (local time, ms)."""
    return [(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000, m.group(3))
            for m in STAMPED.finditer(log)]


def publish_versions(registry: Registry, model_dir: Path, noise: float, new: int,
                     graphs: tuple[str, ...] = ()) -> list[str]:
    """Version A = the model as it is, then ``new`` versions: A with Gaussian noise
    of ``noise`` x the head's weight std added to its head, one seed each (same
    architecture, other answers); each with the ONNX graphs ``graphs``, as the
    trainer stores them."""
    import torch

    from pgkd.student import Student

    student = Student.load(model_dir, device="cpu")
    versions = [registry.publish(student, parent=None, round=0, data={}, metrics={}, settings={"bench": "hotswap A"},
                                 graphs=graphs)]
    head = student.model.classifier
    weight = head.weight.detach().clone()
    for seed in range(new):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(weight + noise * weight.std() * torch.randn(weight.shape, generator=generator))
        versions.append(registry.publish(student, parent=versions[0], round=seed + 1, data={}, metrics={},
                                         settings={"bench": f"hotswap new {seed}"}, graphs=graphs))
    return versions


class CpuSampler:
    """Where the CPU went, sampled every ``period`` s on a thread of its own: the
    machine's busy and stolen time (/proc/stat), how long some task waited for a
    CPU (/proc/pressure/cpu), and for each thread of the worker its time running
    and waiting on a run queue (/proc/PID/task/TID/schedstat). Linux only; an
    unreadable source is left out. :meth:`between` integrates any span."""

    def __init__(self, pid: int, period: float = 0.1):
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self.sample())

    def sample(self) -> dict:
        out = {"t": time.time()}
        with contextlib.suppress(OSError, ValueError):
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            hz = os.sysconf("SC_CLK_TCK")
            out["busy_s"] = (sum(ticks) - ticks[3] - ticks[4] - ticks[7]) / hz  # all but idle, iowait, steal
            out["steal_s"] = ticks[7] / hz
        with contextlib.suppress(OSError, ValueError, IndexError):
            some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
            out["cpu_wait_s"] = int(some.rsplit("total=", 1)[1]) / 1e6  # some task waited for a CPU
        threads = {}
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                run_ns, wait_ns, _ = (int(x) for x in (task / "schedstat").read_text().split())
                threads[int(task.name)] = (run_ns / 1e9, wait_ns / 1e9)
        out["threads"] = threads
        return out

    def between(self, t0: float, t1: float) -> dict:
        """Per second of [t0, t1] (the samples nearest its ends): cores busy and
        stolen, seconds some task waited for a CPU, and per worker thread its
        running and run-queue seconds."""
        inside = [s for s in self.samples if t0 <= s["t"] <= t1]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        span = b["t"] - a["t"]
        rate = {k: (b[k] - a[k]) / span for k in ("busy_s", "steal_s", "cpu_wait_s") if k in a and k in b}
        rate["threads"] = {tid: ((run - a["threads"][tid][0]) / span, (wait - a["threads"][tid][1]) / span)
                           for tid, (run, wait) in b["threads"].items() if tid in a["threads"]}
        return rate


def cpu_accounting(sampler: CpuSampler, promotions: list[dict], start: float, margin: float) -> dict:
    """Where the CPU went (:class:`CpuSampler`, per second) in each promotion's
    window, in the worker's load inside it (its "loading" to "swapped" log lines),
    and in the quiet traffic between windows; the worker's threads as its event
    loop (the main thread), its inference thread (the busiest other thread while
    quiet) and the rest (the model load thread, the metrics server, ...)."""
    windows = [(p["t0"], p["t0"] + p["first_answer_stamp_s"] + margin) for p in promotions]
    quiet_spans = [(a + 1.0, b - 1.0) for a, b in zip([start] + [w1 for _, w1 in windows], [w0 for w0, _ in windows])]
    quiet = [sampler.between(*span) for span in quiet_spans]
    pid = sampler.pid
    busiest = Counter()
    for q in quiet:
        for tid, (run, _) in q.get("threads", {}).items():
            if tid != pid:
                busiest[tid] += run
    inference = busiest.most_common(1)[0][0] if busiest else None

    def named(rate: dict) -> dict:
        if not rate:
            return {}
        threads = rate["threads"]
        rest = [v for tid, v in threads.items() if tid not in (pid, inference)]
        return {k: v for k, v in rate.items() if k != "threads"} | {"event_loop": threads.get(pid), "inference": threads.get(inference),
                       "other_threads": (sum(r for r, _ in rest), sum(w for _, w in rest))}

    loads = []
    for p in promotions:
        log_s = p.get("worker_log_s", {})
        loads.append(named(sampler.between(p["t0"] + log_s["loading"], p["t0"] + log_s["swapped"]))
                     if "loading" in log_s and "swapped" in log_s else {})
    return {"per_second": "cores (busy_s, steal_s), seconds some task waited for a CPU (cpu_wait_s), "
                          "threads: (running s, run-queue s) per second",
            "windows": [named(sampler.between(*w)) for w in windows], "loads": loads,
            "quiet": [named(q) for q in quiet]}


def inference_counters(worker) -> tuple[float, float]:
    """(seconds inside predict_proba, batches) so far, from the worker's /metrics."""
    m = worker.metrics()
    return m.get("pgkd_inference_seconds_sum", 0.0), m.get("pgkd_batch_size_count", 0.0)


async def paced_producer(producer: AIOKafkaProducer, topic: str, batch: list[tuple[bytes, bytes]], rate: float,
                         stop: asyncio.Event) -> int:
    """Send one message every 1/rate s until ``stop`` is set (or the batch is used up)."""
    start = time.monotonic()
    for i, (key, value) in enumerate(batch):
        if stop.is_set():
            return i
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.send(topic, key=key, value=value)
    return len(batch)


async def first_answer_of(outputs: Outputs, version: str, after: float, timeout_s: float) -> tuple[float, float]:
    """(Kafka timestamp, arrival) of the first answer by ``version`` stamped after ``after``."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        records = outputs.records
        for arrived, stamp, out in records[seen:]:
            if out["model_version"] == version and stamp >= after:
                return stamp, arrived
        seen = len(records)
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no answer from {version} within {timeout_s}s of its promotion")


def promote_and_announce(registry: Registry, settings: Settings, version: str) -> dict:
    """What `pgkd models promote VERSION` runs, on the calling thread: verify and move
    the pointer, then announce on model.updates (its own event loop, as the CLI's)."""
    entry = registry.promote(version, reason="bench: hot swap")
    asyncio.run(aannounce_model_update(settings, entry))
    return entry


CONTROL_SHIFT_S = 5.0  # control windows: each promotion window this much earlier (--quiet must exceed it)


def gaps(times: list[float], windows: list[tuple[float, float]]) -> dict:
    """Gaps between consecutive times (sorted), split into those that overlap a
    window (per window: the longest) and those wholly outside every window."""
    t = np.sort(np.asarray(times))
    d = np.diff(t)
    starts, ends = t[:-1], t[1:]
    inside = np.zeros(len(d), dtype=bool)
    longest, at = [], []
    for w0, w1 in windows:
        hit = (ends > w0) & (starts < w1)
        inside |= hit
        longest.append(float(d[hit].max()) if hit.any() else float("nan"))
        at.append(float(starts[hit][d[hit].argmax()] - w0) if hit.any() else float("nan"))
    outside = d[~inside]
    # control: the same windows moved 5 s earlier, into the quiet traffic before each promotion; their
    # longest gap is what a window of that length shows when nothing is swapped
    control = []
    for w0, w1 in windows:
        hit = (ends > w0 - CONTROL_SHIFT_S) & (starts < w1 - CONTROL_SHIFT_S)
        control.append(float(d[hit].max()) if hit.any() else float("nan"))
    return {"longest_starts_after_s": at, "n_outside": len(outside), "median_outside": float(np.median(outside)),
            "p99_outside": float(np.percentile(outside, 99)), "max_outside": float(outside.max()),
            "longest_in_window": longest, "longest_in_control": control}


async def run(args, bootstrap: str, redis_url: str, workdir: Path) -> dict:
    model_dir = Path(args.model) if args.model else probe_model_dir()
    texts = list(banking("test").texts)
    settings = settings_from_args(args)
    run_id = uuid.uuid4().hex[:8]
    env = StreamEnv.make(bootstrap, redis_url, lambda stem: f"{stem}-hotswap-{run_id}", workdir, model_dir,
                         model_store=workdir / "models", model_poll_s=0, **settings)
    worker_settings = Settings(**{k.removeprefix("PGKD_").lower(): v for k, v in env.env.items()})
    registry = Registry(workdir / "models", redis_url, namespace=env.env["PGKD_APP_ID_PREFIX"])
    versions = publish_versions(registry, model_dir, args.noise, (args.promotions + 1) // 2,
                                graphs_to_publish(worker_settings))
    version_a = versions[0]
    registry.promote(version_a, reason="bench: start")
    topic = env.topics["texts_in"]

    worker = env.start("classify")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    outputs = Outputs(bootstrap, env.topics["labels_out"])
    loop = asyncio.get_running_loop()
    # the operator's command, at the priority `pgkd models promote` gives itself (ADMIN_NICE), on a
    # thread of its own: this process's event loop runs the traffic and must not wait for it
    operator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="operator",
                                  initializer=lower_thread_priority, initargs=(ADMIN_NICE,))
    sampler = None
    try:
        await loop.run_in_executor(None, worker.wait_ready, 300)
        sampler = CpuSampler(worker.proc.pid).start()
        await producer.start()
        await outputs.start()
        print("worker ready; warming up", flush=True)
        await backlog(producer, outputs, topic, "warm", texts, 200, timeout_s=120)
        sustained = None
        rate = args.rate
        if not rate:
            sustained = (await backlog(producer, outputs, topic, "cal", texts, args.calibrate, timeout_s=300))["texts_s"]
            rate = args.fraction * sustained
        print(f"paced traffic at {rate:.0f} msg/s (sustained {sustained and round(sustained)}/s)", flush=True)

        stop = asyncio.Event()
        batch = messages("h", texts, int(rate * (args.quiet * (args.promotions + 1) + 120 * args.promotions)))
        # This process holds torch and the versions it built: one of its full garbage collections
        # stopped the paced producer for 265 ms (2026-11-30), a gap in the traffic that showed as a
        # gap in the answers. No collection while the traffic runs (as in stream_bench.paced).
        gc.collect()
        gc.disable()
        sender = asyncio.create_task(paced_producer(producer, topic, batch, rate, stop))
        traffic_start = time.time()
        promotions, quiet_counters = [], []
        quiet_from = inference_counters(worker)
        await asyncio.sleep(args.quiet)
        for i in range(args.promotions):
            # a new version, then a rollback to A (the one it replaced), in turn
            kind, target = ("new", versions[1 + i // 2]) if i % 2 == 0 else ("rollback", version_a)
            before = inference_counters(worker)
            quiet_counters.append((before[0] - quiet_from[0], before[1] - quiet_from[1]))
            t0 = time.time()
            # what `pgkd models promote` does: verify + move the pointer, then announce
            await loop.run_in_executor(operator, promote_and_announce, registry, worker_settings, target)
            announced = time.time()
            stamp, arrived = await first_answer_of(outputs, target, t0, timeout_s=120)
            await asyncio.sleep(args.margin)
            after = inference_counters(worker)
            promotions.append({"version": target, "kind": kind, "t0": t0, "announced_s": announced - t0,
                               "first_answer_stamp_s": stamp - t0, "first_answer_arrival_s": arrived - t0,
                               "window_inference": (after[0] - before[0], after[1] - before[1])})
            print(f"  promotion {i + 1}/{args.promotions}: {target} ({kind}), first answer {stamp - t0:.2f}s after the "
                  "promote call", flush=True)
            quiet_from = inference_counters(worker)
            await asyncio.sleep(args.quiet)
        stop.set()
        sent = await sender
        end = inference_counters(worker)
        quiet_counters.append((end[0] - quiet_from[0], end[1] - quiet_from[1]))
        ids = [k.decode() for k, _ in batch[:sent]]
        await outputs.wait_for(ids, timeout_s=300)
        await asyncio.sleep(args.linger)  # duplicates would arrive now
        log = worker.tail(10**8)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "hotswap-worker.log").write_text(log)
        metrics = worker.metrics()
    finally:
        gc.enable()
        if sampler is not None:
            sampler.stop()
        await outputs.stop()
        await producer.stop()
        env.stop_all()
        registry.close()
        operator.shutdown(wait=False)

    paced = [(arrived, stamp, out) for arrived, stamp, out in outputs.records if out["id"].startswith("h-")]
    answers = Counter(out["id"] for _, _, out in paced)
    swaps = [{"from": m.group(1), "to": m.group(2), "how": m.group(3), "seconds": float(m.group(4))}
             for m in SWAPPED.finditer(log)]
    events = log_events(log)
    for p in promotions:  # when the worker started loading and swapped, relative to the promote call
        p["worker_log_s"] = {}
        for ts, what in events:
            if ts >= p["t0"] and (what.startswith("loading " + p["version"]) or what.endswith("-> " + p["version"])):
                p["worker_log_s"].setdefault(what.split()[0], round(ts - p["t0"], 3))
    windows_stamp = [(p["t0"], p["t0"] + p["first_answer_stamp_s"] + args.margin) for p in promotions]
    windows_arrival = [(p["t0"], p["t0"] + p["first_answer_arrival_s"] + args.margin) for p in promotions]
    by_stamp = gaps([stamp for _, stamp, _ in paced], windows_stamp)
    by_arrival = gaps([arrived for arrived, _, _ in paced], windows_arrival)
    # the traffic's own gaps: the inputs' produce timestamps (the answers carry them); a gap here is
    # the traffic generator pausing, which shows in the answers too, whatever the worker does
    by_input = gaps([out["ts"] for _, _, out in paced], windows_stamp)
    # a single worker answers batch after batch: no answer of the old version may follow one of the new
    stale = 0
    for i, p in enumerate(promotions):
        first_new = p["t0"] + p["first_answer_stamp_s"]
        until = promotions[i + 1]["t0"] if i + 1 < len(promotions) else float("inf")
        stale += sum(1 for _, stamp, out in paced if first_new < stamp < until and out["model_version"] != p["version"])

    cpu = cpu_accounting(sampler, promotions, traffic_start, args.margin)

    def ms(pair: tuple[float, float]) -> float:  # mean inference ms per batch
        return 1000 * pair[0] / max(pair[1], 1)

    return {
        "settings": settings, "model": model_dir.name, "versions": versions, "rate": rate,
        "sustained": sustained, "traffic_s": time.time() - traffic_start, "sent": sent,
        "answered": len(answers), "lost": sum(1 for i in ids if i not in answers),
        "duplicated": sum(1 for n in answers.values() if n > 1), "stale_after_swap": stale,
        "promotions": promotions, "swaps": swaps, "gaps_by_stamp": by_stamp, "gaps_by_arrival": by_arrival,
        "gaps_by_input": by_input,
        "inference_ms_per_batch": {"in_windows": [ms(p["window_inference"]) for p in promotions],
                                   "quiet": [ms(q) for q in quiet_counters]},
        "cpu": cpu,
        "dead_letters": sum(v for k, v in metrics.items() if k.startswith("pgkd_dlq_total")),
        "load_failures": sum(v for k, v in metrics.items() if k.startswith("pgkd_model_load_failures_total")),
    }


def markdown(res: dict) -> str:
    a, s = res["args"], res["settings"]
    st, ar = res["gaps_by_stamp"], res["gaps_by_arrival"]
    inp = res.get("gaps_by_input")
    rows = []
    for i, p in enumerate(res["promotions"]):
        swap = res["swaps"][i]["seconds"] if i < len(res["swaps"]) else float("nan")
        how = res["swaps"][i].get("how", "?") if i < len(res["swaps"]) else "?"
        rows.append(f"| {i + 1} | {p['version']} ({p.get('kind', 'new')}: {how}) | {1000 * p['announced_s']:.0f} | {swap:.1f} | "
                    f"{p['first_answer_stamp_s']:.2f} | {1000 * st['longest_in_window'][i]:.0f} | "
                    f"{1000 * ar['longest_in_window'][i]:.0f} | "
                    + (f"{1000 * inp['longest_in_window'][i]:.0f} | " if inp else "")
                    + f"{res['inference_ms_per_batch']['in_windows'][i]:.0f} |")
    worst_st, worst_ar = max(st["longest_in_window"]), max(ar["longest_in_window"])
    by_kind = {}
    for kind in ("new", "rollback"):
        idx = [i for i, p in enumerate(res["promotions"]) if p.get("kind", "new") == kind]
        if idx:
            by_kind[kind] = max(st["longest_in_window"][i] for i in idx)
    quiet_ms = summary(res["inference_ms_per_batch"]["quiet"])
    swap_s = summary([x["seconds"] for x in res["swaps"]]) if res["swaps"] else None
    sustained = f" (half of the {res['sustained']:.0f}/s the worker sustained on a backlog just before)" \
        if res["sustained"] else ""
    prepare = ("the session of the graph stored with the version" if s.get("inference_graph") == "onnxruntime"
               else f"{s['inference_quantize']}, {s.get('inference_graph', 'eager')}")
    stored = (f"; every version stored with its {s['inference_quantize']} ONNX graph, as the trainer stores it"
              if s.get("inference_graph") == "onnxruntime" else "")
    lines = [
        machine_line(res, "the broker (JVM), the worker and this process share the two cores"),
        (f"One classify worker (`pgkd worker classify`) following a registry (model store + pointer in Redis, "
         f"PGKD_MODEL_POLL_S=0: announcements only), PGKD_INFERENCE_QUANTIZE={s['inference_quantize']}, "
         f"PGKD_INFERENCE_GRAPH={s.get('inference_graph', 'eager')}, "
         f"PGKD_TORCH_THREADS={s['torch_threads']}, PGKD_BATCH_SIZE={s['batch_size']}, "
         f"PGKD_INFERENCE_BATCH_SIZE={s['inference_batch_size']}, "
         f"PGKD_INFERENCE_LANES={s.get('inference_lanes', 1)}, PGKD_BATCH_WITHIN_S={s['batch_within_s']}, PGKD_GIL_SWITCH_INTERVAL_S={s.get('gil_switch_interval_s', 0)}. "
         f"Version {res['versions'][0]} = {res['model']} (MiniLM-L6, trained head); "
         f"{', '.join(res['versions'][1:])} = the same with its head perturbed (noise {a['noise']} x the weights' "
         f"std, one seed each){stored}. {len(res['promotions'])} promotions, {a['quiet']:.0f} s apart: a new version, then a "
         f"rollback to {res['versions'][0]}, in turn, by Registry.promote + the model.updates "
         f"announcement (what `pgkd models promote` runs, on a thread at its nice +{ADMIN_NICE}). Paced traffic: {res['rate']:.0f} msg/s{sustained}, "
         f"{res['sent']} messages over {res['traffic_s']:.0f} s."),
        "",
        ("Per promotion: the announcement's time (promote call to the broker's ack), the worker's swap (checksums, "
         f"load, {prepare}, warm-up, on its load thread; or the previous version kept in memory), when the first "
         "answer of the new version was sent, the "
         f"longest gap between consecutive answers from the promote call to that answer + {a['margin']:.0f} s "
         "(by Kafka timestamp and by arrival here), the longest gap in the traffic itself over the same window "
         "(the inputs' produce timestamps: the traffic generator pausing, which no worker can answer through), "
         "and the worker's mean inference time per batch meanwhile:"),
        "",
        ("| # | to | announce ms | swap s | first new answer s | longest gap ms (Kafka ts) | longest gap ms "
         "(arrival) | " + ("longest input gap ms | " if inp else "") + "inference ms/batch |"),
        "|---|---|---|---|---|---|---|---|" + ("---|" if inp else ""),
        *rows,
        "",
        "| gaps between consecutive answers, ms | by Kafka timestamp | by arrival here |",
        "|---|---|---|",
        (f"| normal (outside the windows): median / p99 / max | {1000 * st['median_outside']:.1f} / "
         f"{1000 * st['p99_outside']:.0f} / {1000 * st['max_outside']:.0f} | {1000 * ar['median_outside']:.1f} / "
         f"{1000 * ar['p99_outside']:.0f} / {1000 * ar['max_outside']:.0f} |"),
        f"| longest inside a promotion window | {1000 * worst_st:.0f} | {1000 * worst_ar:.0f} |",
        (f"| **longest during / normal p99** | **{worst_st / st['p99_outside']:.2f}x** | "
         f"**{worst_ar / ar['p99_outside']:.2f}x** |"),
        (f"| longest during / normal max | {worst_st / st['max_outside']:.2f}x | "
         f"{worst_ar / ar['max_outside']:.2f}x |"),
        *(f"| {kind}: longest during / normal p99 (Kafka ts) | {x / st['p99_outside']:.2f}x | |"
          for kind, x in by_kind.items()),
        *([f"| control: the same windows {CONTROL_SHIFT_S:.0f} s earlier, no swap: longest gap per window, ms "
           f"(Kafka ts) | {', '.join(f'{1000 * x:.0f}' for x in st['longest_in_control'])} | |",
           f"| control: longest / normal p99 | {max(st['longest_in_control']) / st['p99_outside']:.2f}x | |",
           # the same statistic on the same number of gaps: what a promotion adds to a window's longest gap
           f"| longest during / longest in the control windows | {worst_st / max(st['longest_in_control']):.2f}x | |"]
          if "longest_in_control" in st else []),
        *([f"| traffic (inputs' produce timestamps): normal p99 / max, longest in a window | "
           f"{1000 * inp['p99_outside']:.0f} / {1000 * inp['max_outside']:.0f}, "
           f"{1000 * max(inp['longest_in_window']):.0f} | |"] if inp else []),
        *cpu_table(res.get("cpu"), res["promotions"]),
        "",
        (f"Answers: {res['sent']} sent, {res['answered']} answered by the student, **{res['lost']} lost, "
         f"{res['duplicated']} duplicated**; answers of the old version after the first of the new: "
         f"{res['stale_after_swap']}; dead letters {res['dead_letters']:.0f}, refused versions "
         f"{res['load_failures']:.0f}. Swap (checksums + load + {prepare} + warm-up, or the version kept in memory) "
         + (f"{fmt(swap_s, 1)} s" if swap_s else "not found in the log")
         + f"; inference per batch outside the windows {fmt(quiet_ms)} ms."),
    ]
    return "\n".join(lines)


def cpu_table(cpu: dict | None, promotions: list[dict]) -> list[str]:
    """Markdown rows: where the CPU went in the quiet traffic, in the windows of
    new versions and of rollbacks, and in the new versions' loads (medians of the
    per-second rates of :func:`cpu_accounting`)."""
    if not cpu:
        return []
    spans = {"quiet traffic": cpu["quiet"],
             "windows of new versions": [w for w, p in zip(cpu["windows"], promotions) if p["kind"] == "new"],
             "their loads (loading -> swapped)": [x for x, p in zip(cpu["loads"], promotions) if p["kind"] == "new"],
             "windows of rollbacks": [w for w, p in zip(cpu["windows"], promotions) if p["kind"] == "rollback"]}

    def med(rows: list[dict], key: str, i: int | None = None) -> str:
        values = [r[key] if i is None else r[key][i] for r in rows if r.get(key) is not None]
        return f"{float(np.median(values)):.2f}" if values else "-"

    lines = ["", "Where the CPU went, per second (medians; cores for the machine, seconds for the threads: running / "
                 "waiting for a CPU, from /proc schedstat):", "",
             "| span | machine busy | some task waiting (PSI) | event loop | inference thread | other worker threads |",
             "|---|---|---|---|---|---|"]
    for name, rows in spans.items():
        rows = [r for r in rows if r]
        if rows:
            lines.append(f"| {name} ({len(rows)}) | {med(rows, 'busy_s')} | {med(rows, 'cpu_wait_s')} | "
                         + " | ".join(f"{med(rows, k, 0)} / {med(rows, k, 1)}"
                                      for k in ("event_loop", "inference", "other_threads")) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--promotions", type=int, default=5)
    p.add_argument("--quiet", type=float, default=10.0, help="seconds of traffic before and after each promotion")
    p.add_argument("--margin", type=float, default=1.0, help="seconds after the first new answer still in the window")
    p.add_argument("--rate", type=float, help="msg/s (default: --fraction of the rate sustained on a backlog)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--calibrate", type=int, default=1500, help="backlog that measures the sustained rate")
    p.add_argument("--noise", type=float, default=0.5, help="the new versions' head perturbation")
    p.add_argument("--linger", type=float, default=3.0, help="seconds to wait for late duplicates")
    worker_args(p)
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    return run_with_services("hotswap", args, lambda *a: asyncio.run(run(*a)), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
