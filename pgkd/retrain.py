"""One retrain round of the continual loop, from a retrain request to the registry.

    current   = the registry's current version (verified), on the trainer's device
    train set = the seed training set + every accepted sample up to the request
    candidate = a clone of current, trained on it (full fine-tune, or head only)
    gate      = both versions scored on the gold validation set (pgkd.gate)
                (head only: on the encoder's outputs, kept between rounds by
                the runner's pgkd.features.FeatureCache)
    publish   = the candidate is stored as a version, passed or not (for audit)
    promote   = only if the gate passed
    record    = the round: counts, both versions' metrics, the gate's decision

:class:`RoundRunner` adds what makes a round run to completion once: a claim in
the registry, and a ledger in Redis that a restarted trainer reads. A trainer
killed mid-round leaves the ledger saying "running"; the next trainer to hold
the single-trainer lock (:class:`TrainerLock`) sees that, and retries the round
(up to ``trainer_max_attempts``) or records it as failed. The pointer never
points at a partial version: publishing is atomic and a version is promoted
only after it was published and verified.

Plain Python; the trainer worker (``streams/trainer.py``) runs it in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from pgkd.curation import Sample, TextGuard, sample_hash
from pgkd.data import LabelledTexts, load_labelled
from pgkd.drift import reference_from_predictions
from pgkd.errors import ConfigError, RegistryUnavailable, first_line
from pgkd.gate import GateConfig, GateDecision, evaluate_gate
from pgkd.report import classification_report, headline

if TYPE_CHECKING:
    import numpy as np

    from pgkd.features import FeatureCache
    from pgkd.registry import Registry
    from pgkd.settings import Settings
    from pgkd.student import Student
    from pgkd.training import TrainConfig

log = logging.getLogger(__name__)

FINAL = ("promoted", "rejected", "failed")
MODES = ("head", "full")
DEFAULT_LR = {"full": 1e-4, "head": 2e-2}  # a frozen encoder's linear head takes a much larger step


# --- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedData:
    """The labelled data the loop starts from: the seed training set, the gold
    validation set the gate uses, and optionally a test set (never trained on)."""

    train: LabelledTexts
    val: LabelledTexts
    test: LabelledTexts | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SeedData:
        """``PGKD_SEED_TRAIN`` / ``PGKD_SEED_VAL`` / ``PGKD_SEED_TEST`` (CSV or JSONL)."""
        for name in ("seed_train", "seed_val"):
            if not getattr(settings, name):
                raise ConfigError(f"PGKD_{name.upper()} is not set; the curator and trainer need the seed "
                                  "training and gold validation files (CSV/JSONL)")
        cols = [c.strip() for c in settings.seed_text_col.split(",") if c.strip()]
        load = lambda path, k: load_labelled(path, cols, settings.seed_label_col, min_classes=k)  # noqa: E731
        test = load(settings.seed_test, 1) if settings.seed_test else None
        return cls(load(settings.seed_train, 2), load(settings.seed_val, 1), test)

    def guard(self) -> TextGuard:
        """Seed training texts are already in training; validation and test texts must never be."""
        evaluation = list(self.val.texts) + (list(self.test.texts) if self.test is not None else [])
        return TextGuard.of(self.train.texts, evaluation)


def training_set(seed: SeedData, samples: Sequence[Sample], labels: Sequence[str]) -> tuple[LabelledTexts, dict]:
    """The seed training set plus the accepted samples, each text once, none from
    the validation or test sets, only labels the student has; and the counts.

    The curator already guarantees this; the trainer checks again, cheaply, so a
    sample store filled by hand cannot leak evaluation texts into training. The
    samples follow the seed set in the order of their text hashes.

    >>> seed = SeedData(LabelledTexts(("a1", "b1"), ("a", "b")), LabelledTexts(("v1",), ("a",)))
    >>> s = lambda text, label, source: Sample(text, text, label, source, "t", "v1", 0.0)
    >>> data, counts = training_set(seed, [s("a2", "a", "teacher"), s("A1", "a", "teacher"), s("v1", "a", "teacher"),
    ...                                    s("b2", "b", "generated"), s("z", "zz", "generated")], ["a", "b"])
    >>> data.texts, counts
    (('a1', 'b1', 'a2', 'b2'), {'seed': 2, 'teacher': 1, 'generated': 1, 'dropped': 3, 'train': 4, 'val': 1})
    """
    guard = seed.guard()
    known = set(labels)
    seen = set(guard.train)
    texts, labs = list(seed.train.texts), list(seed.train.labels)
    counts = {"seed": len(seed.train), "teacher": 0, "generated": 0, "dropped": 0}
    # in text-hash order: the same samples give the same training set (and, seeded, the same model)
    # whatever order the stream's partitions delivered them in
    for h, sample in sorted(((sample_hash(s.text), s) for s in samples), key=lambda pair: pair[0]):
        if h in seen or h in guard.evaluation or sample.label not in known:
            counts["dropped"] += 1
            continue
        seen.add(h)
        texts.append(sample.text)
        labs.append(sample.label)
        counts[sample.source if sample.source in ("teacher", "generated") else "teacher"] += 1
    counts |= {"train": len(texts), "val": len(seed.val)}
    return LabelledTexts(tuple(texts), tuple(labs)), counts


# --- one round ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundConfig:
    """How a round trains and what the gate demands (from the ``trainer_*`` / ``gate_*`` settings)."""

    mode: str  # "head" | "full"
    train: TrainConfig
    gate: GateConfig
    graphs: tuple[str, ...] = ()  # ONNX Runtime graphs to store with each candidate (pgkd.serving.graphs_to_publish)
    feature_cache_mb: int = 0  # head mode: the encoder's outputs kept between rounds (pgkd.features); 0 = none

    @classmethod
    def from_settings(cls, settings: Settings, cuda: bool | None = None) -> RoundConfig:
        """``PGKD_TRAINER_MODE=auto`` is ``full`` when CUDA is available, else ``head``."""
        mode = settings.trainer_mode
        if mode == "auto":
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            mode = "full" if cuda else "head"
        from pgkd.training import TrainConfig  # torch: only the trainer builds a round's config

        train = TrainConfig(
            epochs=settings.trainer_epochs,
            batch_size=settings.trainer_batch_size,
            lr=settings.trainer_lr or DEFAULT_LR[mode],
            patience=settings.trainer_patience,
            device=settings.trainer_device or None,
            progress=False,
        )
        from pgkd.serving import graphs_to_publish

        return cls(mode, train, GateConfig.from_settings(settings), graphs_to_publish(settings),
                   settings.trainer_feature_cache_mb)

    def feature_cache(self) -> FeatureCache | None:
        """The cache a runner keeps between rounds: head mode only (a full
        fine-tune changes the encoder every round)."""
        if self.mode != "head" or not self.feature_cache_mb:
            return None
        from pgkd.features import FeatureCache

        return FeatureCache(max_bytes=self.feature_cache_mb << 20)


def score(student: Student, data: LabelledTexts, features: FeatureCache | None = None) -> tuple[dict, np.ndarray]:
    """The classification report of ``student`` on ``data`` and its probabilities."""
    from pgkd.features import probabilities

    probs = probabilities(student, data.texts, features)
    predicted = [student.labels[i] for i in probs.argmax(axis=1)]
    return classification_report(list(data.labels), predicted, student.labels), probs


@dataclass
class RoundOutcome:
    record: dict  # what registry.record_round() stores
    promotion: dict | None = None  # the history entry when the candidate was promoted
    candidate_report: dict | None = None
    current_report: dict | None = None

    @property
    def outcome(self) -> str:
        return self.record["outcome"]

    @property
    def serving_report(self) -> dict | None:
        """The validation report of the version that serves after this round."""
        return self.candidate_report if self.promotion else self.current_report


def run_round(
    registry: Registry,
    request: dict,
    seed: SeedData,
    samples: Sequence[Sample],
    cfg: RoundConfig,
    on_published: Callable[[str], None] = lambda version: None,
    on_promoting: Callable[[dict], None] = lambda record: None,
    features: FeatureCache | None = None,
) -> RoundOutcome:
    """Train, gate, publish, maybe promote; returns the round's record (not yet recorded).

    ``on_published(version)`` runs once the candidate is stored; ``on_promoting(record)``
    just before the promotion, with the record the round will have if it succeeds
    (the ledger keeps both, for a trainer restarted mid-round). ``features``
    (head mode): the encoder's outputs of earlier rounds, used and extended here."""
    from pgkd.training import fit_student

    started = time.perf_counter()
    round_no = int(request["round"])
    current = registry.current()
    if current is None:
        raise ConfigError("the registry has no current version to retrain from; "
                          "publish one with: pgkd models import DIR --promote")
    parent = registry.load(current, device=cfg.train.device or None)
    train_set, data = training_set(seed, samples, parent.labels)
    candidate = parent.clone()
    train_cfg = replace(cfg.train, seed=round_no)
    log.info("round %d: training a %s candidate from %s on %d texts (%d seed, %d teacher, %d generated)",
             round_no, cfg.mode, current, len(train_set), data["seed"], data["teacher"], data["generated"])
    features = features if cfg.mode == "head" else None
    counts = (features.hits, features.misses) if features is not None else None
    fit = fit_student(candidate, train_set, seed.val, train_cfg, head_only=cfg.mode == "head", features=features)

    cand_report, cand_probs = score(candidate, seed.val, features)
    cur_report, _ = score(parent, seed.val, features)
    used = None  # head mode with a cache: the texts this round encoded, and those the cache served
    if counts is not None:
        used = {"encoded": features.misses - counts[1], "cached": features.hits - counts[0]}
        log.info("round %d: %d texts encoded, %d served from the feature cache (%d texts, %.1f MiB)", round_no,
                 used["encoded"], used["cached"], features.rows, features.nbytes / 2**20)
    decision = evaluate_gate(cand_report, cur_report, cfg.gate)
    log.info("round %d: candidate macro-F1 %.4f vs current %.4f: %s", round_no, cand_report["macro_f1"],
             cur_report["macro_f1"], decision.summary())

    version = registry.publish(
        candidate, parent=current, round=round_no, data=data, metrics=cand_report,
        settings={"mode": cfg.mode, "train": asdict(train_cfg), "gate": asdict(cfg.gate),
                  "request_id": request["request_id"], "samples_upto": request.get("samples_upto"),
                  "device": fit.device, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run},
        # the drift monitor's baseline: this version's predictions on the gold validation set
        drift_reference=reference_from_predictions(cand_probs, candidate.labels).to_dict(),
        graphs=cfg.graphs,  # built from the stored weights, so a swap loads a session instead of building one
    )
    on_published(version)

    record = {
        "round": round_no,
        "outcome": "promoted" if decision.passed else "rejected",
        "request_id": request["request_id"],
        "trigger": request.get("trigger"),
        "candidate": version,
        "current": current,
        "data": data,
        "metrics": {"candidate": headline(cand_report), "current": headline(cur_report)},
        "gate": decision.as_dict(),
        "reason": decision.summary(),
        "train": {"mode": cfg.mode, "device": fit.device, "best_epoch": fit.best_epoch,
                  "epochs_run": fit.epochs_run, "seconds": round(fit.seconds, 2),
                  **({"features": used} if used is not None else {})},
        "seconds": round(time.perf_counter() - started, 2),
    }
    promotion = None
    if decision.passed:
        on_promoting(record)
        promotion = registry.promote(version, reason=f"round {round_no}: {decision.summary()}", round=round_no)
    return RoundOutcome(record, promotion, cand_report, cur_report)


def failed_record(request: dict, reason: str, current: str | None = None) -> dict:
    return {"round": int(request["round"]), "outcome": "failed", "request_id": request["request_id"],
            "trigger": request.get("trigger"), "candidate": None, "current": current, "error": reason,
            "reason": reason, "gate": None}


def consecutive_rejections(rounds: Sequence[dict]) -> int:
    """Rejected rounds since the last promotion (failed rounds neither count nor reset).

    >>> consecutive_rejections([{"outcome": o} for o in ("rejected", "promoted", "rejected", "failed", "rejected")])
    2
    """
    n = 0
    for record in reversed(rounds):
        if record.get("outcome") == "promoted":
            break
        n += record.get("outcome") == "rejected"
    return n


def gate_margins(decision: GateDecision | dict) -> dict[str, float]:
    """The gate's numeric margins (``worst_class`` is a name, not a number)."""
    margins = decision.margins if isinstance(decision, GateDecision) else (decision or {}).get("margins") or {}
    return {k: float(v) for k, v in margins.items() if isinstance(v, (int, float))}


# --- running a round to completion once -------------------------------------------------------


class RoundLedger:
    """Per retrain request, in Redis (``{ns}:trainer:requests``, a hash of JSON):
    ``status`` (running or final), ``round``, ``attempts``, who runs it, and the
    checkpoints of a round in progress (``candidate`` once published, ``record``
    and ``promotion`` once promoted)."""

    def __init__(self, client, namespace: str = "pgkd"):
        self._redis = client  # a sync redis.Redis with decode_responses=True
        self.key = f"{namespace}:trainer:requests"

    def get(self, request_id: str) -> dict | None:
        raw = self._redis.hget(self.key, request_id)
        return json.loads(raw) if raw else None

    def put(self, request_id: str, state: dict) -> None:
        self._redis.hset(self.key, request_id, json.dumps(state))

    def update(self, request_id: str, **changes: Any) -> None:
        self.put(request_id, {**(self.get(request_id) or {}), **changes})


@dataclass
class RoundResult:
    """What the worker does after a request: announce, export metrics."""

    record: dict | None  # None: the request was skipped (done before, or claimed elsewhere)
    promotion: dict | None = None
    serving_report: dict | None = None
    candidate_report: dict | None = None
    current_report: dict | None = None


class RoundRunner:
    """Runs retrain requests through :func:`run_round`, once each, recording every outcome."""

    def __init__(self, registry: Registry, ledger: RoundLedger, seed: SeedData, cfg: RoundConfig,
                 max_attempts: int = 2, claim_ttl_s: float = 7200.0):
        self.registry = registry
        self.ledger = ledger
        self.seed = seed
        self.cfg = cfg
        self.max_attempts = max_attempts
        self.claim_ttl_s = claim_ttl_s
        self.who = f"{socket.gethostname()}:{os.getpid()}"
        self.features = cfg.feature_cache()  # lives as long as the runner: rounds after the first encode new texts only

    def process(self, request: dict, samples: Sequence[Sample]) -> RoundResult:
        """Run one request to an outcome (recorded), or skip it (already done).

        Call it only while holding the single-trainer lock: a ledger entry left
        "running" then means its trainer died."""
        rid = request["request_id"]
        state = self.ledger.get(rid)
        if state and state.get("status") in FINAL:
            log.info("retrain request %s (round %s) already finished: %s; skipped", rid, state.get("round"),
                     state["status"])
            return RoundResult(None)
        attempt = (state or {}).get("attempts", 0) + 1
        if state and (recorded := self.registry.recorded_round(rid)) is not None:
            # the trainer died after recording the round, before noting it here: it is done
            log.warning("round %s (request %s) was recorded (%s) by a trainer that then died; not run again",
                        recorded["round"], rid, recorded["outcome"])
            self.ledger.update(rid, status=recorded["outcome"], finished=time.time())
            return RoundResult(None)
        if state:  # "running" under our lock: the trainer that ran it died mid-round
            log.warning("round %s (request %s): attempt %d by %s did not finish", request["round"], rid,
                        attempt - 1, state.get("by"))
            self.registry.release_round(rid)
            promotion = state.get("promotion") or self._promotion_of(state)
            if promotion:  # it died after promoting: the round is done, record it
                return self._finish(rid, {**state["record"], "attempts": attempt - 1}, promotion)
            if attempt > self.max_attempts:
                reason = (f"the trainer stopped mid-round {attempt - 1} time(s) (last: {state.get('by')}); "
                          f"giving up after PGKD_TRAINER_MAX_ATTEMPTS={self.max_attempts}")
                return self._finish(rid, {**failed_record(request, reason, self._current()), "attempts": attempt - 1})
        if not self.registry.claim_round(rid, int(self.claim_ttl_s)):
            log.warning("retrain request %s is claimed by another trainer; skipped", rid)
            return RoundResult(None)
        self.ledger.put(rid, {"status": "running", "round": request["round"], "attempts": attempt, "by": self.who,
                              "started": time.time(), "token": uuid.uuid4().hex})
        try:
            outcome = run_round(
                self.registry, request, self.seed, samples, self.cfg,
                on_published=lambda version: self.ledger.update(rid, candidate=version),
                on_promoting=lambda record: self.ledger.update(rid, record={**record, "attempts": attempt}),
                features=self.features,
            )
        except Exception as err:  # noqa: BLE001 - any failure of the round is recorded; the worker goes on
            if isinstance(err, RegistryUnavailable):
                raise  # cannot record anything: the worker exits and the request is redelivered
            log.exception("round %s (request %s) failed", request["round"], rid)
            reason = f"{type(err).__name__}: {first_line(err)}"
            return self._finish(rid, {**failed_record(request, reason, self._current()), "attempts": attempt})
        if outcome.promotion:
            self.ledger.update(rid, promotion=outcome.promotion)
        result = self._finish(rid, {**outcome.record, "attempts": attempt}, outcome.promotion)
        result.serving_report = outcome.serving_report
        result.candidate_report = outcome.candidate_report
        result.current_report = outcome.current_report
        return result

    def _finish(self, rid: str, record: dict, promotion: dict | None = None) -> RoundResult:
        if not self.registry.record_round(record):  # at most once per request id
            recorded = self.registry.recorded_round(rid) or record
            log.warning("round %s (request %s) was already recorded (%s); not recorded again", record["round"], rid,
                        recorded["outcome"])
            self.ledger.update(rid, status=recorded["outcome"], finished=time.time())
            return RoundResult(None)
        self.ledger.update(rid, status=record["outcome"], finished=time.time())
        log.info("round %s: %s (%s)", record["round"], record["outcome"], record.get("reason"))
        return RoundResult(record, promotion)

    def _promotion_of(self, state: dict) -> dict | None:
        """The promotion of a round whose trainer died between promoting and noting it."""
        if not state.get("record") or not state.get("candidate"):
            return None
        for entry in reversed(self.registry.history(50)):
            if entry.get("action") == "promote" and entry.get("version") == state["candidate"]:
                return entry
        return None

    def _current(self) -> str | None:
        try:
            return self.registry.current()
        except Exception:  # noqa: BLE001 - only for the record
            return None


class TrainerLock:
    """The single-trainer lock: ``{ns}:trainer:lock`` with a TTL, renewed by its
    holder while it lives (an asyncio task). A second trainer waits; a killed
    holder's lock lapses after ``ttl_s``."""

    def __init__(self, client, namespace: str, ttl_s: float):
        self._redis = client  # redis.asyncio.Redis
        self.key = f"{namespace}:trainer:lock"
        self.ttl_s = ttl_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False

    async def try_acquire(self) -> bool:
        self.held = bool(await self._redis.set(self.key, self.token, nx=True, px=int(self.ttl_s * 1000)))
        return self.held

    async def renew(self) -> bool:
        """Extend the TTL if we still hold the lock; False when it was lost."""
        script = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end")
        self.held = bool(await self._redis.eval(script, 1, self.key, self.token, int(self.ttl_s * 1000)))
        return self.held

    async def release(self) -> None:
        script = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
        await self._redis.eval(script, 1, self.key, self.token)
        self.held = False

    async def holder(self) -> str | None:
        value = await self._redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

