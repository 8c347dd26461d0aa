"""Prometheus metrics of the workers (docs/METRICS.md is the catalogue).

Names are stable: dashboards and alert rules use them. Label values are
bounded: taxonomy labels, model versions, fixed reason/outcome names; never
ids or texts.
"""

from __future__ import annotations

import gc
import logging
import time

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

log = logging.getLogger(__name__)
disable_created_metrics()  # the *_created series only double the scrape size

# Inference and end-to-end latencies on a CPU range from milliseconds to
# minutes (a backlog); the defaults stop at 10s.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_CONFIDENCE = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.99, 1.0)

# --- classifier -------------------------------------------------------------------
INFERENCE_PROCESS_RESTARTS = Counter(
    "pgkd_inference_process_restarts", "Inference processes restarted after they died (PGKD_INFERENCE_PROCESS)",
    ["model_version"],
)
INFERENCE_HUNG = Counter(
    "pgkd_inference_hung", "Inference calls that ran past PGKD_INFERENCE_TIMEOUT_S (streams.watchdog)",
    ["model_version"],
)
TEXTS_TOTAL = Counter("pgkd_texts_total", "Texts received on texts.in (valid or not)")
TEXTS_CLASSIFIED = Counter(
    "pgkd_texts_classified", "Student answers published to labels.out", ["label", "model_version"]
)
LOW_CONFIDENCE = Counter("pgkd_low_confidence", "Student answers routed to the teacher", ["model_version"])
BATCH_SIZE = Histogram("pgkd_batch_size", "Messages per classifier batch", buckets=_BATCH)
INFERENCE_SECONDS = Histogram("pgkd_inference_seconds", "Student inference time per batch", buckets=_SECONDS)
END_TO_END = Histogram(
    "pgkd_end_to_end_latency_seconds",
    "From the texts.in message timestamp to its labels.out record being acknowledged",
    ["source"],
    buckets=_SECONDS,
)
CONFIDENCE = Histogram("pgkd_confidence", "Max probability of student answers", buckets=_CONFIDENCE)
MODEL_INFO = Gauge("pgkd_model_info", "1 for the model version this worker serves", ["model_version"])
MODEL_LOAD_FAILURES = Counter(
    "pgkd_model_load_failures", "Announced versions refused by a hot swap (the old one keeps serving)", ["reason"]
)  # reason: checksum | not_found | load_error | timeout (streams.hotswap.LOAD_FAILURE_REASONS)
MODEL_UPDATES_SKIPPED = Counter(
    "pgkd_model_updates_skipped", "model.updates records that are not an announcement (skipped)", ["reason"]
)  # reason: not_json | not_object | bad_version (streams.hotswap.SKIP_REASONS)

# --- teacher ----------------------------------------------------------------------
TEACHER_CALLS = Counter(
    "pgkd_teacher_calls", "Teacher label requests by outcome (ok, error, budget_exhausted)", ["outcome"]
)
TEACHER_TOKENS = Counter("pgkd_teacher_tokens", "Teacher tokens", ["kind"])  # prompt | completion
TEACHER_COST = Counter("pgkd_teacher_cost_usd", "Money spent on the teacher (USD)")
TEACHER_LABELS = Counter("pgkd_teacher_labels", "Teacher answers published (labels.out + teacher.labels)", ["label"])
TEACHER_ERRORS = Counter("pgkd_teacher_errors", "Teacher failures after the last retry", ["reason"])
TEACHER_RETRIES = Counter("pgkd_teacher_retries", "Teacher HTTP tries that failed and were retried")
TEACHER_CACHE_HITS = Counter("pgkd_teacher_cache_hits", "Teacher requests answered from the Redis cache")
TEACHER_CACHE_MISSES = Counter("pgkd_teacher_cache_misses", "Teacher requests not in the cache")
TEACHER_LATENCY = Histogram("pgkd_teacher_request_seconds", "One teacher label request", buckets=_SECONDS)
TEACHER_RATE_LIMITED = Counter("pgkd_teacher_rate_limited_seconds", "Seconds spent waiting for the rate limiter")
TEACHER_BUDGET_EXHAUSTED = Gauge("pgkd_teacher_budget_exhausted", "1 while the spend budget stops teacher calls")
TEACHER_SPENT = Gauge("pgkd_teacher_spent_usd", "Total teacher spend (all workers, from Redis)")
TEACHER_BUDGET = Gauge("pgkd_teacher_budget_usd", "The configured teacher spend budget")

# --- curator and trainer (the continual distillation loop) ---------------------------
# Retraining on a CPU takes seconds (head only) to an hour (full fine-tune).
_RETRAIN_SECONDS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
RETRAIN_ROUNDS = Counter("pgkd_retrain_rounds", "Retrain rounds finished, by outcome", ["outcome"])
GATE_MACRO_F1 = Gauge("pgkd_gate_macro_f1", "Validation macro-F1 of the last round's versions", ["model"])
GATE_MARGIN = Gauge("pgkd_gate_margin", "Last round: candidate minus current, and the worst class F1 drop", ["metric"])
GATE_CONSECUTIVE_REJECTIONS = Gauge("pgkd_gate_consecutive_rejections", "Rounds rejected in a row")
RETRAIN_SECONDS = Histogram("pgkd_retrain_seconds", "Training wall time of one round", buckets=_RETRAIN_SECONDS)
RETRAIN_FEATURES = Counter(
    "pgkd_retrain_features", "Texts whose encoder output a head-only round used, by where it came from", ["source"]
)  # source: encoder | cache
FEATURE_CACHE_BYTES = Gauge("pgkd_retrain_feature_cache_bytes", "Memory held by the trainer's cache of encoder outputs")
CLASS_F1 = Gauge("pgkd_class_f1", "Per-class validation F1 of the serving version", ["label"])
CURRENT_MODEL_ROUND = Gauge("pgkd_current_model_round", "Round number of the serving version (0 = seed)")
SAMPLES_GATHERED = Counter(
    "pgkd_samples_gathered", "Samples accepted into the training data", ["label", "source"]
)  # source: teacher | generated
SAMPLES_DROPPED = Counter("pgkd_samples_dropped", "Samples not accepted into the training data", ["reason"])

# --- both -------------------------------------------------------------------------
DLQ = Counter("pgkd_dlq", "Records sent to texts.dlq", ["reason", "stage"])
REDIS_ERRORS = Counter("pgkd_redis_errors", "Redis operations that failed (the worker went on)", ["op"])


# --- the consumer group (every worker) --------------------------------------------
REBALANCES = Counter("pgkd_rebalances", "Consumer group rebalances this worker went through")
ASSIGNED_PARTITIONS = Gauge("pgkd_assigned_partitions", "Partitions assigned to this worker by its consumer group")


# --- the Python process ----------------------------------------------------------
GC_PAUSE = Histogram(
    "pgkd_gc_pause_seconds", "Cyclic garbage collections: time each held the GIL", ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
_gc_started: list[float] = []


def _time_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        GC_PAUSE.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - _gc_started.pop())


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on host:port (0 = a free port); returns the port and logs it.
    Also starts timing the process's garbage collections (pgkd_gc_pause_seconds)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
