"""Sequence packing against the planner's padded passes: would it make small
takes cheaper? (Issue 8: packing several short texts into one row was the lever
left for p99 at 50% of the sustained rate.)

An experiment, not a serving path: the product serves the padded passes.
Both graphs are built from the probe student (bench/_common.probe_model_dir)
the way the product builds its served graph (pgkd.inference_onnx: the
exporter, ONNX Runtime's int8 quantization of every encoder layer but the last,
fp16 word embeddings, offline optimization), and run on one thread:

- served: the graph a version stores; a take is sorted by token count and cut
  into passes by ``pgkd.passes.plan_passes`` (at most 16 texts a pass), each
  padded to its longest text (``GraphStudent.predict_proba``);
- served before: the same, exported through transformers' forward as every
  model was until session 18 (``export_module`` now takes BERT's own modules);
- packed graph, a text a row: the packed graph fed those same passes (its own
  mask, positions and [CLS] gather; nothing packed);
- packed N: texts placed first-fit-decreasing into rows of N tokens (--widths),
  each with its own position ids from 0 and a block-diagonal attention mask
  built in the graph from segment ids; each text's [CLS] state is gathered for
  the pooler and the classifier. At most --pass-tokens token slots a pass (256:
  a padded pass of 16 texts of 16 tokens; with 16 rows of 64 tokens a take of
  128 ran 0.88x as fast as the served graph).

The fp32 packed graph is checked against the eager model (max |logit diff|),
every contender is scored on the whole Banking77 test split, then random takes
of test texts of each size are run by every contender, each take in a turned
order. Timed: this thread's CPU time in the sessions' runs (the feeds are built
beforehand), per text, and per take the graph served before's over the contender's.

    python bench/packing_bench.py             # ~4 min on 2 cores (builds both graphs once, cached in bench/out)
    python bench/packing_bench.py --widths 64 --no-docs

Writes bench/out/packing.json and its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
from _common import OUT, banking, load, machine, machine_line, probe_model_dir, summary, write_section

SIZES = (1, 2, 3, 4, 6, 8, 16, 32, 128)
ROWS_PER_PASS = 16  # PGKD_INFERENCE_BATCH_SIZE: the planner's texts per pass, the packer's rows per pass
SERVED = "served"
BEFORE = "served before (transformers' forward)"
ROWS = "packed graph, a text a row"
INPUTS = ("input_ids", "token_type_ids", "position_ids", "segment_ids", "cls_index")


def packed_module(model):
    """The student's forward pass over packed rows: logits per text."""
    import torch

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, token_type_ids, position_ids, segment_ids, cls_index):
            bert = self.model.bert
            hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
            # a token sees the tokens of its own text only; 0 marks padding
            same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids > 0)[:, None, :]
            mask = torch.where(same[:, None, :, :], 0.0, torch.finfo(torch.float32).min)
            hidden = bert.encoder(hidden, attention_mask=mask).last_hidden_state
            cls = hidden.reshape(-1, hidden.shape[-1]).index_select(0, cls_index)
            return self.model.classifier(bert.pooler.activation(bert.pooler.dense(cls)))

    return Packed().eval()


def pack(encodings: list, width: int, pass_tokens: int = ROWS_PER_PASS * 64) -> list[tuple[list, dict]]:
    """The passes that answer ``encodings`` (text indices, feeds): first-fit
    decreasing into rows of ``width`` tokens, at most ``pass_tokens // width``
    rows a pass; each pass's ``cls_index`` lists its texts in the order of their
    index in ``encodings``."""
    rows: list[list] = []  # [tokens used, [text index, ...]]
    for i in sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids)):
        n = len(encodings[i].ids)
        row = next((r for r in rows if r[0] + n <= width), None)
        if row is None:
            rows.append([n, [i]])
        else:
            row[0] += n
            row[1].append(i)
    passes = []
    per_pass = max(1, pass_tokens // width)
    for first in range(0, len(rows), per_pass):
        group = rows[first : first + per_pass]
        length = max(used for used, _ in group)
        feeds = {name: np.zeros((len(group), length), np.int64) for name in INPUTS[:4]}
        cls = {}
        for r, (_, members) in enumerate(group):
            at = 0
            for segment, i in enumerate(members, 1):
                e, n = encodings[i], len(encodings[i].ids)
                feeds["input_ids"][r, at : at + n] = e.ids
                feeds["token_type_ids"][r, at : at + n] = e.type_ids
                feeds["position_ids"][r, at : at + n] = np.arange(n)
                feeds["segment_ids"][r, at : at + n] = segment
                cls[i] = r * length + at
                at += n
        order = sorted(cls)
        feeds["cls_index"] = np.array([cls[i] for i in order], np.int64)
        passes.append((order, feeds))
    return passes


def build(model_dir: Path, work: Path) -> tuple[dict[str, Path], float]:
    """The int8 graphs (cached in ``work``): the served one, the one served
    before session 18 and the packed one; and the fp32 packed graph's largest
    |logit| difference from the eager model."""
    import torch

    import pgkd.inference_onnx as inference_onnx
    from pgkd.inference_opt import _Logits

    from pgkd.graph_student import GraphTokenizer
    from pgkd.inference_onnx import OPSET, _layer_count, build_onnx, halve_embedding_tables, optimize_offline, quantize_onnx, session
    from pgkd.student import Student

    work.mkdir(parents=True, exist_ok=True)
    graphs = {"served": work / "served.int8.onnx", "before": work / "before.int8.onnx",
              "packed": work / "packed.int8.onnx"}
    report = work / "packed.check.json"
    if all(path.exists() for path in graphs.values()) and report.exists():
        return graphs, json.loads(report.read_text())["fp32_max_diff"]
    torch.set_num_threads(1)
    student = Student.load(model_dir, device="cpu")
    student.model.eval()
    build_onnx(student.model, student.encode, "int8", graphs["served"], 1)
    # the export before session 18: every model through transformers' forward
    own = inference_onnx.export_module
    inference_onnx.export_module = _Logits
    try:
        build_onnx(student.model, student.encode, "int8", graphs["before"], 1)
    finally:
        inference_onnx.export_module = own
    packed = graphs["packed"]
    tokenizer = GraphTokenizer(model_dir, student.max_length)
    texts = banking("test").texts
    (_, example), = pack(tokenizer.encode(texts[:7]), 64)
    fp32 = work / "packed.fp32.onnx"
    axes = {name: {0: "rows", 1: "tokens"} for name in INPUTS[:4]} | {"cls_index": {0: "texts"}, "logits": {0: "texts"}}
    with torch.no_grad():
        torch.onnx.export(packed_module(student.model), tuple(torch.from_numpy(example[n]) for n in INPUTS), str(fp32),
                          input_names=list(INPUTS), output_names=["logits"], opset_version=OPSET, dynamo=False,
                          dynamic_axes=axes)
    check = session(str(fp32), 1)
    worst = 0.0
    for start, size in ((100, 3), (200, 17), (300, 40), (400, 128)):
        batch = texts[start : start + size]
        got = np.empty((size, len(student.labels)), np.float32)
        for order, feeds in pack(tokenizer.encode(batch), 64):
            got[order] = check.run(None, feeds)[0]
        with torch.no_grad():
            want = student.model(**student.encode(batch)).logits.numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    quantize_onnx(fp32, packed, _layer_count(student.model))
    fp32.unlink()
    halve_embedding_tables(packed)
    optimize_offline(packed)
    report.write_text(json.dumps({"fp32_max_diff": worst}))
    return graphs, worst


def run(args) -> dict:
    from pgkd.graph_student import GraphStudent, GraphTokenizer, softmax
    from pgkd.inference_onnx import OnnxForward, session
    from pgkd.passes import plan_passes, read_labels

    model_dir = probe_model_dir()
    labels, max_length = read_labels(model_dir)
    load_before = load()
    graphs, fp32_diff = build(model_dir, OUT / "packing")
    tokenizer = GraphTokenizer(model_dir, max_length)
    sessions = {name: session(str(path), 1) for name, path in graphs.items()}
    # its _feeds pad a pass as the served student does (both padded graphs take the same inputs)
    served = GraphStudent(OnnxForward(sessions["served"], [i.name for i in sessions["served"].get_inputs()]),
                          tokenizer, labels, max_length, "int8")

    def padded_passes(encodings: list) -> list[tuple]:
        """The planner's passes as GraphStudent.predict_proba feeds them."""
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(lengths, kind="stable")
        return [(order[start:end], served._feeds([encodings[i] for i in order[start:end]]))
                for start, end in plan_passes(lengths[order].tolist(), ROWS_PER_PASS)]

    def rows_passes(encodings: list) -> list[tuple]:
        """The same passes for the packed graph, a text a row."""
        passes = []
        for idx, padded in padded_passes(encodings):
            rows, width = padded["input_ids"].shape
            feeds = {"input_ids": padded["input_ids"], "token_type_ids": padded["token_type_ids"],
                     "position_ids": np.broadcast_to(np.arange(width), (rows, width)).copy(),
                     "segment_ids": padded["attention_mask"], "cls_index": np.arange(rows, dtype=np.int64) * width}
            passes.append((idx, feeds))
        return passes

    # contender: (graph, the passes of a take)
    contenders = {BEFORE: ("before", padded_passes), SERVED: ("served", padded_passes),
                  ROWS: ("packed", rows_passes)} | {
        f"packed {w}": ("packed", lambda e, w=w: pack(e, w, args.pass_tokens)) for w in args.widths}

    def answer(name: str, passes: list) -> np.ndarray:
        graph = sessions[contenders[name][0]]
        out = np.empty((sum(len(idx) for idx, _ in passes), len(labels)), np.float32)
        for idx, feeds in passes:
            out[idx] = softmax(graph.run(None, feeds)[0])
        return out

    test = banking("test")
    gold = np.array([labels.index(label) for label in test.labels])
    accuracy = {}
    for name, (_, passes) in contenders.items():
        predicted = np.concatenate([answer(name, passes(tokenizer.encode(test.texts[s : s + 32]))).argmax(1)
                                    for s in range(0, len(test.texts), 32)])
        accuracy[name] = round(100 * float((predicted == gold).mean()), 2)
        print(f"Banking77 test accuracy, {name}: {accuracy[name]:.2f}%", flush=True)

    rng = random.Random(args.seed)
    timings: dict[str, dict[str, dict]] = {}
    names = list(contenders)
    for size in SIZES:
        takes = []
        for _ in range(max(args.min_takes, args.texts // size)):
            encodings = tokenizer.encode(rng.sample(test.texts, size))
            takes.append({name: passes(encodings) for name, (_, passes) in contenders.items()})
        for take in takes[:3]:  # warm-up
            for name in names:
                answer(name, take[name])
        cpu = {name: [] for name in names}
        for k, take in enumerate(takes):
            for name in names[k % len(names):] + names[: k % len(names)]:  # each take in a turned order
                graph = sessions[contenders[name][0]]
                started = time.thread_time()
                for _, feeds in take[name]:
                    graph.run(None, feeds)
                cpu[name].append(time.thread_time() - started)
        timings[str(size)] = {name: {
            "ms_per_text": 1e3 * sum(v) / (len(v) * size),
            "passes_per_take": statistics.fmean(len(take[name]) for take in takes),
            # per take: the graph served before's CPU time over this contender's (above 1: cheaper)
            "paired": summary([a / b for a, b in zip(cpu[BEFORE], v)]),
            "takes": len(v)} for name, v in cpu.items()}
        print(f"takes of {size}: " + ", ".join(f"{name} {t['ms_per_text']:.2f} ms/text ({t['paired']['median']:.3f}x)"
                                               for name, t in timings[str(size)].items()), flush=True)
    return {"machine": machine(), "load_before": load_before, "load_after": load(), "widths": args.widths,
            "fp32_packed_vs_eager_max_logit_diff": fp32_diff, "accuracy": accuracy, "timings": timings,
            "rows_per_pass": ROWS_PER_PASS, "pass_tokens": args.pass_tokens}


def markdown(res: dict) -> str:
    widths = res["widths"]
    names = [BEFORE, SERVED, ROWS] + [f"packed {w}" for w in widths]
    lines = [
        machine_line(res, "one thread, in this process"),
        f"The probe student (MiniLM-L6, trained head), int8 ONNX Runtime, one thread; at most "
        f"{res['rows_per_pass']} texts a padded pass, {res['pass_tokens']} token slots a packed one. The fp32 packed "
        f"graph against the eager model: largest |logit difference| "
        f"{res['fp32_packed_vs_eager_max_logit_diff']:.1e}. Banking77 test accuracy (takes of 32): "
        + ", ".join(f"{n} {res['accuracy'][n]:.2f}%" for n in names) + ".",
        "",
        "The graph's CPU milliseconds per text (this thread's CPU time in the session's runs; the feeds are built "
        "beforehand), over random takes of test texts, each take run by every contender in a turned order; and, "
        "per take, the CPU time of the graph served before over the contender's: median (min-max), above 1 when "
        "the contender is cheaper. *served before*: the export through transformers' forward (until session 18), "
        "the planner's padded passes. *served*: the export through BERT's own modules with one mask over token "
        "pairs a pass (`pgkd.inference_onnx.export_module`), the same passes. *packed graph, a text a row*: the "
        "packed graph fed those same passes (nothing packed). *packed N*: rows of N tokens. Passes per take in "
        "brackets.",
        "",
        "| texts a take | takes | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for size, t in res["timings"].items():
        cells = [f"{t[BEFORE]['ms_per_text']:.2f} [{t[BEFORE]['passes_per_take']:.1f}]"]
        for name in names[1:]:
            paired = t[name]["paired"]
            cells.append(f"{t[name]['ms_per_text']:.2f} [{t[name]['passes_per_take']:.1f}]; "
                         f"{paired['median']:.3f}x ({paired['min']:.2f}-{paired['max']:.2f})")
        lines.append(f"| {size} | {t[BEFORE]['takes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="tokens a packed row holds")
    p.add_argument("--pass-tokens", type=int, default=256,
                   help="token slots a packed pass holds at most (rows of a pass = this / width)")
    p.add_argument("--texts", type=int, default=2400, help="texts timed per take size (takes = texts / size)")
    p.add_argument("--min-takes", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = p.parse_args()
    res = run(args)
    (OUT / "packing.json").write_text(json.dumps(res, indent=1))
    print(markdown(res))
    if not args.no_docs:
        write_section("packing_bench.py", markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
