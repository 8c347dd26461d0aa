"""The teacher SIMULATOR: a test double at the LLM boundary, for offline runs.

An OpenAI-compatible HTTP server (``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health``) backed by a labelled pool instead of a
language model. It reads the same request block the real teacher sends
(:func:`pgkd.prompts.extract_request`), so tests, benchmarks and the demo
exercise the real ``openai`` client path end to end. Real runs point the
teacher at a real LLM; nothing here is one.

- Label requests: the pool's gold label of a known text (exact match after
  :func:`~pgkd.prompts.normalize_text`), else the label of the most similar
  pool text (IDF-weighted token overlap through an inverted index; ties go to
  the earlier pool row, so it is deterministic). With ``label_noise`` a text
  gets a wrong label, drawn uniformly from the other taxonomy labels; the draw
  is seeded by (seed, text), so the same text always gets the same answer
  whatever the order or concurrency of requests.
- Generation requests: unseen pool examples of the target classes, round-robin
  over the classes, without replacement for the server's lifetime.
- Usage: tokens estimated as ~4 characters each (:func:`~pgkd.prompts.estimate_tokens`).
- ``response_format`` (json_schema / json_object) gets bare JSON; a request
  without one gets the JSON inside a ```json fence with a line of prose, like
  a chat model without JSON mode.
- Fault injection for tests: ``fail_rate`` (HTTP 500), ``rate_limit_every``
  (every k-th request gets 429 with Retry-After), ``delay_s`` (slow answers),
  ``garbage_rate`` (non-JSON content), ``outside_taxonomy_rate`` (labels not in
  the taxonomy), ``echo_rate`` (the answer is the request's own user message,
  delimiters and data included: a model that leaks its prompt),
  ``supported_formats`` (others are refused with HTTP 400),
  ``api_key`` (other keys get 401, with the wrong key echoed in the message).

>>> from pgkd.data import LabelledTexts
>>> pool = LabelledTexts(("my card is lost", "refund my order"), ("lost_card", "refund"))
>>> with SimulatorServer(pool) as sim:
...     sim.url.startswith("http://127.0.0.1:")
True
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import random
import re
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pgkd.data import LabelledTexts
from pgkd.errors import ConfigError
from pgkd.prompts import RequestFormatError, estimate_tokens, extract_request, normalize_text

log = logging.getLogger(__name__)

OUTSIDE_LABEL = "__not_in_taxonomy__"  # what outside_taxonomy_rate answers with
GARBAGE = "I'm sorry, I can't help with that. (simulated non-JSON answer)"
MAX_BODY_BYTES = 32 * 1024 * 1024  # larger requests get 413
PROMPTS_REMEMBERED = 4096  # calls_by_prompt keeps the most recent prompts only
_TOKEN = re.compile(r"\w+")


class _PoolIndex:
    """The simulated teacher's knowledge: gold labels, a nearest-text index and
    the not-yet-served examples per class. Thread-safe."""

    def __init__(self, pool: LabelledTexts, seed: int):
        if len(pool) == 0:
            raise ConfigError("teacher simulator pool is empty; pass a labelled file with at least one row")
        self._texts, self._labels = pool.texts, pool.labels
        self._gold: dict[str, str] = {}
        postings: dict[str, list[int]] = defaultdict(list)
        for i, text in enumerate(pool.texts):
            key = normalize_text(text)
            self._gold.setdefault(key, pool.labels[i])
            for token in set(_TOKEN.findall(key)):
                postings[token].append(i)
        n = len(pool)
        # Tokens in more than half the pool ("my", "the") barely change the ranking
        # but dominate the work; leave them out of the index.
        self._postings = {t: rows for t, rows in postings.items() if len(rows) <= max(1, n // 2)}
        self._idf = {t: math.log(n / len(rows)) + 1.0 for t, rows in self._postings.items()}
        self._majority = Counter(pool.labels).most_common(1)[0][0]
        order = list(range(n))
        random.Random(seed).shuffle(order)
        self._unserved: dict[str, deque[int]] = defaultdict(deque)
        for i in order:
            self._unserved[pool.labels[i]].append(i)
        self._lock = threading.Lock()

    def label_of(self, text: str) -> str:
        key = normalize_text(text)
        if key in self._gold:
            return self._gold[key]
        scores: dict[int, float] = defaultdict(float)
        for token in set(_TOKEN.findall(key)):
            weight = self._idf.get(token)
            for row in self._postings.get(token, ()):
                scores[row] += weight  # type: ignore[operator]  # weight is set when postings are
        if not scores:
            return self._majority
        best = max(scores, key=lambda row: (scores[row], -row))
        return self._labels[best]

    def take(self, classes: Sequence[str], n: int, near: Sequence[dict] = ()) -> list[tuple[str, str]]:
        """Up to n unseen examples, round-robin over ``classes``, never served twice.

        ``near`` are the prompt's hard negatives ({"text", "label", "predicted"}).
        A real LLM shown them writes samples that contrast the student's confusions;
        the simulator imitates that by serving first, for each class, the unseen
        examples whose words overlap most with the hard negatives that involve that
        class (as gold label or as wrong prediction). Without them, the order is
        the seeded random one.
        """
        with self._lock:
            queues = []
            for c in dict.fromkeys(classes):
                queue = self._unserved.get(c)
                if not queue:
                    continue
                hint = {t for ex in near if c in (ex.get("label"), ex.get("predicted"))
                        for t in _TOKEN.findall(normalize_text(str(ex.get("text", ""))))}
                if hint:
                    ranked = sorted(queue, key=lambda row: -self._overlap(row, hint))  # stable: ties keep seeded order
                    queue.clear()
                    queue.extend(ranked)
                queues.append(queue)
            out: list[tuple[str, str]] = []
            while len(out) < n and any(queues):
                for queue in queues:
                    if queue and len(out) < n:
                        row = queue.popleft()
                        out.append((self._texts[row], self._labels[row]))
            return out

    def _overlap(self, row: int, tokens: set[str]) -> float:
        words = set(_TOKEN.findall(normalize_text(self._texts[row])))
        return sum(self._idf.get(t, 0.0) for t in words & tokens)

    def left(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._unserved.values())


class SimulatorServer:
    """The teacher simulator on a background thread; a context manager.

    ``url`` is the OpenAI base URL (``http://127.0.0.1:PORT/v1``); ``stats`` a
    snapshot of requests by kind, faults injected and calls per distinct prompt
    (``calls_by_prompt``: a client's tries of one request); ``close()`` stops it.
    """

    def __init__(
        self,
        pool: LabelledTexts,
        port: int = 0,
        label_noise: float = 0.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        model: str = "teacher-sim",
        fail_rate: float = 0.0,
        rate_limit_every: int = 0,
        retry_after_s: float = 1.0,
        delay_s: float = 0.0,
        garbage_rate: float = 0.0,
        outside_taxonomy_rate: float = 0.0,
        supported_formats: Sequence[str] = ("json_schema", "json_object"),
        api_key: str | None = None,
        echo_rate: float = 0.0,
    ):
        for name, rate in (("label_noise", label_noise), ("fail_rate", fail_rate),
                           ("garbage_rate", garbage_rate), ("outside_taxonomy_rate", outside_taxonomy_rate),
                           ("echo_rate", echo_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"teacher simulator {name} must be in [0, 1], got {rate}")
        for name, value in (("rate_limit_every", rate_limit_every), ("retry_after_s", retry_after_s),
                            ("delay_s", delay_s)):
            if value < 0:
                raise ConfigError(f"teacher simulator {name} must be >= 0, got {value}")
        self.model = model
        self.label_noise = label_noise
        self.seed = seed
        self.fail_rate = fail_rate
        self.rate_limit_every = rate_limit_every
        self.retry_after_s = retry_after_s
        self.delay_s = delay_s
        self.garbage_rate = garbage_rate
        self.outside_taxonomy_rate = outside_taxonomy_rate
        self.echo_rate = echo_rate
        self.supported_formats = frozenset(supported_formats)
        self._api_key = api_key  # None: any key is accepted, like a local vLLM or Ollama
        self._index = _PoolIndex(pool, seed)
        self._rng = random.Random(seed)  # fault draws; noise is seeded per text instead
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "chat_requests": 0,  # every POST to chat/completions, faulted ones included
            "requests": Counter(),  # by kind: label, generate, invalid, unauthorized, models, health, client_gone
            "faults": Counter(),  # http_500, http_429, garbage, echo, outside_taxonomy, delayed, format_rejected
            "texts_labelled": 0,
            "samples_served": 0,
            "in_flight": 0,
            "max_in_flight": 0,  # the most chat requests answered at once: checks a client's concurrency
        }
        # Calls per distinct prompt (a digest of the messages): a client's retries resend the same
        # messages, so this counts the tries of each request. Bounded: the latest PROMPTS_REMEMBERED.
        self._calls_by_prompt: OrderedDict[str, int] = OrderedDict()
        try:
            self._httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        except OSError as err:
            raise ConfigError(f"teacher simulator cannot listen on {host}:{port}: {err.strerror or err}") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="teacher-sim", daemon=True
        )
        self._thread.start()
        log.info("teacher simulator (a test double, not an LLM) listening on %s", self.url)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            snapshot = copy.deepcopy(self._stats)
            snapshot["calls_by_prompt"] = dict(self._calls_by_prompt)
        snapshot["requests"] = dict(snapshot["requests"])
        snapshot["faults"] = dict(snapshot["faults"])
        snapshot["pool_left"] = self._index.left()
        return snapshot

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> SimulatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SimulatorServer(url={self.url!r}, model={self.model!r}, label_noise={self.label_noise})"

    # --- answering ----------------------------------------------------------------

    def _count(self, section: str, key: str | None = None, by: int = 1) -> None:
        with self._lock:
            if key is None:
                self._stats[section] += by
            else:
                self._stats[section][key] += by

    def chat(self, body: Any, authorization: str = "") -> tuple[int, dict[str, str], dict[str, Any]]:
        """Answer one chat completion request: (HTTP status, extra headers, JSON body)."""
        with self._lock:
            self._stats["in_flight"] += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])
        try:
            return self._chat(body, authorization)
        finally:
            with self._lock:
                self._stats["in_flight"] -= 1

    def _chat(self, body: Any, authorization: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        prompt = _prompt_digest(body)
        with self._lock:
            self._stats["chat_requests"] += 1
            nth = self._stats["chat_requests"]
            self._calls_by_prompt[prompt] = self._calls_by_prompt.pop(prompt, 0) + 1
            if len(self._calls_by_prompt) > PROMPTS_REMEMBERED:
                self._calls_by_prompt.popitem(last=False)
            rate_limited = bool(self.rate_limit_every) and nth % self.rate_limit_every == 0
            failed = not rate_limited and self._rng.random() < self.fail_rate
            garbage = self._rng.random() < self.garbage_rate
            echo = not garbage and self.echo_rate > 0 and self._rng.random() < self.echo_rate
        if self._api_key is not None and authorization != f"Bearer {self._api_key}":
            self._count("requests", "unauthorized")
            # Echoes the key it got, as some real servers do: the client must not repeat it.
            return 401, {}, _error(f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}",
                                   "invalid_api_key")
        if rate_limited:
            self._count("faults", "http_429")
            wait = self.retry_after_s
            headers = {"Retry-After": f"{wait:g}", "retry-after-ms": str(round(wait * 1000))}
            return 429, headers, _error("simulated rate limit", "rate_limit_exceeded")
        if failed:
            self._count("faults", "http_500")
            return 500, {}, _error("simulated server error", "server_error")
        if self.delay_s:
            self._count("faults", "delayed")
            time.sleep(self.delay_s)

        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._count("requests", "invalid")
            return 400, {}, _error('request body needs a "messages" list', "invalid_request_error")
        fmt = body.get("response_format")
        fmt_type = fmt.get("type") if isinstance(fmt, dict) else None
        if fmt_type not in (None, "text") and fmt_type not in self.supported_formats:
            self._count("faults", "format_rejected")
            return 400, {}, _error(f"response_format {fmt_type!r} is not supported", "invalid_request_error")
        try:
            request = extract_request(body["messages"])
        except RequestFormatError as err:
            self._count("requests", "invalid")
            return 400, {}, _error(str(err), "invalid_request_error")

        if request["task"] == "label":
            answer = {"labels": [{"i": t["i"], "label": self._label(t["text"], request["taxonomy"])}
                                 for t in request["texts"]]}
            self._count("texts_labelled", by=len(request["texts"]))
        else:
            picked = self._index.take(request["target_classes"], request["n"], request.get("hard_negatives") or ())
            answer = {"samples": [{"text": text, "label": self._maybe_outside(label)} for text, label in picked]}
            self._count("samples_served", by=len(picked))
        self._count("requests", request["task"])

        content = json.dumps(answer, ensure_ascii=False)
        if garbage:
            self._count("faults", "garbage")
            content = GARBAGE
        elif echo:
            self._count("faults", "echo")
            content = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"][-1]["content"]
        elif fmt_type in (None, "text"):
            content = f"Here is the answer.\n```json\n{content}\n```"
        prompt_tokens = sum(estimate_tokens(str(m.get("content", ""))) for m in body["messages"] if isinstance(m, dict))
        completion_tokens = estimate_tokens(content)
        return 200, {}, {
            "id": f"chatcmpl-sim-{nth}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model", self.model)),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _label(self, text: str, taxonomy: Sequence[str]) -> str:
        label = self._index.label_of(text)
        if self.label_noise:
            rng = random.Random(f"{self.seed}|{normalize_text(text)}")
            others = sorted(set(taxonomy) - {label})
            if others and rng.random() < self.label_noise:
                label = rng.choice(others)
        return self._maybe_outside(label)

    def _maybe_outside(self, label: str) -> str:
        if self.outside_taxonomy_rate:
            with self._lock:
                outside = self._rng.random() < self.outside_taxonomy_rate
            if outside:
                self._count("faults", "outside_taxonomy")
                return OUTSIDE_LABEL
        return label

    def models(self) -> dict[str, Any]:
        self._count("requests", "models")
        return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "pgkd-teacher-simulator"}]}


def _prompt_digest(body: Any) -> str:
    """A short digest of a request's messages: the same prompt, whatever else changed."""
    messages = body.get("messages") if isinstance(body, dict) else body
    data = json.dumps(messages, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": kind}}


def _handler_for(sim: SimulatorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint behind the openai client
        server_version = "pgkd-teacher-simulator"

        def do_GET(self) -> None:
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                sim._count("requests", "health")
                self._send(200, {}, {"status": "ok", "simulator": True, "model": sim.model})
            elif path.endswith("/models"):
                self._send(200, {}, sim.models())
            else:
                self._send(404, {}, _error(f"no route GET {path}", "not_found"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True  # the unread body would corrupt a kept-alive connection
                self._send(413, {}, _error(f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error"))
                return
            raw = self.rfile.read(length)
            path = self.path.split("?")[0].rstrip("/")
            if not path.endswith("/chat/completions"):
                self._send(404, {}, _error(f"no route POST {path}", "not_found"))
                return
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                sim._count("requests", "invalid")
                self._send(400, {}, _error("request body is not JSON", "invalid_request_error"))
                return
            self._send(*sim.chat(body, self.headers.get("Authorization", "")))

        def _send(self, status: int, headers: dict[str, str], payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # the client gave up first (its timeout, a cancelled task): what a real endpoint sees
                # too. Counted, not a traceback on stderr; the connection cannot be reused.
                self.close_connection = True
                sim._count("requests", "client_gone")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  # stdlib's name
            log.debug("teacher-sim %s - " + format, self.address_string(), *args)

    return Handler


# --- command line -------------------------------------------------------------------

SIMULATOR_HELP = (
    "Run the teacher SIMULATOR: an OpenAI-compatible HTTP server backed by a labelled pool, "
    "a test double for offline runs, not an LLM. Real runs point the teacher at a real LLM."
)


def _rate(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return rate


def add_simulator_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``teacher-sim`` arguments to ``parser`` (the ``pgkd`` CLI wires it)."""
    parser.description = parser.description or SIMULATOR_HELP
    parser.add_argument("--pool", required=True, help="labelled CSV or JSONL the simulator answers from")
    parser.add_argument("--text-col", required=True,
                        help="text column; several are comma-separated and joined, e.g. title,description")
    parser.add_argument("--label-col", required=True, help="label column")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8089, help="port (0 = pick a free one); default 8089")
    parser.add_argument("--model", default="teacher-sim", help="model name listed by /v1/models")
    parser.add_argument("--label-noise", type=_rate, default=0.0, help="fraction of wrong labels (seeded)")
    parser.add_argument("--seed", type=int, default=0)
    faults = parser.add_argument_group("fault injection (for tests)")
    faults.add_argument("--fail-rate", type=_rate, default=0.0, help="fraction of requests answered HTTP 500")
    faults.add_argument("--rate-limit-every", type=int, default=0, help="every k-th request gets HTTP 429 (0 = off)")
    faults.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After of the 429 answers")
    faults.add_argument("--delay-s", type=float, default=0.0, help="seconds to wait before each answer")
    faults.add_argument("--garbage-rate", type=_rate, default=0.0, help="fraction of answers that are not JSON")
    faults.add_argument("--outside-taxonomy-rate", type=_rate, default=0.0,
                        help="fraction of labels replaced by one outside the taxonomy")
    faults.add_argument("--echo-rate", type=_rate, default=0.0,
                        help="fraction of answers that echo the request's user message (a prompt leak)")


def run_simulator(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit code.

    Bad input (missing file or column) raises the named error of :mod:`pgkd.data`.
    """
    from pgkd.data import load_labelled

    text_cols = [c.strip() for c in args.text_col.split(",") if c.strip()]
    pool = load_labelled(args.pool, text_cols, args.label_col)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SimulatorServer(
            pool, port=args.port, host=args.host, model=args.model, label_noise=args.label_noise, seed=args.seed,
            fail_rate=args.fail_rate, rate_limit_every=args.rate_limit_every, retry_after_s=args.retry_after_s,
            delay_s=args.delay_s, garbage_rate=args.garbage_rate, outside_taxonomy_rate=args.outside_taxonomy_rate,
            echo_rate=args.echo_rate,
        ) as sim:
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("teacher simulator is bound to %s, reachable beyond this machine", args.host)
            print(f"teacher simulator (test double, not an LLM): {len(pool)} texts, {len(pool.classes())} classes, "
                  f"base URL {sim.url}", flush=True)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def serve(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m pgkd.simulator --pool F ...``."""
    from pgkd.errors import PGKDError

    parser = argparse.ArgumentParser(prog="pgkd-teacher-sim", description=SIMULATOR_HELP)
    add_simulator_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_simulator(args)
    except PGKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main() -> None:
    raise SystemExit(serve())


if __name__ == "__main__":
    main()
