"""One retrain round on a CPU: its wall time and where it goes.

A round as the trainer worker runs it: ``RoundRunner.process`` (claim, ledger,
train, gate, publish, promote when the gate passes, record) against a real
registry (a model store in a temporary directory, pointer and ledger in a Redis
started here from deploy/local, unless --redis is given).

- current version: the trained-head MiniLM of the streaming tests (the default
  MiniLM-L6, head fitted on 1,000 train rows), published and promoted first;
- seed data (SeedData): the 1,000 Banking77 train rows that version was fitted
  on as the seed training set, and 200 other train rows as the gold validation
  set (never trained on);
- one batch of samples: --samples teacher-labelled texts (the gold label as the
  teacher's) from the remaining train rows, as the curator hands them over.

Head-only (the CPU default, PGKD_TRAINER_MODE=head) at each --threads, repeated
and interleaved. Each repetition is a trainer's first round (a new RoundRunner:
every text encoded) and then its next round on another batch of as many new
samples (the runner's FeatureCache holds the seed and validation sets'
encodings from the first). The full fine-tune (PGKD_TRAINER_MODE=full) with
--full-epochs (fewer than the trainer's default 10: a full epoch takes minutes
on 2 cores). Each round starts from the same current version. Phases are
timed by wrapping the functions the round calls, each phase without the
phases inside it:

    load         Registry.load of the current version (checksums + weights)
    featurise    head-only: the frozen encoder's outputs of the texts not in the cache
    fingerprint  head-only: the sha256 of the encoder that keys the cache (pgkd.features)
    train        the optimiser's epochs (head-only: on those features), early stopping included
    gate         pgkd.retrain.score of both versions on the validation set
    publish    Registry.publish (save, sha256 of every file, fsync, rename)
    promote    Registry.promote (checksums again, the pointer), when the gate passes
    other      the rest: the training set's assembly, claim, ledger, record

    python bench/retrain_bench.py                          # ~8 min on 2 busy cores
    python bench/retrain_bench.py --reps 1 --threads 1 --full-epochs 0 --no-docs   # head-only, one round
    python bench/retrain_bench.py --device cuda --threads 1  # on a GPU (full fine-tune at the default 10 epochs: --full-epochs 10)

Writes bench/out/retrain.json and its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
import torch
from _common import (
    banking,
    fmt,
    machine_line,
    probe_model_dir,
    run_with_services,
    summary,
)

import pgkd.features
import pgkd.retrain
import pgkd.training
from pgkd.curation import Sample
from pgkd.data import stratified_split
from pgkd.registry import Registry
from pgkd.retrain import RoundConfig, RoundLedger, RoundRunner, SeedData
from pgkd.settings import Settings
from pgkd.student import Student

PHASES = ("load", "featurise", "fingerprint", "train", "gate", "publish", "promote", "other")


@contextlib.contextmanager
def timed(owner: object, name: str, seconds: dict[str, float], phase: str, active: list[str]) -> Iterator[None]:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``seconds[phase]``
    and takes it from the phase it ran inside (``active``, the phases running now)."""
    original: Callable = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        active.append(phase)
        try:
            return original(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            active.pop()
            seconds[phase] += elapsed
            if active:
                seconds[active[-1]] -= elapsed

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        if isinstance(owner, Registry):
            delattr(owner, name)  # back to the class's method
        else:
            setattr(owner, name, original)


def data(val_rows: int, n_samples: int, probe_rows: int = 1000,
         seed: int = 0) -> tuple[SeedData, list[Sample], list[Sample]]:
    """Seed train = the Banking77 train rows the current version was fitted on
    (streaming_support.probe_student's stratified 1,000); gold validation and two
    batches of teacher samples (a first round's, a next round's) from the other
    train rows, all disjoint."""
    train = banking("train")
    rest, seed_train = stratified_split(train, probe_rows / len(train), seed=seed)  # = probe_student's rows
    rest, seed_val = stratified_split(rest, val_rows / len(rest), seed=seed)
    rest, first = stratified_split(rest, n_samples / len(rest), seed=seed)
    _, second = stratified_split(rest, n_samples / len(rest), seed=seed)
    now = time.time()

    def batch(picked, name: str) -> list[Sample]:
        return [Sample(id=f"bench-{name}-{i}", text=text, label=label, source="teacher", teacher_model="gold",
                       model_version="v0001", ts=now + i)
                for i, (text, label) in enumerate(zip(picked.texts, picked.labels, strict=True))]

    return SeedData(seed_train, seed_val), batch(first, "first"), batch(second, "next")


def one_round(runner: RoundRunner, registry: Registry, samples: list[Sample]) -> dict:
    """Run one request through RoundRunner.process; its phases, total and outcome."""
    seconds: dict[str, float] = defaultdict(float)
    active: list[str] = []
    request = {"request_id": uuid.uuid4().hex, "round": registry.next_round(), "trigger": "bench"}
    with contextlib.ExitStack() as stack:
        for owner, name, phase in ((registry, "load", "load"), (registry, "publish", "publish"),
                                   (registry, "promote", "promote"), (pgkd.features, "head_features", "featurise"),
                                   (pgkd.features, "encoder_fingerprint", "fingerprint"),
                                   (pgkd.training, "train_head", "train"), (pgkd.training, "train", "train"),
                                   (pgkd.retrain, "score", "gate")):
            stack.enter_context(timed(owner, name, seconds, phase, active))
        started, cpu = time.perf_counter(), time.process_time()
        result = runner.process(request, samples)
        total, cpu = time.perf_counter() - started, time.process_time() - cpu
    if result.record is None or result.record["outcome"] == "failed":
        raise SystemExit(f"the round did not run: {result.record}")
    phases = {phase: seconds[phase] for phase in PHASES[:-1]}
    phases["other"] = total - sum(phases.values())
    record = result.record
    return {"total": total, "cpu": cpu, "phases": phases, "outcome": record["outcome"],
            "candidate": record["candidate"], "macro_f1": record["metrics"]["candidate"]["macro_f1"],
            "current_macro_f1": record["metrics"]["current"]["macro_f1"], "epochs_run": record["train"]["epochs_run"],
            "train_texts": record["data"]["train"], "val_texts": record["data"]["val"]}


def reset(registry: Registry, base: str, candidate: str) -> None:
    """Serve ``base`` again and drop the candidate's files: the next round starts where this one did."""
    if registry.current() != base:
        registry.promote(base, reason="bench: next round starts from the same version")
    shutil.rmtree(registry.path(candidate), ignore_errors=True)


def run(args, _bootstrap: None, redis_url: str, workdir: Path) -> dict:
    seed, samples, next_samples = data(args.val_rows, args.samples)
    namespace = f"bench-retrain-{uuid.uuid4().hex[:8]}"
    registry = Registry(workdir / "models", redis_url, namespace=namespace)
    ledger = RoundLedger(redis.Redis.from_url(redis_url, decode_responses=True), namespace)
    base = registry.publish(Student.load(probe_model_dir(), device="cpu"), parent=None, round=0, data={},
                            metrics={}, settings={"bench": "retrain base"})
    registry.promote(base, reason="bench: the current version")

    def config(mode: str, epochs: int | None) -> RoundConfig:
        s = Settings(trainer_mode=mode, trainer_device=args.device, **({"trainer_epochs": epochs} if epochs else {}))
        return RoundConfig.from_settings(s)

    rounds: list[dict] = []
    plan = [("head", t, None) for _ in range(args.reps) for t in args.threads]
    plan += [("full", t, args.full_epochs) for _ in range(args.full_reps) for t in args.full_threads] \
        if args.full_epochs else []
    try:
        for mode, threads, epochs in plan:
            torch.set_num_threads(threads)
            cfg = config(mode, epochs)
            runner = RoundRunner(registry, ledger, seed, cfg)  # a trainer's first round: nothing cached
            batches = [("first", samples)] + ([("next", next_samples)] if runner.features is not None else [])
            for state, batch in batches:  # the next round: the same runner, a batch of new samples
                res = one_round(runner, registry, batch) | {"mode": mode, "threads": threads, "state": state,
                                                            "max_epochs": cfg.train.epochs, "lr": cfg.train.lr}
                rounds.append(res)
                print(f"  {mode} x{threads} threads, {state} round: {res['total']:.1f}s ("
                      + ", ".join(f"{k} {v:.1f}" for k, v in res["phases"].items()) + f"); {res['outcome']}, "
                      f"macro-F1 {res['macro_f1']:.4f} vs {res['current_macro_f1']:.4f}, {res['epochs_run']} epochs",
                      flush=True)
                reset(registry, base, res["candidate"])
    finally:
        registry.close()
    return {"rounds": rounds, "seed_train": len(seed.train), "val": len(seed.val), "samples": len(samples),
            "device": args.device}


def markdown(res: dict) -> str:
    a = res["args"]
    groups: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for r in res["rounds"]:
        groups[(r["mode"], r["threads"], r.get("state", "first"))].append(r)
    rows = []
    for (mode, threads, state), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "head", kv[0][2], kv[0][1])):
        phase_cells = " | ".join(fmt(summary([r["phases"].get(p, 0.0) for r in rs]), 1) for p in PHASES)
        outcomes = ", ".join(sorted({r["outcome"] for r in rs}))
        if mode == "head":
            name = "head only, a trainer's first round" if state == "first" else "head only, its next round"
        else:
            name = f"full fine-tune, {rs[0]['max_epochs']} epochs max"
        rows.append(f"| {name} | {threads} | {len(rs)} | **{fmt(summary([r['total'] for r in rs]), 1)}** | "
                    f"{fmt(summary([r['cpu'] for r in rs]), 1)} | {phase_cells} | "
                    f"{summary([r['epochs_run'] for r in rs])['median']:.0f} | "
                    f"{fmt(summary([r['macro_f1'] for r in rs]), 3)} ({outcomes}) |")
    current = res["rounds"][0]["current_macro_f1"]
    r0 = res["rounds"][0]
    lines = [
        machine_line(res),
        "",
        (f"One round through `RoundRunner.process` on device {res['device']}: current version = the trained-head "
         f"MiniLM-L6 (max length 64), training set = {res['seed_train']} seed texts (those it was fitted on) + "
         f"{res['samples']} teacher samples = {r0['train_texts']} texts, gold validation {res['val']} other texts "
         f"(Banking77 train rows, stratified), trainer settings as deployed (batch 64, patience 3, lr {r0['lr']:g} head-only); the "
         "registry on local disk and a Redis on loopback. Seconds, median (min-max) over the rounds; rounds "
         f"interleaved by thread count; each starts from the same current version (validation macro-F1 "
         f"{current:.3f}). Head only: each repetition is a new trainer's first round (every text encoded), then "
         f"its next round on {res['samples']} other new samples, whose seed and validation texts the trainer "
         "encoded in the first (`PGKD_TRAINER_FEATURE_CACHE_MB`, pgkd/features.py). Each phase is timed without "
         "the phases inside it."),
        "",
        ("| mode | torch threads | rounds | total s | CPU s (this process) | load | featurise | fingerprint | "
         "train | gate | publish | promote | other | epochs | candidate macro-F1 (gate) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        ("Not run on a GPU in this session (none was lent). On one: `python bench/retrain_bench.py --device cuda "
         "--threads 1 --full-epochs 10`."),
    ]
    if a["full_epochs"] and a["full_epochs"] < 10:
        lines[-1] += (f" The full fine-tune here ran at most {a['full_epochs']} epochs instead of the trainer's "
                      "default 10, to fit the 2 shared cores; its time per epoch is what scales.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="head-only rounds per thread count")
    p.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                   help="torch threads of the head-only rounds, comma-separated")
    p.add_argument("--full-epochs", type=int, default=2, help="max epochs of the full fine-tune (0: skip it)")
    p.add_argument("--full-reps", type=int, default=1)
    p.add_argument("--full-threads", type=lambda v: [int(x) for x in v.split(",")], default=[1])
    p.add_argument("--val-rows", type=int, default=200, help="gold validation rows")
    p.add_argument("--samples", type=int, default=256, help="teacher samples in the round's batch")
    p.add_argument("--device", default="cpu", help="PGKD_TRAINER_DEVICE")
    p.add_argument("--redis", help="an existing Redis URL (default: start one)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    return run_with_services("retrain", args, run, markdown, kafka=False)


if __name__ == "__main__":
    raise SystemExit(main())
