"""PGKD benchmark: the paper's low-data protocol on Banking77 and AG News.

For each dataset and seed: 1,000 stratified seed samples (800 train / 200 val),
a held-out test set, the rest of the data as the teacher's pool. One baseline
fine-tune, then three cycle variants that start from that same baseline with the
same sample budget (``max_cycles x samples_per_cycle``; patience = max_cycles so
no variant stops early and spends less):

    pgkd              weakest classes + hard negatives in the prompt (the paper)
    random_classes    ablation: random target classes
    no_hard_negatives ablation: the prompt carries no hard negatives
    no_teacher        control: the same cycles of retraining with no new samples
                      (how much of a gain is just more training epochs)

The teacher is the project's teacher SIMULATOR (gold labels from the pool, drawn
without replacement for the requested classes) reached through the real openai
client over HTTP. It returns real, unseen, correctly labelled texts of the
requested classes, so the benchmark measures the value of *which* classes and
*which* prompt context a cycle targets, not an LLM's writing quality.

    python bench/distill_bench.py                 # defaults: 2-core CPU friendly
    python bench/distill_bench.py --seeds 0 --datasets banking77 --max-cycles 2   # a quick look

Writes ``bench/out/distill.json`` and prints the Markdown table that goes into
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import machine as common_machine  # bench/ is on sys.path when run as a script

from pgkd.data import LabelledTexts, load_labelled, paper_splits
from pgkd.features import FeatureCache
from pgkd.loop import DistillConfig, evaluate, headline, run_cycles
from pgkd.simulator import SimulatorServer
from pgkd.student import Student
from pgkd.teacher import GenerationResult, OpenAITeacher, Usage
from pgkd.training import TrainConfig, fit_student

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
VARIANTS = {
    "pgkd": dict(target_strategy="weakest", hard_negatives=True),
    "random_classes": dict(target_strategy="random", hard_negatives=True),
    "no_hard_negatives": dict(target_strategy="weakest", hard_negatives=False),
    "no_teacher": dict(target_strategy="weakest", hard_negatives=True),
}


class NoTeacher:
    """The control's teacher: answers every generation request with no samples."""

    def __init__(self):
        self.usage = Usage()

    def generate(self, report, mined, target_classes, n, known_texts=()):
        return GenerationResult(LabelledTexts((), ()), requested=n, rejected={})



def load_dataset(name: str, root: Path) -> tuple[LabelledTexts, LabelledTexts | None]:
    """(data to split, fixed test set or None). AG News ships only its test split: we split it ourselves."""
    if name == "banking77":
        data = load_labelled(root / "banking77" / "train.csv", ["text"], "category")
        test = load_labelled(root / "banking77" / "test.csv", ["text"], "category")
        return data, test
    if name == "ag_news":
        return load_labelled(root / "ag_news" / "test.csv", ["title", "description"], "label"), None
    raise SystemExit(f"unknown dataset {name!r}: expected banking77 or ag_news")


def machine() -> dict:
    info = {**common_machine(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_seed(name: str, args, seed: int) -> dict:
    data, test = load_dataset(name, args.data_root)
    splits = paper_splits(data, n_seed=args.n_seed, val_fraction=0.2, n_test=args.n_test, seed=seed, test=test)
    test_set = splits.test  # stratified n_test samples: keeps CPU runs in minutes
    taxonomy = splits.train.classes()
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.train_patience,
                            seed=seed, progress=False)
    cycle_cfg = TrainConfig(epochs=args.cycle_epochs, batch_size=args.batch_size, lr=args.lr,
                            patience=args.train_patience, seed=seed, progress=False)

    started = time.perf_counter()
    baseline = Student.from_pretrained(args.model, taxonomy, max_length=args.max_length)
    # head-only: each text encoded once, for every variant (--no-feature-cache: at every use, as before 2026-11-29)
    features = (FeatureCache(max_bytes=0) if args.no_feature_cache else FeatureCache()) if args.head_only else None
    fit = fit_student(baseline, splits.train, splits.val, train_cfg, head_only=args.head_only, features=features)
    base_val = evaluate(baseline, splits.val, features=features)
    row = {
        "dataset": name, "seed": seed, "classes": len(taxonomy),
        "sizes": {"train": len(splits.train), "val": len(splits.val), "pool": len(splits.pool), "test": len(test_set)},
        "baseline": {"val": headline(base_val), "test": headline(evaluate(baseline, test_set, features=features)),
                     "best_epoch": fit.best_epoch, "wall_seconds": round(time.perf_counter() - started, 1)},
    }
    print(f"[{name} seed {seed}] baseline test {row['baseline']['test']} ({row['baseline']['wall_seconds']}s)",
          flush=True)

    known = set(splits.val.texts) | set(test_set.texts)
    for variant in args.variants.split(","):
        overrides = VARIANTS[variant]
        started = time.perf_counter()
        cfg = DistillConfig(max_cycles=args.max_cycles, patience=args.max_cycles,
                            samples_per_cycle=args.samples_per_cycle, target_classes=args.target_classes,
                            train=train_cfg, cycle_train=cycle_cfg, head_only=args.head_only, seed=seed,
                            **overrides)
        # a fresh simulator per variant: each draws from the same, full pool
        with SimulatorServer(splits.pool, seed=seed) as sim:
            teacher = (NoTeacher() if variant == "no_teacher" else
                       OpenAITeacher(base_url=sim.url, model="teacher-sim", api_key="bench", taxonomy=taxonomy))
            result = run_cycles(baseline, base_val, splits.train, splits.val, teacher, cfg, known_texts=known,
                                log=lambda _msg: None, features=features)
        row[variant] = {
            "val": headline(result.best_val),
            "test": headline(evaluate(result.student, test_set, features=features)),
            "samples_accepted": sum(c["samples_accepted"] for c in result.cycles),
            "cycles_kept": sum(c["improved"] for c in result.cycles),
            "teacher_calls": teacher.usage.calls,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        print(f"[{name} seed {seed}] {variant}: test {row[variant]['test']} "
              f"(+{row[variant]['samples_accepted']} samples, {row[variant]['wall_seconds']}s)", flush=True)
    return row


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict]) -> str:
    lines = ["| dataset | config | test accuracy | test macro-F1 | samples added | wall s (mean) |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        for config in ("baseline", *(v for v in VARIANTS if v in mine[0])):
            acc = [r[config]["test"]["accuracy"] for r in mine]
            f1 = [r[config]["test"]["macro_f1"] for r in mine]
            added = [r[config].get("samples_accepted", 0) for r in mine]
            wall = statistics.mean(r[config]["wall_seconds"] for r in mine)
            lines.append(f"| {name} | {config} | {mean_sd(acc)} | {mean_sd(f1)} | {statistics.mean(added):.0f} "
                         f"| {wall:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="banking77,ag_news")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", type=Path, default=DATASETS)
    p.add_argument("--model", default=None, help="encoder (default: offline MiniLM-L6)")
    p.add_argument("--n-seed", type=int, default=1000, help="labelled seed samples (paper: 1000)")
    p.add_argument("--n-test", type=int, default=1000, help="test samples evaluated (subsampled, seeded)")
    p.add_argument("--max-length", type=int, default=64, help="paper: 512; 64 covers Banking77 and most AG News")
    p.add_argument("--epochs", type=int, default=12, help="baseline max epochs (paper: 30)")
    p.add_argument("--cycle-epochs", type=int, default=4, help="max epochs of each cycle's retraining")
    p.add_argument("--train-patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="paper: 2e-5 for BERT-base; MiniLM-L6 needs more")
    p.add_argument("--max-cycles", type=int, default=5, help="paper: 10")
    p.add_argument("--samples-per-cycle", type=int, default=32, help="paper: 32")
    p.add_argument("--target-classes", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--head-only", action="store_true",
                   help="CPU mode: frozen encoder, train only the classification head (use --lr 1e-2 --epochs 60)")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="head-only: encode every text at every use (the loop before pgkd.features), to compare")
    p.add_argument("--out", type=Path, default=Path("bench/out/distill.json"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data_root.is_dir():
        print(f"distill_bench: error: datasets not found at {args.data_root} (pass --data-root)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    out = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = out["runs"]
    for name in args.datasets.split(","):
        for seed in args.seeds.split(","):
            rows.append(run_seed(name, args, int(seed)))
            out["wall_seconds"] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every run: a cut-off run keeps its rows
    print(json.dumps(out["machine"]))
    print(table(rows))
    print(f"total wall: {out['wall_seconds']}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
