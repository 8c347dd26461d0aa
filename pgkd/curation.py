"""The curator's logic: which teacher labels become training data, when a batch
is full, which classes the teacher should write samples for, and the durable
sample store in Redis that the trainer reads.

Pure functions first (tests call them without Redis), then :class:`SampleStore`
and :class:`CuratorState`, the curator's shared state in Redis:

``{ns}:curator:samples``      stream: every accepted sample with its provenance (the trainer reads it)
``{ns}:curator:seen``         set: sha256 of every accepted normalised text (a text enters training once)
``{ns}:curator:totals``       hash: accepted samples by source (``teacher``, ``generated``)
``{ns}:curator:class_stats``  hash: per teacher label, ``<label>|n`` and ``<label>|agree`` (student == teacher)
``{ns}:curator:batch``        hash: the open batch: ``teacher`` (samples in it), ``opened_at``
``{ns}:curator:closing``      string: the batch being closed (JSON), so a curator restarted mid-close resumes it
``{ns}:curator:requests``     list: every retrain request published (JSON), oldest first
``{ns}:curator:close_lock``   string, TTL: one curator closes a batch at a time

Accepting a sample is one Lua script (check the seen set, add the text hash,
append to the stream, count): a curator killed mid-batch never leaves a text
marked seen but not stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pgkd.data import LabelledTexts
from pgkd.mining import Mined, mine_examples
from pgkd.prompts import normalize_text
from pgkd.report import weakest_classes

SOURCES = ("teacher", "generated")
TRIGGERS = ("size", "window", "drift")
# why a sample did not enter the training data (pgkd_samples_dropped_total{reason})
DROP_REASONS = (
    "duplicate",  # the same normalised text was accepted before, or is in the seed training set
    "eval_collision",  # the text is in the validation or test set
    "outside_taxonomy",  # a teacher label the student has no output for
    "bad_record",  # an unreadable teacher.labels record
    # a generated sample the teacher's answer validation dropped (pgkd.prompts.parse_samples)
    "invalid_json", "malformed_sample", "label_outside_taxonomy", "not_target_class", "empty_text",
    "duplicate_text", "known_text", "prompt_echo",
)


def sample_hash(text: str) -> str:
    """sha256 of the normalised text: the identity of a training sample.

    >>> sample_hash("Where is  MY card?") == sample_hash("where is my card?")
    True
    """
    return hashlib.sha256(normalize_text(text).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Sample:
    """One accepted training sample and where it came from."""

    id: str  # the texts.in id (teacher) or "gen-<request>-<i>" (generated)
    text: str
    label: str
    source: str  # "teacher" | "generated"
    teacher_model: str
    model_version: str  # the student version that routed it (teacher) / whose report prompted it (generated)
    ts: float  # when it was accepted
    student_label: str | None = None  # teacher samples: what the student said
    student_confidence: float | None = None
    request_id: str | None = None  # generated samples: the retrain request they were written for

    def fields(self) -> dict[str, str]:
        """Redis stream fields (strings; None left out)."""
        return {k: str(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Sample:
        get = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
               for k, v in raw.items()}
        confidence = get.get("student_confidence")
        return cls(
            id=get["id"], text=get["text"], label=get["label"], source=get["source"],
            teacher_model=get.get("teacher_model", ""), model_version=get.get("model_version", ""),
            ts=float(get.get("ts", 0.0)), student_label=get.get("student_label"),
            student_confidence=float(confidence) if confidence is not None else None,
            request_id=get.get("request_id"),
        )


@dataclass(frozen=True)
class TextGuard:
    """Texts that must not enter training as new samples: the seed training set
    (already there: ``duplicate``) and the validation / test sets (``eval_collision``).

    >>> guard = TextGuard.of(train=["I lost my card"], evaluation=["Card arrived?"])
    >>> guard.check("i lost my  CARD"), guard.check("card arrived?"), guard.check("new text")
    ('duplicate', 'eval_collision', None)
    """

    train: frozenset[str]
    evaluation: frozenset[str]

    @classmethod
    def of(cls, train: Iterable[str], evaluation: Iterable[str]) -> TextGuard:
        return cls(frozenset(map(sample_hash, train)), frozenset(map(sample_hash, evaluation)))

    def check(self, text: str) -> str | None:
        h = sample_hash(text)
        if h in self.evaluation:
            return "eval_collision"
        if h in self.train:
            return "duplicate"
        return None


@dataclass(frozen=True)
class ClassStats:
    """Live per-class counts from ``teacher.labels``: ``n`` teacher labels of the
    class, ``agree`` of them where the student had said the same."""

    n: int
    agree: int

    @property
    def agreement(self) -> float:
        return self.agree / self.n if self.n else 0.0


def parse_class_stats(raw: Mapping[Any, Any]) -> dict[str, ClassStats]:
    """The ``class_stats`` hash (``<label>|n``, ``<label>|agree``) -> label -> ClassStats.

    >>> parse_class_stats({b"a|n": b"4", b"a|agree": b"3", "b|n": "2"})
    {'a': ClassStats(n=4, agree=3), 'b': ClassStats(n=2, agree=0)}
    """
    counts: dict[str, dict[str, int]] = {}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        label, _, kind = key.rpartition("|")
        counts.setdefault(label, {})[kind] = int(value)
    return {label: ClassStats(c.get("n", 0), c.get("agree", 0)) for label, c in sorted(counts.items())}


def class_scores(report: dict | None, stats: Mapping[str, ClassStats], min_count: int) -> dict[str, float]:
    """How well the student does on each class, 0 (bad) to 1: its validation F1
    (the current version's last report), averaged with the live student-teacher
    agreement once the class has ``min_count`` teacher labels. A class known only
    from one of the two gets that one.

    >>> report = {"per_class": {"a": {"f1": 0.9, "support": 5}, "b": {"f1": 0.6, "support": 5}}}
    >>> class_scores(report, {"a": ClassStats(10, 3), "c": ClassStats(1, 0)}, min_count=3)
    {'a': 0.6, 'b': 0.6}
    """
    scores: dict[str, float] = {}
    rows = (report or {}).get("per_class") or {}
    for label, row in rows.items():
        if row.get("support", 0) > 0:
            scores[label] = float(row["f1"])
    for label, s in stats.items():
        if s.n < min_count:
            continue
        scores[label] = (scores[label] + s.agreement) / 2 if label in scores else s.agreement
    return {label: round(score, 6) for label, score in sorted(scores.items())}


def pick_weakest(report: dict | None, stats: Mapping[str, ClassStats], k: int, min_count: int) -> list[str]:
    """The ``k`` weakest classes by :func:`class_scores`; ties go to the class
    with fewer teacher labels, then the name.

    >>> report = {"per_class": {"a": {"f1": 0.9, "support": 5}, "b": {"f1": 0.6, "support": 5},
    ...                         "c": {"f1": 0.7, "support": 5}}}
    >>> pick_weakest(report, {"a": ClassStats(10, 2)}, k=2, min_count=3)   # a: (0.9 + 0.2) / 2
    ['a', 'b']
    """
    scores = class_scores(report, stats, min_count)
    if not scores and report:
        return weakest_classes(report, k)
    ranked = sorted(scores, key=lambda label: (scores[label], stats.get(label, ClassStats(0, 0)).n, label))
    return ranked[: max(k, 0)]


def live_report(stats: Mapping[str, ClassStats]) -> dict:
    """A stand-in for the validation report when the current version has none:
    the live agreement as recall (teacher labels the student got right) and F1.
    Good enough for the prompt's table; never used for the gate."""
    per_class = {label: {"precision": s.agreement, "recall": s.agreement, "f1": s.agreement, "support": s.n}
                 for label, s in stats.items() if s.n}
    n = sum(s.n for s in stats.values())
    agree = sum(s.agree for s in stats.values())
    macro = float(np.mean([row["f1"] for row in per_class.values()])) if per_class else 0.0
    return {"accuracy": agree / n if n else 0.0, "macro_f1": macro, "weighted_f1": agree / n if n else 0.0,
            "n": n, "per_class": per_class}


def mine_from_samples(samples: Sequence[Sample], labels: Sequence[str], n: int, seed: int = 0) -> Mined:
    """The prompt's examples from the batch's teacher samples, with the teacher's
    label as the truth: hard negatives (the student disagreed, most confident
    first), other misclassified ones and correct ones (round-robin over classes),
    as :func:`pgkd.mining.mine_examples` picks them from a validation set.

    >>> s = [Sample("1", "sure wrong", "b", "teacher", "t", "v1", 0.0, "a", 0.95),
    ...      Sample("2", "unsure wrong", "b", "teacher", "t", "v1", 0.0, "a", 0.55),
    ...      Sample("3", "right", "a", "teacher", "t", "v1", 0.0, "a", 0.8)]
    >>> m = mine_from_samples(s, ["a", "b"], n=1)
    >>> [e.text for e in m.hard_negatives], [e.text for e in m.misclassified], [e.text for e in m.correct]
    (['sure wrong'], ['unsure wrong'], ['right'])
    """
    index = {label: i for i, label in enumerate(labels)}
    usable = [s for s in samples if s.student_label in index and s.label in index]
    if not usable:
        return Mined([], [], [])
    # the student's top-1 at its confidence; the rest of the mass spread below it (only the top-1 matters)
    probs = np.empty((len(usable), len(labels)), dtype=np.float64)
    for row, s in enumerate(usable):
        confidence = float(s.student_confidence or 0.0)
        probs[row] = (1.0 - confidence) / max(1, len(labels) - 1) * (1 - 1e-6)
        probs[row, index[s.student_label]] = confidence
    data = LabelledTexts(tuple(s.text for s in usable), tuple(s.label for s in usable))
    return mine_examples(data, probs, labels, n=n, seed=seed)


@dataclass(frozen=True)
class BatchPolicy:
    """When the open batch closes (the ``curator_*`` settings)."""

    size: int  # accepted teacher samples
    window_s: float  # seconds after the batch opened (0 = off)
    drift: bool  # a drift alarm newer than the last request

    def trigger(self, pending: int, opened_at: float | None, now: float, drift_ts: float | None,
                last_request_ts: float | None) -> str | None:
        """``size``, ``window``, ``drift`` or None (stay open). An empty batch never closes.

        >>> policy = BatchPolicy(size=100, window_s=60, drift=True)
        >>> policy.trigger(100, 0.0, 1.0, None, None), policy.trigger(3, 0.0, 61.0, None, None)
        ('size', 'window')
        >>> policy.trigger(3, 50.0, 60.0, drift_ts=55.0, last_request_ts=40.0)
        'drift'
        >>> policy.trigger(3, 50.0, 60.0, drift_ts=30.0, last_request_ts=40.0) is None   # an old alarm
        True
        >>> policy.trigger(0, None, 1e9, drift_ts=1e9, last_request_ts=None) is None
        True
        """
        if pending <= 0:
            return None
        if pending >= self.size:
            return "size"
        if self.window_s and opened_at is not None and now - opened_at >= self.window_s:
            return "window"
        if self.drift and drift_ts is not None and (last_request_ts is None or drift_ts > last_request_ts):
            return "drift"
        return None


@dataclass
class Closing:
    """A batch being closed: what the retrain request will say. Saved in Redis
    before the slow steps, so a curator restarted mid-close publishes the same
    request (same id and round) instead of a second one."""

    request_id: str
    round: int
    trigger: str
    teacher: int  # teacher samples in this batch
    opened_at: float | None
    since: str  # stream id after which this batch's samples start ("0-0" for the first)
    model_version: str | None  # the version the batch was judged against
    target_classes: list[str] = field(default_factory=list)
    generation: dict | None = None  # {"requested", "accepted", "rejected", "skipped", "cost_usd"} once done
    ts: float = field(default_factory=time.time)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> Closing:
        return cls(**json.loads(raw))


# --- Redis ----------------------------------------------------------------------------------

# KEYS: seen, samples, totals, batch. ARGV: hash, source, is_teacher ("1"/"0"), now, then field/value pairs.
# Returns the stream id, or false when the text was accepted before.
_ACCEPT = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[4], 'teacher', 1)
  redis.call('HSETNX', KEYS[4], 'opened_at', ARGV[4])
end
return id
"""


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SampleStore:
    """The accepted samples (read side): what the trainer trains on besides the seed set."""

    def __init__(self, client, namespace: str = "pgkd"):
        self._redis = client  # redis.asyncio.Redis
        self.namespace = namespace

    def key(self, name: str) -> str:
        return f"{self.namespace}:curator:{name}"

    async def read(self, upto: str | None = None, since: str | None = None, chunk: int = 5000) -> list[Sample]:
        """Samples accepted after stream id ``since`` (exclusive) up to ``upto``
        (inclusive; None = everything), oldest first."""
        out: list[Sample] = []
        start = f"({since}" if since and since != "0-0" else "-"
        end = upto or "+"
        while True:
            entries = await self._redis.xrange(self.key("samples"), start, end, count=chunk)
            out.extend(Sample.from_fields(fields) for _id, fields in entries)
            if len(entries) < chunk:
                return out
            start = f"({_str(entries[-1][0])}"

    async def last_id(self) -> str:
        entries = await self._redis.xrevrange(self.key("samples"), "+", "-", count=1)
        return _str(entries[0][0]) if entries else "0-0"

    async def totals(self) -> dict[str, int]:
        raw = await self._redis.hgetall(self.key("totals"))
        return {source: int(raw.get(source.encode(), raw.get(source, 0)) or 0) for source in SOURCES}


class CuratorState(SampleStore):
    """The curator's shared state (write side), on an async Redis client.

    Redis errors are raised: without its store the curator must not acknowledge
    what it read (the agent exits and a restart redelivers)."""

    def __init__(self, client, namespace: str = "pgkd"):
        super().__init__(client, namespace)
        self._accept = client.register_script(_ACCEPT)

    async def accept(self, sample: Sample) -> str | None:
        """Store ``sample`` unless its text was accepted before; returns its stream id (None: a duplicate)."""
        keys = [self.key("seen"), self.key("samples"), self.key("totals"), self.key("batch")]
        pairs = [x for kv in sample.fields().items() for x in kv]
        is_teacher = "1" if sample.source == "teacher" else "0"
        result = await self._accept(keys=keys, args=[sample_hash(sample.text), sample.source, is_teacher,
                                                     repr(time.time()), *pairs])
        return _str(result) if result else None

    async def count_labels(self, pairs: Iterable[tuple[str, bool]]) -> None:
        """Live statistics: one (teacher label, student agreed) per teacher.labels record."""
        counts: Counter[str] = Counter()
        for label, agreed in pairs:
            counts[f"{label}|n"] += 1
            counts[f"{label}|agree"] += int(agreed)
        if not counts:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, by in counts.items():
                pipe.hincrby(self.key("class_stats"), name, by)
            await pipe.execute()

    async def class_stats(self) -> dict[str, ClassStats]:
        return parse_class_stats(await self._redis.hgetall(self.key("class_stats")))

    async def batch(self) -> tuple[int, float | None]:
        """(teacher samples in the open batch, when it opened)."""
        raw = {_str(k): _str(v) for k, v in (await self._redis.hgetall(self.key("batch"))).items()}
        return int(raw.get("teacher", 0)), float(raw["opened_at"]) if "opened_at" in raw else None

    async def last_request(self) -> dict | None:
        raw = await self._redis.lindex(self.key("requests"), -1)
        return json.loads(raw) if raw else None

    async def requests(self, limit: int = 50) -> list[dict]:
        return [json.loads(r) for r in await self._redis.lrange(self.key("requests"), -limit, -1)]

    async def closing(self) -> Closing | None:
        raw = await self._redis.get(self.key("closing"))
        return Closing.loads(raw) if raw else None

    async def save_closing(self, closing: Closing) -> None:
        await self._redis.set(self.key("closing"), closing.dumps())

    async def finish_closing(self, closing: Closing, request: dict) -> None:
        """The request is on the broker: record it, take its samples out of the open
        batch (samples another curator added meanwhile stay), forget the close.
        One Lua call: a curator killed halfway cannot take the samples out twice."""
        keys = [self.key("batch"), self.key("requests"), self.key("closing")]
        await self._redis.eval(_FINISH_CLOSING, 3, *keys, closing.teacher, json.dumps(request), repr(time.time()))

    async def lock_close(self, owner: str, ttl_s: float) -> bool:
        return bool(await self._redis.set(self.key("close_lock"), owner, nx=True, px=max(1, int(ttl_s * 1000))))

    async def renew_close(self, owner: str, ttl_s: float) -> bool:
        """Extend the close lock while ``owner`` still holds it; False when it lapsed."""
        return bool(await self._redis.eval(_RENEW_IF_OWNER, 1, self.key("close_lock"), owner,
                                           max(1, int(ttl_s * 1000))))

    async def unlock_close(self, owner: str) -> None:
        if _str(await self._redis.get(self.key("close_lock")) or b"") == owner:
            await self._redis.delete(self.key("close_lock"))


# KEYS: batch, requests, closing; ARGV: the close's teacher samples, the request (JSON), now
_FINISH_CLOSING = """
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
local left = redis.call('HINCRBY', KEYS[1], 'teacher', -tonumber(ARGV[1]))
redis.call('RPUSH', KEYS[2], ARGV[2])
if left <= 0 then redis.call('DEL', KEYS[1]) else redis.call('HSET', KEYS[1], 'opened_at', ARGV[3]) end
redis.call('DEL', KEYS[3])
return left
"""

# KEYS: the lock; ARGV: owner, ttl in ms
_RENEW_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
