"""The teacher simulator over plain HTTP (the openai client path is in test_teacher.py)."""

import argparse
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pgkd.data import LabelledTexts
from pgkd.errors import ConfigError
from pgkd.mining import Mined
from pgkd.prompts import build_generation_messages, build_label_messages, label_response_format
from pgkd import simulator
from pgkd.simulator import OUTSIDE_LABEL, SimulatorServer, add_simulator_args

POOL = LabelledTexts(
    (
        "I still have not received my new card",
        "When will my card arrive?",
        "My card was stolen yesterday",
        "I lost my card on the bus",
        "I want my money back for this order",
        "Please refund the purchase",
        "Can I get a refund for the ticket?",
    ),
    ("card_arrival", "card_arrival", "card_lost", "card_lost", "refund", "refund", "refund"),
)
TAXONOMY = POOL.classes()
NO_EXAMPLES = Mined([], [], [])


def post(sim, messages, response_format=None, path="/chat/completions"):
    body = {"model": "teacher-sim", "messages": messages}
    if response_format is not None:
        body["response_format"] = response_format
    request = urllib.request.Request(sim.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def answer(sim, messages, response_format={"type": "json_object"}):  # noqa: B006  # read-only
    status, _, body = post(sim, messages, response_format)
    assert status == 200, body
    return json.loads(body["choices"][0]["message"]["content"])


def labels(sim, texts):
    return [x["label"] for x in answer(sim, build_label_messages(texts, TAXONOMY))["labels"]]


def generate(sim, targets, n):
    msgs = build_generation_messages(TAXONOMY, targets, n, "report", NO_EXAMPLES)
    return [(s["text"], s["label"]) for s in answer(sim, msgs)["samples"]]


def test_health_models_and_loopback_binding():
    with SimulatorServer(POOL, model="sim-x") as sim:
        assert sim.url.startswith("http://127.0.0.1:") and sim.url.endswith("/v1")
        root = sim.url.removesuffix("/v1")
        with urllib.request.urlopen(root + "/health") as resp:
            assert json.loads(resp.read()) == {"status": "ok", "simulator": True, "model": "sim-x"}
        with urllib.request.urlopen(sim.url + "/models") as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["sim-x"]
        assert sim.stats["requests"] == {"health": 1, "models": 1}


def test_label_gold_for_known_texts_and_nearest_for_unknown():
    with SimulatorServer(POOL) as sim:
        assert labels(sim, ["  when will my CARD arrive? ", "Please refund the purchase"]) == ["card_arrival", "refund"]
        # unseen texts: the label of the most similar pool text; no overlap at all: the majority label
        assert labels(sim, ["the card got stolen", "refund please", "zzz qqq"]) == ["card_lost", "refund", "refund"]
        stats = sim.stats
        assert stats["requests"] == {"label": 2} and stats["texts_labelled"] == 5


def test_answer_carries_openai_fields_and_estimated_usage():
    with SimulatorServer(POOL) as sim:
        status, _, body = post(sim, build_label_messages(["Please refund the purchase"], TAXONOMY),
                               label_response_format(TAXONOMY))
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 50 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_without_response_format_the_json_comes_fenced_in_prose():
    with SimulatorServer(POOL) as sim:
        _, _, body = post(sim, build_label_messages(["Please refund the purchase"], TAXONOMY))
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("Here is the answer.\n```json\n") and content.endswith("\n```")


def test_label_noise_is_seeded_per_text_and_near_its_rate():
    texts = [f"{t} number {i}" for i in range(100) for t in POOL.texts[:1]]
    with SimulatorServer(POOL, label_noise=0.3, seed=1) as sim:
        first = labels(sim, texts)
        assert labels(sim, list(reversed(texts))) == list(reversed(first))  # order does not matter
    wrong = sum(label != "card_arrival" for label in first)
    assert 15 <= wrong <= 45
    with SimulatorServer(POOL, label_noise=0.3, seed=1) as sim:
        assert labels(sim, texts) == first  # same seed, same answers


def test_generation_round_robin_without_replacement():
    with SimulatorServer(POOL) as sim:
        first = generate(sim, ["refund", "card_lost"], 4)
        assert [label for _, label in first] == ["refund", "card_lost", "refund", "card_lost"]
        rest = generate(sim, ["refund", "card_lost"], 10)  # only one refund left
        assert [label for _, label in rest] == ["refund"]
        assert generate(sim, ["refund", "card_lost"], 3) == []
        served = first + rest
        assert len({text for text, _ in served}) == len(served) == 5
        assert all(POOL.labels[POOL.texts.index(text)] == label for text, label in served)
        assert sim.stats["samples_served"] == 5 and sim.stats["pool_left"] == 2


def test_rate_limit_every_kth_request_with_retry_after():
    with SimulatorServer(POOL, rate_limit_every=2, retry_after_s=0.25) as sim:
        msgs = build_label_messages(["x"], TAXONOMY)
        assert post(sim, msgs)[0] == 200
        status, headers, body = post(sim, msgs)
        assert status == 429 and headers["Retry-After"] == "0.25" and headers["retry-after-ms"] == "250"
        assert body["error"]["message"] == "simulated rate limit"
        assert post(sim, msgs)[0] == 200
        assert sim.stats["faults"] == {"http_429": 1} and sim.stats["chat_requests"] == 3


def test_calls_are_counted_per_prompt_and_only_the_latest_prompts_are_kept(monkeypatch):
    monkeypatch.setattr(simulator, "PROMPTS_REMEMBERED", 2)
    with SimulatorServer(POOL, fail_rate=1.0) as sim:
        a, b, c = (build_label_messages([text], TAXONOMY) for text in ("one", "two", "three"))
        for msgs in (a, a, b, a):  # a client retrying a; b once
            assert post(sim, msgs)[0] == 500
        counts = sim.stats["calls_by_prompt"]
        assert sorted(counts.values()) == [1, 3] and sim.stats["chat_requests"] == 4
        key_a, key_b = (next(k for k, n in counts.items() if n == calls) for calls in (3, 1))
        post(sim, c)  # the least recently called prompt (b) is forgotten
        later = sim.stats["calls_by_prompt"]
        assert len(later) == 2 and later[key_a] == 3 and key_b not in later


def test_a_client_that_hangs_up_before_the_answer_is_counted_not_a_traceback(capsys):
    body = json.dumps({"model": "m", "messages": build_label_messages(["my card?"], TAXONOMY)}).encode()
    with SimulatorServer(POOL, delay_s=0.3) as sim:
        host, port = sim.url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.05)  # the server has the request and is "thinking" (delay_s)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        deadline = time.monotonic() + 5
        while sim.stats["requests"].get("client_gone", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.stats["requests"]["client_gone"] == 1
        assert labels(sim, ["When will my card arrive?"]) == ["card_arrival"]  # still serving
    assert "Traceback" not in capsys.readouterr().err


def test_faults_500_garbage_outside_taxonomy():
    msgs = build_label_messages(["Please refund the purchase"], TAXONOMY)
    with SimulatorServer(POOL, fail_rate=1.0) as sim:
        status, _, body = post(sim, msgs)
        assert status == 500 and body["error"]["message"] == "simulated server error"
    with SimulatorServer(POOL, garbage_rate=1.0) as sim:
        _, _, body = post(sim, msgs, {"type": "json_object"})
        with pytest.raises(json.JSONDecodeError):
            json.loads(body["choices"][0]["message"]["content"])
    with SimulatorServer(POOL, outside_taxonomy_rate=1.0) as sim:
        assert labels(sim, ["Please refund the purchase"]) == [OUTSIDE_LABEL]
        assert generate(sim, ["refund"], 1)[0][1] == OUTSIDE_LABEL
        assert sim.stats["faults"] == {"outside_taxonomy": 2}


def test_bad_requests_get_400_with_a_reason():
    with SimulatorServer(POOL, supported_formats=("json_object",)) as sim:
        status, _, body = post(sim, [{"role": "user", "content": "label this: hello"}])
        assert status == 400 and "expected exactly one <<<PGKD_REQUEST" in body["error"]["message"]
        status, _, body = post(sim, build_label_messages(["x"], TAXONOMY), label_response_format(TAXONOMY))
        assert status == 400 and body["error"]["message"] == "response_format 'json_schema' is not supported"
        assert post(sim, build_label_messages(["x"], TAXONOMY), path="/completions")[0] == 404
        assert sim.stats["faults"] == {"format_rejected": 1} and sim.stats["requests"] == {"invalid": 1}


def test_invalid_settings_are_named():
    with pytest.raises(ConfigError, match=r"^teacher simulator label_noise must be in \[0, 1\], got 1.5$"):
        SimulatorServer(POOL, label_noise=1.5)
    with pytest.raises(ConfigError, match="^teacher simulator pool is empty"):
        SimulatorServer(LabelledTexts((), ()))
    with SimulatorServer(POOL) as sim:
        port = int(sim.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(ConfigError, match=f"^teacher simulator cannot listen on 127.0.0.1:{port}: "):
            SimulatorServer(POOL, port=port)


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_simulator_args(parser)
    args = parser.parse_args(["--pool", "p.csv", "--text-col", "title,body", "--label-col", "y", "--label-noise",
                              "0.1", "--fail-rate", "0.2", "--rate-limit-every", "3"])
    assert (args.host, args.port, args.label_noise, args.seed) == ("127.0.0.1", 8089, 0.1, 0)
    assert (args.fail_rate, args.rate_limit_every, args.garbage_rate) == (0.2, 3, 0.0)
    assert "SIMULATOR" in parser.description and "test double" in parser.description
    with pytest.raises(SystemExit):
        parser.parse_args(["--pool", "p", "--text-col", "t", "--label-col", "y", "--label-noise", "2"])


def test_cli_serves_until_sigterm(tmp_path: Path):
    pool = tmp_path / "pool.csv"
    pool.write_text("text,category\n" + "\n".join(f"{t},{y}" for t, y in zip(POOL.texts, POOL.labels)) + "\n")
    with subprocess.Popen(
        [sys.executable, "-m", "pgkd.simulator", "--pool", str(pool), "--text-col", "text", "--label-col", "category",
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            line = proc.stdout.readline()
            assert line.startswith(
                "teacher simulator (test double, not an LLM): 7 texts, 3 classes, base URL http://127.0.0.1:"
            )
            url = line.split("base URL ")[1].strip()
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as resp:
                assert json.loads(resp.read())["status"] == "ok"
            proc.terminate()
            assert proc.wait(timeout=10) == 0
        finally:
            proc.kill()


def test_cli_bad_pool_is_one_line_error(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "pgkd.simulator", "--pool", str(tmp_path / "missing.csv"), "--text-col", "text",
         "--label-col", "category"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: data file not found: {tmp_path / 'missing.csv'}"]


def test_generation_prefers_examples_near_the_hard_negatives():
    from pgkd.mining import Example

    hard = Example("refund for my ticket please", label="refund", predicted="card_lost", confidence=0.9)
    refunds = {t for t, label in zip(POOL.texts, POOL.labels) if label == "refund"}

    def first(sim, mined):
        msgs = build_generation_messages(TAXONOMY, ["refund"], 1, "report", mined)
        return answer(sim, msgs)["samples"][0]["text"]

    with SimulatorServer(POOL, seed=0) as plain, SimulatorServer(POOL, seed=0) as guided:
        assert first(guided, Mined([], [], [hard])) == "Can I get a refund for the ticket?"
        # without hard negatives the order is the seeded shuffle
        assert first(plain, NO_EXAMPLES) in refunds
