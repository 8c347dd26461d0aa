"""The ``pgkd`` console script.

Every command turns a :class:`pgkd.errors.PGKDError` into one line on stderr and
exit status 2; nothing the user can get wrong ends in a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from pgkd.errors import DataError, PGKDError

log = logging.getLogger("pgkd")


def _text_cols(value: str) -> list[str]:
    cols = [c.strip() for c in value.split(",") if c.strip()]
    if not cols:
        raise argparse.ArgumentTypeError("expected one or more column names, comma-separated")
    return cols


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-col", type=_text_cols, default=["text"], help="text column(s), comma-separated: joined")
    p.add_argument("--label-col", default="label", help="label column")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="encoder name or path (default: the offline MiniLM-L6)")
    p.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length (paper: 512)")
    p.add_argument("--epochs", type=int, default=30, help="max epochs of a fine-tune (paper: 30)")
    p.add_argument("--batch-size", type=int, default=64, help="(paper: 64)")
    p.add_argument("--lr", type=float, default=2e-5, help="(paper: 2e-5)")
    p.add_argument("--train-patience", type=int, default=5, help="early-stopping patience in epochs (paper: 5)")
    p.add_argument("--class-weighted", action="store_true", help="class-weighted cross-entropy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_config(args, epochs: int | None = None):
    from pgkd.training import TrainConfig

    return TrainConfig(
        epochs=epochs or args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.train_patience,
        class_weighted=args.class_weighted,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _load(path: str, args, min_classes: int = 1):
    from pgkd.data import load_labelled

    return load_labelled(path, args.text_col, args.label_col, min_classes=min_classes)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --- commands -------------------------------------------------------------------


def cmd_train(args) -> int:
    """Plain fine-tune: the baseline."""
    from pgkd.data import check_labels
    from pgkd.loop import evaluate, headline
    from pgkd.student import Student
    from pgkd.training import train

    train_set, val = _load(args.train, args, min_classes=2), _load(args.val, args)
    test = _load(args.test, args) if args.test else None
    check_labels(train_set, val, *([test] if test else []), names=[args.val, args.test])
    student = Student.from_pretrained(args.model, train_set.classes(), max_length=args.max_length)
    fit = train(student, train_set, val, _train_config(args))
    out = Path(args.out)
    student.save(out / "model")
    report = {"train": {"n": len(train_set), "best_epoch": fit.best_epoch, "seconds": round(fit.seconds, 1),
                        "device": str(fit.device)},
              "val": evaluate(student, val)}
    if test:
        report["test"] = evaluate(student, test)
    _write_json(out / "report.json", report)
    print(json.dumps({k: headline(v) for k, v in report.items() if k in ("val", "test")}))
    return 0


def cmd_evaluate(args) -> int:
    from pgkd.loop import evaluate
    from pgkd.student import Student

    student = Student.load(args.model)
    data = _load(args.data, args)
    unseen = sorted(set(data.labels) - set(student.labels))
    if unseen:
        raise DataError(f"{args.data} has labels the model does not know: {', '.join(unseen[:5])}")
    report = evaluate(student, data)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_distill(args) -> int:
    from pgkd.data import check_labels
    from pgkd.loop import DistillConfig, config_dict, distill, evaluate, headline
    from pgkd.student import Student
    from pgkd.teacher import OpenAITeacher

    train_set, val, test = _load(args.train, args, min_classes=2), _load(args.val, args), _load(args.test, args)
    check_labels(train_set, val, test, names=[args.val, args.test])
    taxonomy = train_set.classes()
    cfg = DistillConfig(
        max_cycles=args.max_cycles,
        patience=args.patience,
        samples_per_cycle=args.samples_per_cycle,
        target_classes=args.target_classes,
        target_strategy=args.target_strategy,
        hard_negatives=not args.no_hard_negatives,
        train=_train_config(args),
        cycle_train=_train_config(args, epochs=args.cycle_epochs) if args.cycle_epochs else None,
        head_only=args.head_only,
        seed=args.seed,
    )
    teacher = OpenAITeacher(
        base_url=args.teacher_url,
        model=args.teacher_model,
        api_key=_teacher_key(),
        taxonomy=taxonomy,
        budget_usd=args.teacher_budget_usd,
    )
    student = Student.from_pretrained(args.model, taxonomy, max_length=args.max_length)
    started = time.perf_counter()
    result = distill(student, train_set, val, teacher, cfg, known_texts=set(val.texts) | set(test.texts))
    out = Path(args.out)
    result.student.save(out / "model")
    report = {
        "config": config_dict(cfg),
        "data": {"train": len(train_set), "val": len(val), "test": len(test), "classes": len(taxonomy),
                 "final_train": len(result.train_set)},
        "baseline": {"val": headline(result.baseline_val), "test": headline(evaluate(result.baseline_student, test))},
        "final": {"val": headline(result.best_val), "test": headline(evaluate(result.student, test))},
        "cycles": result.cycles,
        "stopped_because": result.stopped_because,
        "teacher": {"model": args.teacher_model, "usage": teacher.usage.as_dict()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(out / "report.json", report)
    print(json.dumps({"baseline_test": report["baseline"]["test"], "final_test": report["final"]["test"]}))
    return 0


def cmd_split(args) -> int:
    """The paper's protocol as files: train/val from n_seed samples, a pool, a test set."""
    from pgkd.data import paper_splits, write_labelled

    data = _load(args.data, args, min_classes=2)
    test = _load(args.test, args) if args.test else None
    splits = paper_splits(data, n_seed=args.n_seed, val_fraction=args.val_fraction, n_test=args.n_test,
                          seed=args.seed, test=test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name in ("train", "val", "pool", "test"):
        part = getattr(splits, name)
        write_labelled(out / f"{name}.csv", part)
        sizes[name] = len(part)
    print(json.dumps({"out": str(out), **sizes}))
    return 0


def _teacher_key() -> str:
    from pgkd.settings import load_settings

    return load_settings().teacher_key()


# --- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgkd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a student (the baseline)")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--test", default=None)
    p.add_argument("--out", required=True, help="output directory (model/ and report.json)")
    _add_data_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("split", help="the paper's protocol: train/val/pool/test CSVs (columns text,label)")
    p.add_argument("--data", required=True, help="labelled file to split")
    p.add_argument("--test", default=None, help="a separate test file (else --n-test rows are carved from --data)")
    p.add_argument("--n-seed", type=int, default=1000, help="labelled seed samples, split into train/val (paper: 1000)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--n-test", type=int, default=None, help="test rows, stratified (required without --test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    _add_data_args(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("evaluate", help="evaluate a stored student on a labelled file")
    p.add_argument("--model", required=True, help="directory written by train/distill (…/model)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help="also write the report JSON here")
    _add_data_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("distill", help="run PGKD (Algorithm 1) with a teacher endpoint")
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--out", required=True, help="output directory (model/ and report.json)")
    p.add_argument("--teacher-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8089/v1")
    p.add_argument("--teacher-model", required=True)
    p.add_argument("--teacher-budget-usd", type=float, default=None, help="stop cycles when spent")
    p.add_argument("--max-cycles", type=int, default=10)
    p.add_argument("--patience", type=int, default=5, help="cycles without validation gain before stopping")
    p.add_argument("--samples-per-cycle", type=int, default=32)
    p.add_argument("--target-classes", type=int, default=8, help="k weakest classes per cycle")
    p.add_argument("--target-strategy", choices=["weakest", "random"], default="weakest")
    p.add_argument("--no-hard-negatives", action="store_true", help="ablation: no hard negatives in the prompt")
    p.add_argument("--cycle-epochs", type=int, default=None, help="max epochs of each cycle's retraining")
    p.add_argument("--head-only", action="store_true",
                   help="CPU mode: frozen encoder, only the classification head learns (use a larger --lr)")
    _add_data_args(p)
    _add_train_args(p)
    p.set_defaults(func=cmd_distill)

    from pgkd.simulator import add_simulator_args, run_simulator

    p = sub.add_parser("teacher-sim", help="run the teacher SIMULATOR (offline test double of an LLM)")
    add_simulator_args(p)
    p.set_defaults(func=run_simulator)

    from pgkd.registry_cli import add_models_parser

    add_models_parser(sub)

    if importlib.util.find_spec("streams.cli") is not None:
        from streams.cli import add_dlq_parser, add_topics_parser, add_worker_parser
        from streams.demo import add_demo_parser

        add_worker_parser(sub)
        add_topics_parser(sub)
        add_dlq_parser(sub)
        add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except PGKDError as err:
        print(f"pgkd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pgkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
