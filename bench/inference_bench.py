"""Inference throughput without Kafka: the model's limit, the peer, the naive loop.

Same model (the default MiniLM-L6 with a 77-class head, max length 64), same
Banking77 test texts, same process; contenders are interleaved (A B C A B C ...)
so that a neighbour's load hits all of them alike, and each is reported as the
median and range of its repetitions:

    student fp32 / int8   Student.predict_proba (length-bucketed batches), PGKD_INFERENCE_QUANTIZE
    int8, TorchScript     the same int8 model as one traced graph (PGKD_INFERENCE_GRAPH=torchscript)
    int8, ONNX Runtime    the fp32 model exported to ONNX, int8 by ONNX Runtime (PGKD_INFERENCE_GRAPH=onnxruntime)
    fp32 input order      the same batches without length bucketing (what bucketing buys)
    pipeline              transformers.pipeline("text-classification") with its best batch_size
    naive                 one tokenizer call and one forward per message

1. sweep: batch sizes 1..128 for student fp32, int8, int8 traced, int8 ONNX Runtime and the pipeline;
2. main: every contender at its best batch size (torch threads: the first of --threads);
   then student and pipeline at each torch thread count, on fewer texts;
3. accuracy: the trained-head model (streaming_support.probe_student) on the whole
   Banking77 test split, fp32 vs int8 (torch eager and traced, ONNX Runtime).

    python bench/inference_bench.py                      # ~10 min on 2 busy cores
    python bench/inference_bench.py --texts 128 --reps 2 --sweep-reps 1 --no-accuracy --no-docs   # a quick look

Writes bench/out/inference.json and its tables into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from _common import (
    OUT,
    banking,
    fmt,
    load,
    machine,
    machine_line,
    probe_model_dir,
    summary,
    write_section,
)

from pgkd.inference_opt import cpu_has_vnni
from pgkd.student import Student

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
TRACED = "student int8, TorchScript graph"  # PGKD_INFERENCE_GRAPH=torchscript
ORT = "student int8, ONNX Runtime"  # PGKD_INFERENCE_GRAPH=onnxruntime


def naive(student: Student, texts: list[str]) -> None:
    """One message at a time: tokenize, forward, softmax."""
    with torch.inference_mode():
        for text in texts:
            enc = student.tokenizer(text, truncation=True, max_length=student.max_length, return_tensors="pt")
            torch.softmax(student.model(**enc).logits, dim=-1).numpy()


def input_order(student: Student, texts: list[str], batch_size: int) -> None:
    """predict_proba's batches without sorting by length: each batch pads to its longest text."""
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            logits = student.model(**student.encode(texts[start : start + batch_size])).logits
            torch.softmax(logits, dim=-1).numpy()


def make_pipeline(student: Student):
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipeline("text-classification", model=student.model, tokenizer=student.tokenizer, device="cpu")


def timed(fn, texts: list[str]) -> float:
    started = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - started)


def interleave(contenders: dict, texts: dict[str, list[str]], reps: int, threads: list[int]) -> dict:
    """texts/s of each (contender, threads), repetitions interleaved; a warm-up call first."""
    runs: dict[tuple[str, int], list[float]] = {(name, t): [] for name in contenders for t in threads}
    for t in threads:
        torch.set_num_threads(t)
        for name, fn in contenders.items():
            fn(texts[name][:8])
    for rep in range(reps):
        for t in threads:
            torch.set_num_threads(t)
            for name, fn in contenders.items():
                runs[(name, t)].append(timed(fn, texts[name]))
        print(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n}@{t}={v[-1]:.0f}" for (n, t), v in runs.items()),
              flush=True)
    return runs


def accuracy(model_dir, threads: int) -> dict:
    """fp32 vs int8 on the whole Banking77 test split, with the trained-head model."""
    torch.set_num_threads(threads)
    test = banking("test")
    fp32 = Student.load(model_dir, device="cpu")
    int8 = fp32.clone().optimize_for_inference("int8")
    traced = fp32.clone().optimize_for_inference("int8", "torchscript")
    onnx = fp32.clone().optimize_for_inference("int8", "onnxruntime")
    out = {"model": str(model_dir.name), "n": len(test), "vnni": cpu_has_vnni()}
    preds = {}
    for name, student in (("fp32", fp32), ("int8", int8), ("int8_traced", traced), ("int8_onnxruntime", onnx)):
        preds[name] = student.predict(test.texts)
        out[name] = float(np.mean([p == g for p, g in zip(preds[name], test.labels, strict=True)]))
    out["delta_points"] = 100 * (out["int8"] - out["fp32"])
    out["label_agreement"] = float(np.mean([a == b for a, b in zip(preds["fp32"], preds["int8"], strict=True)]))
    out["traced_agreement"] = float(np.mean([a == b for a, b in zip(preds["int8"], preds["int8_traced"], strict=True)]))
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        machine_line(res),
        f"Model: default MiniLM-L6, 77-class head, max length 64. Texts: the first {a['texts']} Banking77 test texts "
        f"(naive: {a['naive_texts']}); {a['reps']} interleaved repetitions; texts/s as median (min-max).",
        "",
        f"**Batch-size sweep** ({a['sweep_texts']} texts, {a['sweep_reps']} reps, torch threads {a['threads'][0]}):",
        "",
        ("| batch | " + " | ".join(res["sweep"]) + " |"),
        ("|---|" + "---|" * len(res["sweep"])),
    ]
    for bs in a["batch_sizes"]:
        lines.append(f"| {bs} | " + " | ".join(fmt(res["sweep"][c][str(bs)]) for c in res["sweep"]) + " |")
    lines += ["", f"**Side by side** (each contender at its best batch size, torch threads {a['threads'][0]}):", "",
              "| contender | batch | texts/s |", "|---|---|---|"]
    for name, row in res["main"].items():
        lines.append(f"| {name} | {row['batch']} | {fmt(row['texts_s'])} |")
    lines += ["", "Ratios of the medians (and of each repetition's pair, min-max):", ""]
    for key, r in res["ratios"].items():
        lines.append(f"- {key}: **{r['of_medians']:.2f}x** (per repetition {r['min']:.2f}-{r['max']:.2f})")
    if res["threads"]:
        ts = a["threads"]
        lines += ["", f"**Torch threads** ({a['thread_texts']} texts, same batch sizes): texts/s", "",
                  ("| contender | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in ts) + " |"),
                  ("|---|" + "---|" * len(ts))]
        for name, row in res["threads"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(row[str(t)]) for t in ts) + " |")
    if "accuracy" in res:
        acc = res["accuracy"]
        lines += ["", f"**Accuracy**, trained-head model ({acc['model']}), whole Banking77 test split "
                  f"({acc['n']} texts): fp32 {100 * acc['fp32']:.2f}%, int8 {100 * acc['int8']:.2f}% "
                  f"({acc['delta_points']:+.2f} points); the two agree on {100 * acc['label_agreement']:.1f}% of "
                  f"the labels (torch int8, {'8' if acc['vnni'] else '7'}-bit inputs on this CPU). int8 as a "
                  f"TorchScript graph: {100 * acc['int8_traced']:.2f}%, the same label as eager int8 on "
                  f"{100 * acc['traced_agreement']:.1f}% of the texts. int8 by ONNX Runtime (8-bit inputs): "
                  f"{100 * acc['int8_onnxruntime']:.2f}% ({100 * (acc['int8_onnxruntime'] - acc['fp32']):+.2f} points)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=512, help="texts per repetition (naive: a quarter)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sweep-texts", type=int, default=256)
    p.add_argument("--sweep-reps", type=int, default=2)
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--threads", default="1,2", help="torch thread counts (the first: sweep and main table)")
    p.add_argument("--thread-texts", type=int, default=128, help="texts per repetition of the threads table")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    load_before = load()

    test = banking("test")
    texts = list(test.texts[: args.texts])
    fp32 = Student.from_pretrained(None, test.classes(), max_length=64, device="cpu")  # untrained head: speed only
    int8 = fp32.clone().optimize_for_inference("int8")
    traced = fp32.clone().optimize_for_inference("int8", "torchscript")  # the workers' default graph
    onnx = fp32.clone().optimize_for_inference("int8", "onnxruntime")
    pipe = make_pipeline(fp32)
    batched = {
        "student fp32": lambda bs: lambda xs: fp32.predict_proba(xs, bs),
        "student int8": lambda bs: lambda xs: int8.predict_proba(xs, bs),
        TRACED: lambda bs: lambda xs: traced.predict_proba(xs, bs),
        ORT: lambda bs: lambda xs: onnx.predict_proba(xs, bs),
        "pipeline fp32": lambda bs: lambda xs: pipe(xs, batch_size=bs, truncation=True, max_length=64),
    }

    print(f"sweep: batch sizes {sizes}, {args.sweep_texts} texts, threads {threads[0]}", flush=True)
    sweep_fns = {f"{name} @{bs}": make(bs) for bs in sizes for name, make in batched.items()}
    sweep_texts = dict.fromkeys(sweep_fns, texts[: args.sweep_texts])
    sweep_runs = interleave(sweep_fns, sweep_texts, args.sweep_reps, threads[:1])
    sweep = {name: {str(bs): summary(sweep_runs[(f"{name} @{bs}", threads[0])]) for bs in sizes} for name in batched}
    best = {name: max(sizes, key=lambda bs, n=name: sweep[n][str(bs)]["median"]) for name in batched}
    print(f"best batch sizes: {best}", flush=True)

    contenders = {
        "naive (1 forward per message, fp32)": (1, lambda xs: naive(fp32, xs)),
        "pipeline fp32": (best["pipeline fp32"], batched["pipeline fp32"](best["pipeline fp32"])),
        "student fp32, input order (no length bucketing)":
            (best["student fp32"], lambda xs: input_order(fp32, xs, best["student fp32"])),
        "student fp32": (best["student fp32"], batched["student fp32"](best["student fp32"])),
        "student int8": (best["student int8"], batched["student int8"](best["student int8"])),
        TRACED: (best[TRACED], batched[TRACED](best[TRACED])),
        ORT: (best[ORT], batched[ORT](best[ORT])),
    }
    n_naive = max(8, args.texts // 4)
    main_texts = {name: texts[:n_naive] if name.startswith("naive") else texts for name in contenders}
    print(f"main: {list(contenders)}, threads {threads[0]}, {args.reps} reps", flush=True)
    runs = interleave({n: fn for n, (_, fn) in contenders.items()}, main_texts, args.reps, threads[:1])
    main_rows = {n: {"batch": bs, "texts_s": summary(runs[(n, threads[0])])} for n, (bs, _) in contenders.items()}

    ratios = {}
    for a, b in ((ORT, "pipeline fp32"), (TRACED, "pipeline fp32"), ("student int8", "pipeline fp32"),
                 (ORT, TRACED), (TRACED, "student int8"), ("student fp32", "pipeline fp32"),
                 ("student int8", "student fp32"),
                 ("student fp32", "student fp32, input order (no length bucketing)"),
                 ("pipeline fp32", "naive (1 forward per message, fp32)")):
        ra, rb = runs[(a, threads[0])], runs[(b, threads[0])]
        pairs = [x / y for x, y in zip(ra, rb, strict=True)]
        ratios[f"{a} / {b}"] = {"of_medians": summary(ra)["median"] / summary(rb)["median"],
                                "min": min(pairs), "max": max(pairs)}

    by_threads = {}
    if len(threads) > 1:  # fewer texts: on a busy machine extra threads can be 10x slower
        names = ("pipeline fp32", "student fp32", "student int8", TRACED, ORT)
        print(f"threads: {names} at {threads}, {args.thread_texts} texts", flush=True)
        t_runs = interleave({n: contenders[n][1] for n in names}, dict.fromkeys(names, texts[: args.thread_texts]),
                            args.reps, threads)
        by_threads = {n: {str(t): summary(t_runs[(n, t)]) for t in threads} for n in names}

    res = {"machine": machine(), "load_before": load_before,
           "args": {**vars(args), "threads": threads, "batch_sizes": sizes, "naive_texts": n_naive},
           "sweep": sweep, "best_batch": best, "main": main_rows, "ratios": ratios, "threads": by_threads}
    if not args.no_accuracy:
        print("accuracy: fp32 vs int8 on the whole test split ...", flush=True)
        res["accuracy"] = accuracy(probe_model_dir(), threads[0])
    res["load_after"] = load()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "inference.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    print(text)
    if not args.no_docs:
        write_section("inference_bench.py", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
