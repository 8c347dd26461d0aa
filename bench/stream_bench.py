"""The product end to end: texts.in -> classify worker -> labels.out on a real broker.

Starts its own Kafka and Redis (deploy/local, free loopback ports, data in a
temporary directory) unless --bootstrap/--redis are given, one classify worker
subprocess (streaming_support.StreamEnv: the same worker the integration tests
run), and the trained-head MiniLM of the tests. Everything it started is stopped
at the end, also on Ctrl-C.

1. sustained throughput: a backlog of --messages texts is produced as fast as
   possible; the rate is the labels.out records that arrive after the producer
   finished, over the time until the last one. Alternated --rounds times with
   the raw limit: Student.predict_proba in this process over the same texts
   (sorted by length all at once, which no stream can do), same weights, same
   torch threads and lanes (--lanes 2: two threads, each with half the texts),
   the best of a few batch sizes, while the worker idles.
2. latency at 25%, 50% and 90% of the sustained rate (median of the rounds): a
   paced producer (one send per 1/rate s, linger 0) for --seconds each; latency
   = the time a labels.out record reaches this process's consumer minus the
   input's produce timestamp (the output carries it as ``ts``). This process
   does not collect garbage while it times a rate (its own pauses would count
   as the product's latency).

    python bench/stream_bench.py                       # ~4 min on 2 busy cores
    python bench/stream_bench.py --messages 600 --rounds 1 --seconds 5 --no-docs   # a quick look

Writes bench/out/stream.json and its tables into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import (
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

from pgkd.student import Student

RAW_BATCHES = (8, 16, 32, 64)


async def paced(producer: AIOKafkaProducer, outputs: Outputs, worker, topic: str, prefix: str, texts: list[str],
                rate: float, seconds: float, timeout_s: float) -> dict:
    """Send at ``rate`` msg/s for ``seconds``; latency of every output in ms, and
    the worker's batches meanwhile (how many, how big, inference ms each)."""
    before = worker_counters(worker)
    n = max(20, int(rate * seconds))
    batch = messages(prefix, texts, n)
    # This process imported torch for the raw limit: one of its full garbage collections
    # stopped it for 226 ms, and the answers that arrived meanwhile were timed late
    # (2026-11-30). The instrument must not add its own pauses: no collection while timing.
    gc.collect()
    gc.disable()
    try:
        start = time.monotonic()
        for i, (key, value) in enumerate(batch):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(topic, key=key, value=value)
        sent_s = time.monotonic() - start
        ids = [k.decode() for k, _ in batch]
        await outputs.wait_for(ids, timeout_s)
    finally:
        gc.enable()
    lat = np.array([1000 * (outputs.seen[i][0] - outputs.seen[i][1]) for i in ids])
    # where the time went: input produced -> the worker sent the answer (Kafka timestamps of both), and
    # answer sent -> it arrived here
    in_worker = np.array([1000 * (outputs.sent[i] - outputs.seen[i][1]) for i in ids])
    delivery = lat - in_worker
    after = worker_counters(worker)
    texts_n, batches = (after[k] - before[k] for k in ("pgkd_batch_size_sum", "pgkd_batch_size_count"))
    inference_s = after["pgkd_inference_seconds_sum"] - before["pgkd_inference_seconds_sum"]
    return {"rate": rate, "achieved_rate": n / sent_s, "n": n, "batches": batches,
            "mean_batch": texts_n / max(batches, 1), "inference_ms_per_batch": 1000 * inference_s / max(batches, 1),
            "ms_between_batches": 1000 * sent_s / max(batches, 1),
            # full collections in the worker meanwhile: each stops every thread that needs the GIL
            "full_gcs": after['pgkd_gc_pause_seconds_count{generation="2"}'] - before['pgkd_gc_pause_seconds_count{generation="2"}'],
            "full_gc_ms": 1000 * (after['pgkd_gc_pause_seconds_sum{generation="2"}']
                                  - before['pgkd_gc_pause_seconds_sum{generation="2"}']),
            **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)}, "max": float(lat.max()),
            "in_worker": {f"p{q}": float(np.percentile(in_worker, q)) for q in (50, 99)},
            "delivery": {f"p{q}": float(np.percentile(delivery, q)) for q in (50, 99)}}


def start_py_spy(pid: int, out: str) -> subprocess.Popen:
    """Sampling only: py-spy reads the worker from outside and costs it ~nothing."""
    return subprocess.Popen(["py-spy", "record", "-p", str(pid), "-r", "50", "--threads", "--idle", "-f", "raw",
                             "-o", out], stdout=subprocess.DEVNULL)


def broker_pid() -> dict[str, int]:
    """The Kafka broker's pid when this script started it (deploy/local writes kafka.pid)."""
    for pidfile in Path(tempfile.gettempdir()).glob("pgkd-stream-bench-*/kafka/kafka.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            if Path(f"/proc/{pid}").exists():
                return {"kafka broker": pid}
    return {}


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """user + system CPU seconds of a process (or one of its threads) so far (/proc/PID[/task/TID]/stat)."""
    stat = Path(f"/proc/{pid}/task/{task}/stat") if task else Path(f"/proc/{pid}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The live child processes of ``pid``, their children, ... (/proc/PID/task/TID/children)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                out += [child, *descendants(child)]
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the worker's inference process, PGKD_INFERENCE_PROCESS)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def process_cpu(name: str, pid: int) -> float:
    """CPU seconds so far of one of the measured processes: the worker with its inference
    processes; this process without its children (the worker, and the broker it started)."""
    return tree_cpu_seconds(pid) if name == "worker" else cpu_seconds(pid)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process and of its live descendants, by thread id."""
    out = {}
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    out[int(task.name)] = cpu_seconds(p, task=int(task.name))
    return out


def worker_counters(worker) -> dict[str, float]:
    m = worker.metrics()
    keys = ("pgkd_batch_size_sum", "pgkd_batch_size_count", "pgkd_inference_seconds_sum",
            'pgkd_gc_pause_seconds_count{generation="2"}', 'pgkd_gc_pause_seconds_sum{generation="2"}')
    return {k: m.get(k, 0.0) for k in keys}


def raw_limit(student: Student, texts: list[str], lanes: int = 1) -> dict:
    """predict_proba texts/s at each of RAW_BATCHES; the best is the limit. With
    ``lanes`` > 1, as many threads each classify their share of the texts at once
    (the worker's PGKD_INFERENCE_LANES)."""
    rates, per_cpu = {}, {}
    shares = [texts[i::lanes] for i in range(lanes)]
    with ThreadPoolExecutor(lanes) as pool:
        for bs in RAW_BATCHES:
            started, cpu = time.perf_counter(), time.process_time()  # the event loop is blocked: all CPU is inference
            if lanes == 1:
                student.predict_proba(texts, bs)
            else:
                list(pool.map(lambda share, bs=bs: student.predict_proba(share, bs), shares))
            rates[bs] = len(texts) / (time.perf_counter() - started)
            per_cpu[bs] = len(texts) / (time.process_time() - cpu)
    best = max(rates, key=rates.get)
    return {"texts_s": rates[best], "batch": best, "texts_per_cpu_s": per_cpu[best], "by_batch": rates}


async def run(args, bootstrap: str, redis_url: str, workdir: Path) -> dict:
    model_dir = Path(args.model) if args.model else probe_model_dir()
    texts = list(banking("test").texts)
    settings = settings_from_args(args)
    run_id = uuid.uuid4().hex[:8]
    env = StreamEnv.make(bootstrap, redis_url, lambda stem: f"{stem}-bench-{run_id}", workdir, model_dir, **settings)
    topic = env.topics["texts_in"]
    torch.set_num_threads(args.threads)
    student = Student.load(model_dir, device="cpu").optimize_for_inference(args.quantize, args.graph)
    # the same texts as a sustained round (messages() cycles through texts), unless --raw-texts says otherwise
    raw_texts = [texts[i % len(texts)] for i in range(args.raw_texts or args.messages)]
    student.predict_proba(raw_texts[:64], 32)  # warm-up

    worker = env.start("classify")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    outputs = Outputs(bootstrap, env.topics["labels_out"])
    try:
        await asyncio.get_running_loop().run_in_executor(None, worker.wait_ready, 300)
        await producer.start()
        await outputs.start()
        print("worker ready; warming up", flush=True)
        await backlog(producer, outputs, topic, "warm", texts, 200, timeout_s=120)

        raws, streams = [], []
        spy = start_py_spy(worker.proc.pid, args.profile) if args.profile else None
        pids = {"worker": worker.proc.pid, "this process": os.getpid(), **broker_pid()}
        for r in range(args.rounds):
            raws.append(raw_limit(student, raw_texts, args.lanes))
            before, cpu = worker_counters(worker), {k: process_cpu(k, p) for k, p in pids.items()}
            threads_before = thread_cpu_seconds(worker.proc.pid)
            started = time.monotonic()
            streams.append(await backlog(producer, outputs, topic, f"s{r}", texts, args.messages, timeout_s=600))
            wall = time.monotonic() - started
            after = worker_counters(worker)
            n, batches = (after[k] - before[k] for k in ("pgkd_batch_size_sum", "pgkd_batch_size_count"))
            streams[-1] |= {
                "mean_batch": n / batches if batches else 0.0,
                # texts per second of inference time inside the worker: its model speed while busy
                "worker_inference_texts_s": n / (after["pgkd_inference_seconds_sum"] - before["pgkd_inference_seconds_sum"]),
                "cores_used": {k: (process_cpu(k, p) - cpu[k]) / wall for k, p in pids.items()},
                "full_gcs": after['pgkd_gc_pause_seconds_count{generation="2"}']
                - before['pgkd_gc_pause_seconds_count{generation="2"}'],
                "full_gc_ms": 1000 * (after['pgkd_gc_pause_seconds_sum{generation="2"}']
                                      - before['pgkd_gc_pause_seconds_sum{generation="2"}']),
            }
            spent = sorted((cpu_s - threads_before.get(tid, 0.0) for tid, cpu_s in
                            thread_cpu_seconds(worker.proc.pid).items()), reverse=True)
            streams[-1]["worker_thread_cpu_shares"] = [x / max(sum(spent), 1e-9) for x in spent[:4]]  # busiest first
            # texts per CPU second of the worker: its efficiency, whatever share of the cores it was given
            streams[-1]["texts_per_worker_cpu_s"] = args.messages / (streams[-1]["cores_used"]["worker"] * wall)
            x = streams[-1]
            print(f"  round {r + 1}/{args.rounds}: raw {raws[-1]['texts_s']:.0f}/s (batch {raws[-1]['batch']}), "
                  f"stream {x['texts_s']:.0f}/s, mean batch {x['mean_batch']:.1f}, worker inference "
                  f"{x['worker_inference_texts_s']:.0f}/s, cores {json.dumps(x['cores_used'])}, full GCs "
                  f"{x['full_gcs']:.0f} ({x['full_gc_ms']:.0f} ms)", flush=True)
        raws.append(raw_limit(student, raw_texts, args.lanes))  # raw brackets every stream round
        raw_s = summary([x["texts_s"] for x in raws])
        stream_s = summary([x["texts_s"] for x in streams])
        pairs = [s["texts_s"] / ((a["texts_s"] + b["texts_s"]) / 2) for s, a, b in zip(streams, raws, raws[1:])]

        latency = {}
        for fraction in args.fractions:
            rate = fraction * stream_s["median"]
            latency[f"{fraction:.0%}"] = res = await paced(producer, outputs, worker, topic, f"l{fraction}", texts, rate,
                                                           args.seconds, timeout_s=300)
            print(f"  {fraction:.0%} ({rate:.0f}/s): p50 {res['p50']:.0f} ms, p95 {res['p95']:.0f}, "
                  f"p99 {res['p99']:.0f}, max {res['max']:.0f}; batches of {res['mean_batch']:.1f} every "
                  f"{res['ms_between_batches']:.0f} ms, inference {res['inference_ms_per_batch']:.0f} ms", flush=True)
        metrics = worker.metrics()
        if spy:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
    finally:
        await outputs.stop()
        await producer.stop()
        env.stop_all()
    dlq = sum(v for k, v in metrics.items() if k.startswith("pgkd_dlq_total"))
    gc_pauses = {g: {"count": metrics.get(f'pgkd_gc_pause_seconds_count{{generation="{g}"}}', 0.0),
                     "seconds": metrics.get(f'pgkd_gc_pause_seconds_sum{{generation="{g}"}}', 0.0)} for g in "012"}
    raw_cpu = summary([x["texts_per_cpu_s"] for x in raws])
    stream_cpu = summary([x["texts_per_worker_cpu_s"] for x in streams])
    return {"settings": settings, "model": model_dir.name, "raw": raws, "stream": streams, "raw_summary": raw_s,
            "stream_summary": stream_s, "ratio_of_medians": stream_s["median"] / raw_s["median"],
            "ratio_per_round": pairs, "raw_per_cpu_summary": raw_cpu, "stream_per_cpu_summary": stream_cpu,
            "ratio_per_cpu": stream_cpu["median"] / raw_cpu["median"], "latency_ms": latency, "dead_letters": dlq,
            "gc_pauses": gc_pauses}


def markdown(res: dict) -> str:
    a, s = res["args"], res["settings"]
    r = res["ratio_per_round"]
    cores = {k: summary([x["cores_used"][k] for x in res["stream"]])["median"] for k in res["stream"][0]["cores_used"]}
    lines = [
        machine_line(res, "the broker (JVM), the worker and this process share the two cores"),
        (f"One classify worker (`pgkd worker classify`), model {res['model']} (MiniLM-L6, trained head, max length "
         f"64), PGKD_INFERENCE_QUANTIZE={s['inference_quantize']}, "
         f"PGKD_INFERENCE_GRAPH={s.get('inference_graph', 'eager')}, PGKD_TORCH_THREADS={s['torch_threads']}, "
         f"PGKD_BATCH_SIZE={s['batch_size']}, PGKD_INFERENCE_BATCH_SIZE={s['inference_batch_size']}, "
         f"PGKD_INFERENCE_LANES={s.get('inference_lanes', 1)}, "
         f"PGKD_BATCH_WITHIN_S={s['batch_within_s']}, PGKD_GIL_SWITCH_INTERVAL_S={s.get('gil_switch_interval_s', 0)}, 4 partitions, acks=all, Kafka and Redis from deploy/local "
         "on loopback."),
        "",
        "| measure | texts/s, median (min-max) |",
        "|---|---|",
        (f"| raw limit: predict_proba in the bench process ({s.get('inference_lanes', 1)} lane(s)), best of batch "
         f"{', '.join(map(str, RAW_BATCHES))} "
         f"({a['raw_texts'] or a['messages']} texts, {'the same as a sustained round, ' if not a['raw_texts'] else ''}"
         f"sorted by length at once; {len(res['raw'])} runs bracketing the stream rounds) | {fmt(res['raw_summary'])} |"),
        (f"| sustained end to end: a backlog of {a['messages']} texts ({a['rounds']} rounds) | "
         f"{fmt(res['stream_summary'])} |"),
        (f"| the worker's own inference rate meanwhile (texts / seconds inside predict_proba) | "
         f"{fmt(summary([x['worker_inference_texts_s'] for x in res['stream']]))} |"),
        (f"| per CPU second: raw limit (texts / CPU s of the bench process) | {fmt(res['raw_per_cpu_summary'])} |"),
        (f"| per CPU second: sustained (texts / CPU s of the worker process, all its threads) | "
         f"{fmt(res['stream_per_cpu_summary'])} |"),
        "",
        (f"Sustained / raw limit: **{res['ratio_of_medians']:.2f}** of the medians (each round against the mean of "
         f"the raw runs around it: {min(r):.2f}-{max(r):.2f}). CPU cores used during the sustained rounds (median): "
         + ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
         + f". Per CPU second (the worker's efficiency, whatever share of the cores the neighbours left it): "
         f"**{res['ratio_per_cpu']:.2f}**. The worker's CPU by thread (busiest first, median of the rounds): "
         + ", ".join(f"{100 * summary([x['worker_thread_cpu_shares'][i] for x in res['stream']])['median']:.1f}%"
                     for i in range(min(len(x["worker_thread_cpu_shares"]) for x in res["stream"])))
         + " (by py-spy, the busiest is the inference thread and the next the event loop)."),
        "",
        (f"Latency at a paced rate ({a['seconds']:.0f} s each), from the input's produce timestamp to the output's "
         "arrival at a consumer, in ms; and what the worker did meanwhile:"),
        "",
        "| load | msg/s | messages | p50 | p95 | p99 | max | worker batches (mean size, ms apart, inference ms) "
        "| full GCs in the worker (n, ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in res["latency_ms"].items():
        gcs = f"{x['full_gcs']:.0f}, {x['full_gc_ms']:.0f}" if "full_gcs" in x else "-"
        lines.append(f"| {name} of sustained | {x['rate']:.0f} | {x['n']} | {x['p50']:.0f} | {x['p95']:.0f} | "
                     f"{x['p99']:.0f} | {x['max']:.0f} | {x['mean_batch']:.1f}, {x['ms_between_batches']:.0f}, "
                     f"{x['inference_ms_per_batch']:.0f} | {gcs} |")
    if all("in_worker" in x for x in res["latency_ms"].values()):
        lines += ["", ("Where the time went (ms): *to the worker's answer* is the input's produce timestamp to the "
                       "answer's Kafka timestamp (the consumer fetch, the take, the inference queue, inference); "
                       "*delivery* is the answer's Kafka timestamp to its arrival at the consumer here."), "",
                  "| load | to the answer p50 | p99 | delivery p50 | p99 |", "|---|---|---|---|---|"]
        for name, x in res["latency_ms"].items():
            lines.append(f"| {name} | {x['in_worker']['p50']:.0f} | {x['in_worker']['p99']:.0f} | "
                         f"{x['delivery']['p50']:.0f} | {x['delivery']['p99']:.0f} |")
    lines += ["", f"Dead letters during the run: {res['dead_letters']:.0f}."]
    if "gc_pauses" in res:
        lines[-1] += " The worker's garbage collections over the whole run (count, ms in total): " + ", ".join(
            f"generation {g} {x['count']:.0f}, {1000 * x['seconds']:.0f}" for g, x in res["gc_pauses"].items())
        lines[-1] += "."
    if all("full_gcs" in x for x in res["stream"]):
        lines[-1] += (" Full collections during the sustained rounds: " + ", ".join(
            f"{x['full_gcs']:.0f} ({x['full_gc_ms']:.0f} ms)" for x in res["stream"]) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=3000, help="backlog per sustained round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--raw-texts", type=int, default=0,
                   help="texts for the raw limit (default 0: the texts of a sustained round, --messages of them)")
    p.add_argument("--fractions", type=lambda v: [float(x) for x in v.split(",") if x], default=[0.25, 0.5, 0.9])
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each paced rate")
    worker_args(p, "torch threads of the worker and of the raw limit")
    p.add_argument("--profile", metavar="FILE", help="py-spy the worker from the first sustained round to the end (raw format)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy: pip install -e '.[bench]'")
    return run_with_services("stream", args, lambda *a: asyncio.run(run(*a)), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
