"""The event loop's CPU per record sent, by send path, on a real broker.

One Faust App (the workers' ``streams.app.build_app``) sends --records records
of a labels.out answer's size, in groups of --group (a classifier batch's
records), and waits for the broker's acknowledgements (acks=all) after each
group. The CPU time of this process per record, for each path, interleaved
--reps times (A B C A B C ...):

- ``Topic.send`` + a Task per record: Faust's topic API, each record a
  coroutine gathered into a Task (the workers until 2026-11-30);
- ``delivery.queue``: the App's producer (Faust's ``Producer.send``), each
  record queued in order, the acknowledgement futures gathered (the workers now);
- ``aiokafka``: the aiokafka producer under the App's, directly (the floor).

    python bench/send_bench.py                 # ~1 min: starts its own Kafka on a free loopback port
    python bench/send_bench.py --bootstrap 127.0.0.1:9092 --no-docs

Writes bench/out/send.json and its table into docs/BENCHMARKS.md. This process
runs the broker's client only; the broker (JVM) shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

from _common import machine_line, run_with_services

VALUE = json.dumps({
    "id": "x" * 12, "label": "card_arrival", "confidence": 0.91,
    "top_k": [["card_arrival", 0.91], ["card_linking", 0.05], ["lost_or_stolen_card", 0.01]],
    "model_version": "v0001", "source": "student", "needs_review": False, "ts": 1.7e9, "extra": {},
}).encode()
PATHS = ("Topic.send + a Task per record", "delivery.queue", "aiokafka")


async def measure(args, bootstrap: str) -> dict:
    from pgkd.settings import Settings
    from streams.app import build_app, declare_topics
    from streams.delivery import queue

    run_id = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap=bootstrap, app_id_prefix=f"send-bench-{run_id}",
                        topic_labels_out=f"labels-send-bench-{run_id}")
    app = build_app(settings, "send")
    topic = declare_topics(app, settings).labels_out
    await app.producer.start()
    await topic.maybe_declare()
    aiokafka = app.producer._ensure_producer()  # the aiokafka producer Faust's wraps
    name = topic.get_topic_name()

    async def topic_send(key: str) -> object:  # the workers' send() until 2026-11-30
        return await (await topic.send(key=key.encode("utf-8"), value=VALUE))

    async def group_topic(keys: list[str]) -> None:
        await asyncio.gather(*[topic_send(k) for k in keys])

    async def group_queue(keys: list[str]) -> None:
        await asyncio.gather(*[await queue(topic, k, VALUE) for k in keys])

    async def group_aiokafka(keys: list[str]) -> None:
        await asyncio.gather(*[await aiokafka.send(name, VALUE, key=k.encode("utf-8")) for k in keys])

    groups = dict(zip(PATHS, (group_topic, group_queue, group_aiokafka), strict=True))
    us: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        await group_queue([f"warm-{i}" for i in range(args.group)])
        for rep in range(args.reps):
            for path, send_group in groups.items():
                cpu = time.process_time()
                for start in range(0, args.records, args.group):
                    await send_group([f"{rep}-{start + i}" for i in range(args.group)])
                us[path].append(1e6 * (time.process_time() - cpu) / args.records)
    finally:
        await app.producer.stop()
    return {"us_per_record": us}


def markdown(res: dict) -> str:
    a = res["args"]
    rows = []
    base = res["us_per_record"][PATHS[0]]
    for path in PATHS:
        v = res["us_per_record"][path]
        ratios = [b / x for b, x in zip(base, v, strict=True)]
        rows.append(f"| {path} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | "
                    f"{statistics.median(ratios):.2f}x |")
    return "\n".join([
        machine_line(res, "the broker (JVM) and this process share the cores"),
        f"{a['records']} records of {len(VALUE)} bytes per path and repetition, in groups of {a['group']} "
        f"(each group's acknowledgements awaited, acks=all), {a['reps']} interleaved repetitions; CPU time of this "
        "process (the event loop and the producer's I/O) per record.",
        "",
        "| send path | CPU per record, us, median (min-max) | less CPU than Topic.send (per repetition, median) |",
        "|---|---|---|",
        *rows,
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=6400)
    p.add_argument("--group", type=int, default=64, help="records sent before their acknowledgements are awaited")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bootstrap", help="an existing Kafka (default: start one)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args()

    def run(args, bootstrap, redis_url, workdir: Path) -> dict:
        return asyncio.run(measure(args, bootstrap))

    return run_with_services("send", args, run, markdown, redis=False)


if __name__ == "__main__":
    raise SystemExit(main())
