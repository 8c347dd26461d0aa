"""``pgkd dlq``: reading a dead letter, and the CLI's one-line errors (the replay itself:
tests/integration/test_dlq_replay.py)."""

import doctest
import json
import os
import subprocess
import sys

from streams import dlq
from streams.schemas import DeadLetter


def test_docstring_examples():
    result = doctest.testmod(dlq, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_dead_letter_the_workers_write_is_readable_for_a_replay():
    letter = DeadLetter.of(stage="inference", reason="inference_error", error="RuntimeError: boom", topic="texts.in",
                           partition=3, offset=99, value=b'{"id": "a", "text": "hi"}', ts=1.0, max_original_bytes=8,
                           id="a")
    value = dlq.read_letter(letter.dumps())
    assert value is not None and value["original_truncated"] and value["topic"] == "texts.in"
    assert dlq.Letter(3, 12, value).mark == "3:12:texts.in:3:99"  # the letter's place and its original's
    for bad in ({"ts": "soon"}, {"offset": True}, {"original_b64": None}):  # not what a worker writes
        assert dlq.read_letter(json.dumps(value | bad).encode()) is None, bad


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGKD_")} | env
    return subprocess.run([sys.executable, "-m", "pgkd.cli", "dlq", *args], env=clean, capture_output=True, text=True,
                          timeout=120)


def test_a_replay_names_the_stage_it_replays():
    done = run_cli("replay")
    assert done.returncode == 2 and "--stage" in done.stderr


def test_without_redis_the_cli_says_so_in_one_line():
    done = run_cli("summary", PGKD_REDIS_URL="redis://127.0.0.1:9/0", PGKD_KAFKA_BOOTSTRAP="127.0.0.1:9")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("pgkd: error: dlq summary: ") and "127.0.0.1:9" in line
