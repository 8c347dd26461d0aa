"""The demo's process handling and formatting, without Kafka: every process it
starts dies with its children, and the progress lines read right."""

from __future__ import annotations

import os
import sys
import time

from streams.demo import Procs, Progress, _accuracy_text, _round_text


def test_stop_all_ends_each_process_group_children_included(tmp_path):
    procs = Procs()
    # a leader that ignores SIGTERM and leaves a grandchild: SIGKILL to the group takes both
    script = "import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print(child.pid, flush=True); time.sleep(60)"
    proc = procs.start("stubborn", [sys.executable, "-c", script], dict(os.environ), tmp_path / "stubborn.log")
    deadline = time.monotonic() + 20
    while not proc.tail().strip():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child = int(proc.tail().split()[0])
    started = time.monotonic()
    procs.stop_all(grace_s=1.0)
    assert not proc.alive() and time.monotonic() - started < 15
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the grandchild {child} survived")


def test_round_and_accuracy_lines():
    promoted = {"round": 2, "outcome": "promoted", "candidate": "v0003",
                "metrics": {"current": {"macro_f1": 0.5}, "candidate": {"macro_f1": 0.61}}}
    rejected = {"round": 3, "outcome": "rejected", "candidate": "v0004", "gate": {"reasons": ["macro-F1 down"]},
                "metrics": {"current": {"macro_f1": 0.61}, "candidate": {"macro_f1": 0.6}}}
    failed = {"round": 4, "outcome": "failed", "error": "RuntimeError: boom"}
    assert _round_text(promoted) == "#2 promoted v0003 macro-F1 0.500 -> 0.610"
    assert _round_text(rejected) == "#3 rejected v0004 macro-F1 0.610 -> 0.600 (macro-F1 down)"
    assert _round_text(failed) == "#4 failed (RuntimeError: boom)"
    progress = Progress()
    progress.answered.update({"v0002": 10, "v0001": 4})
    progress.correct.update({"v0002": 7, "v0001": 1})
    progress.first_seen.update({"v0001": 1.0, "v0002": 2.0})
    assert _accuracy_text(progress) == "v0001 25.0% of 4 | v0002 70.0% of 10"
