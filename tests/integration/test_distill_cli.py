"""`pgkd distill` end to end: real Banking77 rows, the default MiniLM student, the
teacher simulator over HTTP through the real openai client, the console script
as a user runs it."""

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from pgkd.data import load_labelled
from pgkd.simulator import SimulatorServer

pytestmark = [pytest.mark.slow]

BANKING = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "banking77" / "train.csv"
CLASSES = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "top_up_failed", "pin_blocked", "request_refund"]


def subset(per_class: dict[str, list[str]], start: int, n: int) -> list[tuple[str, str]]:
    return [(text, label) for label, texts in per_class.items() for text in texts[start:start + n]]


def write(path: Path, rows) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows(rows)
    return str(path)


def test_distill_on_a_banking77_subset(tmp_path):
    if not BANKING.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Banking77 not found at {BANKING}: CI must have ../shared/datasets")
        pytest.skip(f"Banking77 not found at {BANKING}")
    per_class = defaultdict(list)
    data = load_labelled(BANKING, ["text"], "category")
    for text, label in zip(data.texts, data.labels):
        if label in CLASSES:
            per_class[label].append(text)
    assert sorted(per_class) == sorted(CLASSES)
    train = write(tmp_path / "train.csv", subset(per_class, 0, 12))
    val = write(tmp_path / "val.csv", subset(per_class, 12, 5))
    test = write(tmp_path / "test.csv", subset(per_class, 17, 15))
    pool = load_labelled(write(tmp_path / "pool.csv", subset(per_class, 32, 60)), ["text"], "category")
    out = tmp_path / "run"

    with SimulatorServer(pool, seed=0) as sim:
        proc = subprocess.run(
            [sys.executable, "-m", "pgkd.cli", "distill", "--train", train, "--val", val, "--test", test,
             "--text-col", "text", "--label-col", "category", "--teacher-url", sim.url, "--teacher-model", "sim",
             "--out", str(out), "--max-length", "32", "--epochs", "4", "--cycle-epochs", "2", "--lr", "2e-4",
             "--batch-size", "16", "--max-cycles", "2", "--patience", "2", "--samples-per-cycle", "12",
             "--target-classes", "3", "--seed", "0", "--no-progress"],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "2", "PGKD_TEACHER_API_KEY": "sk-test-not-logged"},
        )
        served = sim.stats.get("samples_served", 0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sk-test-not-logged" not in proc.stdout + proc.stderr

    report = json.loads((out / "report.json").read_text())
    metrics = {"accuracy", "macro_f1", "weighted_f1"}
    for key in ("baseline", "final"):
        assert set(report[key]["test"]) == metrics and set(report[key]["val"]) == metrics
        assert all(0.0 <= v <= 1.0 for v in report[key]["test"].values())
    # keep-best on validation: the final student is never worse there than the baseline
    assert report["final"]["val"]["macro_f1"] >= report["baseline"]["val"]["macro_f1"]
    # 6 classes, 72 training texts: a fine-tuned MiniLM is far above chance (1/6)
    assert report["final"]["test"]["accuracy"] > 0.4
    assert 1 <= len(report["cycles"]) <= 2
    for cycle in report["cycles"]:
        assert cycle["samples_requested"] == 12
        assert cycle["samples_accepted"] + sum(cycle["samples_rejected"].values()) <= 12
        assert set(cycle["target_classes"]) <= set(CLASSES) and len(cycle["target_classes"]) == 3
        assert cycle["wall_seconds"] > 0 and set(cycle["val"]) == metrics
    accepted = sum(c["samples_accepted"] for c in report["cycles"])
    assert accepted == served and report["data"]["final_train"] == 72 + accepted
    usage = report["teacher"]["usage"]
    assert usage["calls"] == len(report["cycles"]) and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "labels.json").is_file()

    # the stored student evaluates to the report's final test numbers
    proc = subprocess.run([sys.executable, "-m", "pgkd.cli", "evaluate", "--model", str(out / "model"), "--data", test,
                           "--label-col", "category"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert round(json.loads(proc.stdout)["accuracy"], 4) == report["final"]["test"]["accuracy"]
