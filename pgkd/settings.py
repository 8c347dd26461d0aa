"""One frozen settings object, read from the environment once at the entry point
and passed down explicitly. Every variable has the prefix ``PGKD_`` (for example
``PGKD_KAFKA_BOOTSTRAP``); ``docs/CONFIG.md`` lists them all.

An unknown ``PGKD_*`` variable or an invalid value stops start-up with a
message that names it (:func:`load_settings`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgkd.errors import ConfigError

ENV_PREFIX = "PGKD_"
# Variables of the test suite and the setup script, not of the service.
RESERVED_PREFIXES = ("PGKD_TEST_", "PGKD_SETUP_")
# Secrets that may also come from a file: PGKD_<NAME>_FILE (Settings._read_secret_files).
SECRET_FILES = ("kafka_sasl_password", "redis_url", "teacher_api_key")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- infrastructure -------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str = Field("", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when SASL is used")
    kafka_sasl_username: str = Field("", description="SASL user name")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (never logged)")
    kafka_sasl_password_file: str = Field(
        "", description="file holding the SASL password (a Docker/Kubernetes secret), instead of "
        "PGKD_KAFKA_SASL_PASSWORD"
    )
    kafka_ssl_cafile: str = Field(
        "", description="CA bundle (PEM) that signed the brokers' certificates, for SSL/SASL_SSL ('' = the system's CAs)"
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL; may carry a password (rediss:// for TLS), so it is never logged",
    )
    redis_url_file: str = Field("", description="file holding the Redis URL (a secret), instead of PGKD_REDIS_URL")
    metrics_host: str = Field("127.0.0.1", description="bind address of each worker's /metrics endpoint")
    metrics_port: int = Field(9100, ge=0, le=65535, description="port of /metrics (0 = pick a free one)")
    web_port: int = Field(6066, ge=0, le=65535, description="Faust web port of a worker")

    # --- topics ---------------------------------------------------------------
    topic_texts_in: str = Field("texts.in", description="topic: producers' texts")
    topic_labels_out: str = Field("labels.out", description="topic: classifications, keyed by id")
    topic_teacher_requests: str = Field("teacher.requests", description="topic: low-confidence texts for the teacher")
    topic_teacher_labels: str = Field("teacher.labels", description="topic: teacher labels (also training samples)")
    topic_dlq: str = Field("texts.dlq", description="topic: dead letters: original bytes, error, stage")
    topic_retrain_requests: str = Field("retrain.requests", description="topic: retrain requests for the trainer")
    topic_model_updates: str = Field("model.updates", description="topic: model promotions, seen by every classifier")
    topic_partitions: int = Field(4, ge=1, description="partitions of every topic the app creates")
    topic_replication: int = Field(1, ge=1, description="replication factor of every topic the app creates")

    # --- student --------------------------------------------------------------
    model_store: Path = Field(Path("models"), description="directory of stored model versions")
    student_model: str = Field("", description="encoder name or path for a new student ('' = offline MiniLM-L6)")
    max_length: int = Field(64, ge=8, le=4096, description="tokenizer truncation length")
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads (0 = torch's default: one per core; 1 is faster on a shared, "
        "busy CPU, docs/BENCHMARKS.md)"
    )
    inference_quantize: Literal["fp32", "int8"] = Field(
        "fp32", description="served weights: fp32 as trained, or int8 (the Linear layers of every encoder layer but "
        "the last dynamically quantized: ~1.5x CPU throughput, accuracy within 0.5 points on Banking77 -- on a CPU "
        "without VNNI only with PGKD_INFERENCE_GRAPH=onnxruntime; CPU only)"
    )
    inference_graph: Literal["eager", "torchscript", "onnxruntime"] = Field(
        "torchscript", description="the served forward pass: torchscript (traced once per loaded version and checked "
        "against eager: the same logits, less Python, the GIL released while it runs; a model that does not trace "
        "faithfully is served eager, with a warning), onnxruntime (exported to ONNX and checked against eager when a "
        "version is published, by a publisher with these settings, and stored in it; else once per loaded version; "
        "run by ONNX Runtime; with int8 ONNX Runtime quantizes, with full 8-bit inputs also on CPUs without VNNI; "
        "falls back to torchscript; the compose deployment's choice, with int8) or eager (transformers' Python "
        "forward)"
    )

    # --- classifier agent -----------------------------------------------------
    batch_size: int = Field(
        128, ge=1, description="messages per classifier batch (stream.take n); a bigger batch sorts by length "
        "better (64: 13% more CPU per text than 128 under a backlog; 256 sustained no more than 128 in the worker, "
        "and a full batch's first answer waits for its whole inference; docs/BENCHMARKS.md)"
    )
    inference_lanes: int = Field(
        1, ge=1, le=2, description="batches inferred at once, each on its own thread with PGKD_TORCH_THREADS torch "
        "threads (the traced graph runs without the GIL); records still go out in batch order. 2 on a 2-core CPU: "
        "~1.5x the sustained rate, but a worse tail at moderate load (docs/BENCHMARKS.md); at most two batches are "
        "in flight, so more lanes would idle"
    )
    inference_process: bool = Field(
        False, description="classify workers serve each version from a child process of its own: a native crash "
        "or an OOM kill of the runtime loses that process, not the worker (restarted with the same version; the "
        "batch in flight is retried text by text: docs/RELIABILITY.md). Measured on 2 cores: the same sustained "
        "rate within noise, a new version's longest hot-swap gap ~2x longer, and more memory (MiniLM int8: ~190 MB per version in memory "
        "and ~80 MB for the spare process, against ~140 MB in the worker; docs/BENCHMARKS.md)"
    )
    inference_timeout_s: float = Field(
        120.0, ge=0, description="longest one inference call (a batch, or one text of its retry) may run before the "
        "model counts as hung: an inference process (PGKD_INFERENCE_PROCESS) is then killed and the batch retried "
        "text by text (a text that hangs the model is dead-lettered); a model in the worker's own threads cannot be "
        "stopped, so the worker exits without acknowledging the batch and a restart redelivers it "
        "(docs/RELIABILITY.md). 0 = no limit. A batch of 128 texts takes ~0.2 s with MiniLM int8 on a 2-core CPU"
    )
    inference_batch_size: int = Field(
        16, ge=1, description="most texts per forward pass: a batch is sorted by token count and cut into passes "
        "of at most this many, each padded to its own longest text, where the padding saved pays for another pass "
        "(Student.batches; 16 measured best on a CPU, 64 no better, docs/BENCHMARKS.md)"
    )
    batch_within_s: float = Field(
        0.01, gt=0, description="max seconds to wait while filling a batch (Faust's take waits this long for a batch "
        "that is not full). A reader task takes ahead while a batch is handled, so this adds to the latency only "
        "for a text that arrives while the worker is idle (streams.delivery.read_ahead, docs/BENCHMARKS.md)"
    )
    gil_switch_interval_s: float = Field(
        0.0005, ge=0, le=0.1, description="the classify worker's GIL switch interval (sys.setswitchinterval; 0 = "
        "Python's 5 ms): the inference thread retakes the GIL after every forward pass, and waits up to this long "
        "while the event loop holds it. 0.5 ms: sustained/raw 0.84 against 0.805 at 5 ms, medians of interleaved runs, "
        "a gain within one run's spread (docs/BENCHMARKS.md)"
    )
    low_conf_threshold: float = Field(0.5, ge=0, le=1, description="max probability below this -> teacher")
    margin_threshold: float = Field(0.0, ge=0, le=1, description="top1 - top2 below this -> teacher (0 = off)")
    top_k: int = Field(3, ge=1, description="labels carried in each output's top_k")
    max_text_chars: int = Field(5000, ge=1, description="longer texts go to the DLQ")

    # --- drift of the classifier's outputs (issue 6: pgkd/drift.py) -------------
    drift_enabled: bool = Field(True, description="classifier workers watch class/confidence drift")
    drift_window: int = Field(
        2000, ge=10, description="predictions per worker in the drift window (keep >= 10 x classes / threshold)"
    )
    drift_psi_threshold: float = Field(0.2, gt=0, description="PSI (class or confidence) above this is drift")
    drift_cooldown_s: float = Field(
        900.0, ge=0, description="minimum seconds between two drift alarms (shared by all workers through Redis)"
    )
    drift_bins: int = Field(10, ge=2, le=100, description="equal-width confidence bins of the drift histogram")

    # --- teacher --------------------------------------------------------------
    teacher_base_url: str = Field("http://127.0.0.1:8089/v1", description="OpenAI-compatible endpoint")
    teacher_model: str = Field("teacher-sim", description="model name sent to the endpoint")
    teacher_api_key: SecretStr = Field(SecretStr(""), description="API key (never logged); falls back to OPENAI_API_KEY")
    teacher_api_key_file: str = Field(
        "", description="file holding the API key (a Docker/Kubernetes secret), instead of PGKD_TEACHER_API_KEY"
    )
    teacher_timeout_s: float = Field(30.0, gt=0, description="seconds before one teacher request times out")
    teacher_max_retries: int = Field(4, ge=0, description="retries after the first try (429, 5xx, timeout, bad JSON)")
    teacher_concurrency: int = Field(4, ge=1, description="requests in flight at once")
    teacher_rpm: int = Field(600, ge=1, description="requests per minute")
    teacher_tpm: int = Field(200_000, ge=1, description="tokens per minute")
    teacher_batch_size: int = Field(16, ge=1, description="texts per label request")
    teacher_budget_usd: float = Field(10.0, ge=0, description="spend limit; calls stop when reached")
    teacher_price_prompt_per_mtok: float = Field(3.0, ge=0, description="USD per 1M prompt tokens")
    teacher_price_completion_per_mtok: float = Field(15.0, ge=0, description="USD per 1M completion tokens")

    # --- streaming workers (issue 4: streams/) ---------------------------------
    serve_model: str = Field(
        "",
        description="directory written by Student.save() that workers serve when the registry has no current "
        "version (or Redis is unreachable); a copy of a registry version (with its manifest.json) is verified "
        "against its checksums first, and its stored ONNX graph served",
    )
    app_id_prefix: str = Field(
        "pgkd",
        pattern=r"^[A-Za-z0-9._-]{1,100}$",
        description="Faust app ids / consumer groups are '<prefix>-classify' and '<prefix>-teacher'; "
        "also the namespace of the Redis keys",
    )
    web_enabled: bool = Field(False, description="Faust's own web server (metrics are served separately)")
    web_host: str = Field("127.0.0.1", description="bind address of the Faust web server when enabled")
    faust_datadir: Path = Field(
        Path(tempfile.gettempdir()) / "pgkd-faust", description="Faust's data directory (one subdir per app id)"
    )
    log_level: str = Field("info", pattern=r"^(debug|info|warning|error|critical)$", description="worker log level")
    kafka_session_timeout_s: float = Field(
        60.0, ge=6, le=1800, description="consumer group session timeout: how soon a dead worker's partitions move"
    )
    kafka_fetch_wait_s: float = Field(
        0.0, ge=0, le=1, description="how long the broker may hold a worker's fetch to gather more records "
        "(fetch.max.wait.ms, with fetch.min.bytes 64 KiB; a backlog is fetched at once either way); 0 = answered at "
        "the first record, Faust's way. At 300 texts/s on 2 cores, 0.005 cut the consumer thread from 0.20 to 0.13 "
        "of a core but added ~4 ms to p50 at low rates and did not lower p99 (streams.transport, docs/BENCHMARKS.md)"
    )
    max_id_chars: int = Field(256, ge=1, description="longer ids go to the DLQ")
    dlq_max_original_bytes: int = Field(
        65_536, ge=0, description="original message bytes kept in a dead letter (base64); longer ones are cut"
    )
    redis_timeout_s: float = Field(1.0, gt=0, description="Redis socket timeout; an outage costs this, not a stall")
    teacher_batch_within_s: float = Field(1.0, gt=0, description="max seconds to wait while filling a teacher batch")
    teacher_cache_ttl_s: int = Field(30 * 86400, ge=0, description="lifetime of a cached teacher answer (0 = forever)")
    teacher_budget_recheck_s: float = Field(
        30.0, gt=0, description="while the budget is spent, how often the teacher worker checks it again"
    )

    # --- validation gate (issue 5: pgkd/gate.py) ---------------------------------
    gate_min_macro_f1_gain: float = Field(
        0.0, ge=-1, le=1, description="a candidate needs macro-F1 >= the current version's + this (may be < 0)"
    )
    gate_max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="a candidate may lose at most this much accuracy against the current version"
    )
    gate_min_support: int = Field(
        5, ge=0, description="classes with at least this many validation examples are checked for an F1 drop"
    )
    gate_max_class_f1_drop: float = Field(
        0.10, ge=0, le=1, description="no checked class may lose more F1 than this"
    )

    # --- continual distillation: seed data, hot swap, curator, trainer (issue 5) --
    seed_train: str = Field(
        "", description="seed training file (CSV/JSONL): each round trains on it plus every accepted sample so far"
    )
    seed_val: str = Field("", description="gold validation file (CSV/JSONL): the gate scores both versions on it")
    seed_test: str = Field(
        "", description="optional test file (CSV/JSONL); its texts, like the validation texts, never enter training"
    )
    seed_text_col: str = Field("text", description="text column(s) of the seed files, comma-separated (joined)")
    seed_label_col: str = Field("label", description="label column of the seed files")
    model_poll_s: float = Field(
        30.0, ge=0, description="classify workers also compare their version with the registry's current one this "
        "often, in case an announcement on model.updates was missed (0 = announcements only)"
    )
    model_load_timeout_s: float = Field(
        600.0, ge=0, description="a classify worker gives up a hot swap's load (checksums, session, warm-up: 0.2-2 s "
        "for MiniLM; ~30 s when a graph must be built) after this long: refused (pgkd_model_load_failures_total"
        "{reason=\"timeout\"}), the old version keeps serving, and later loads run on a fresh thread (the stuck one, "
        "which cannot be stopped, is abandoned). 0 = no limit"
    )
    keep_previous_model: bool = Field(
        True, description="classify workers keep the version a hot swap replaced in memory (one more model's RAM: "
        "~100 MB for int8 MiniLM-L6), so that swapping back to it, a rollback, needs no load"
    )
    curator_batch_size: int = Field(
        200, ge=1, description="accepted teacher-labelled samples that close a batch (-> one retrain request)"
    )
    curator_batch_window_s: float = Field(
        3600.0, ge=0, description="a batch holding at least one sample closes this long after it opened (0 = off)"
    )
    curator_drift_trigger: bool = Field(
        True, description="a drift alarm newer than the last retrain request closes a batch holding >= 1 sample"
    )
    curator_generate: int = Field(
        32, ge=0, description="samples asked of the teacher per batch for the weakest classes (PGKD prompt; 0 = none)"
    )
    curator_target_classes: int = Field(8, ge=1, description="k weakest classes the generation is aimed at")
    curator_n_examples: int = Field(
        16, ge=1, description="correct / misclassified / hard-negative examples each in the generation prompt"
    )
    curator_close_lock_ttl_s: float = Field(
        30.0, ge=3, description="the batch-close lock lapses this long after its holder stopped renewing it "
        "(renewed every third of it while a close runs; how long a killed curator's successor waits to resume the close)"
    )
    curator_min_class_count: int = Field(
        3, ge=1, description="teacher labels a class needs before its live agreement counts in the weakest-class rank"
    )
    trainer_mode: str = Field(
        "auto", pattern=r"^(auto|head|full)$",
        description="full: fine-tune the whole student (GPU); head: encoder frozen, only the classification head "
        "trained, on features computed once (CPU: seconds); auto: full on CUDA, head otherwise",
    )
    trainer_epochs: int = Field(10, ge=1, description="max epochs of a round (early stopping on validation macro-F1)")
    trainer_batch_size: int = Field(64, ge=1, description="training batch size")
    trainer_lr: float = Field(0.0, ge=0, description="peak learning rate (0 = 1e-4 full, 5e-3 head)")
    trainer_patience: int = Field(3, ge=1, description="epochs without a validation gain before a round stops training")
    trainer_device: str = Field("", description="torch device of the trainer ('' = CUDA > MPS > CPU)")
    trainer_feature_cache_mb: int = Field(
        512, ge=0, description="head-only rounds keep the frozen encoder's outputs per text (the seed and validation "
        "sets, earlier samples) between rounds, up to this many MiB, so a round encodes only texts it has not seen; "
        "0 = encode every text every round"
    )
    trainer_lock_ttl_s: float = Field(
        30.0, ge=3, description="the single-trainer lock lapses this long after its holder stopped renewing it "
        "(how long a killed trainer's successor waits)"
    )
    trainer_max_attempts: int = Field(
        2, ge=1, description="tries of a round whose trainer died mid-round; after the last it is recorded as failed"
    )
    trainer_round_timeout_s: float = Field(
        7200.0, gt=0, description="longest expected round: the request claim's TTL and the consumer's max poll interval"
    )

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """``PGKD_<SECRET>_FILE``: the secret is the file's content, read here once
        (Docker and Kubernetes mount secrets as files, so they stay out of the
        environment, ``ps`` and ``docker inspect``). A ConfigError names the file,
        never what it holds."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for secret in SECRET_FILES:
            path = data.get(f"{secret}_file") or ""
            if not path:
                continue
            variable = f"{ENV_PREFIX}{secret.upper()}"
            given = data.get(secret)
            if isinstance(given, SecretStr):
                given = given.get_secret_value()
            if given:
                raise ConfigError(f"{variable} and {variable}_FILE are both set; keep one")
            data[secret] = read_secret_file(path, f"{variable}_FILE")
        return data

    @field_validator("kafka_ssl_cafile")
    @classmethod
    def _cafile_exists(cls, value: str) -> str:
        # checked at start-up: otherwise the first TLS connection fails with a traceback
        if value and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.kafka_security_protocol not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
            raise ValueError(
                f"kafka_security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, "
                f"got {self.kafka_security_protocol!r}"
            )
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise ValueError("kafka_sasl_mechanism is required when kafka_security_protocol uses SASL")
        return self

    def teacher_key(self) -> str:
        """The teacher API key: PGKD_TEACHER_API_KEY, else OPENAI_API_KEY, else a
        placeholder that local servers (the simulator, vLLM, Ollama) accept."""
        return self.teacher_api_key.get_secret_value() or os.environ.get("OPENAI_API_KEY", "") or "not-needed"


def read_secret_file(path: str | Path, variable: str) -> str:
    """The secret in ``path`` without its trailing newline (``echo`` and most
    editors add one). ConfigError naming ``variable`` and the path, never the
    content, when the file is missing, unreadable or empty."""
    try:
        value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ConfigError(f"{variable}: cannot read {path} ({reason})") from None
    if not value:
        raise ConfigError(f"{variable}: {path} is empty")
    return value


def load_settings(**overrides) -> Settings:
    """Read settings from the environment (plus explicit overrides).

    Raises :class:`ConfigError` naming the variable when one is unknown or invalid.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = sorted(
        k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known and not k.startswith(RESERVED_PREFIXES)
    )
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]}; known settings are listed in docs/CONFIG.md")
    try:
        return Settings(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        name = ENV_PREFIX + field.upper() if first["loc"] else field
        raise ConfigError(f"invalid setting {name}: {first['msg']}") from None


def settings_markdown() -> str:
    """The table of every setting, as docs/CONFIG.md shows it (``python -m pgkd.settings``)."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable with the prefix `PGKD_`, read once at",
        "start-up into one frozen `pgkd.settings.Settings`. An unknown `PGKD_*` variable or",
        "an invalid value stops start-up with a message that names it. Secrets (`SecretStr`)",
        "are never logged; each may instead be read from a file named by its `_FILE`",
        "variable (a Docker/Kubernetes secret). `PGKD_TEST_*` and `PGKD_SETUP_*` belong to the test suite and",
        "`deploy/local/setup`. Generated by `python -m pgkd.settings`; a test keeps it current.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = "(secret)" if default.get_secret_value() else ""
        elif default is not None and field.default_factory is None:
            default = str(default)
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        if name == "faust_data_dir":
            shown = "`<tmp>/pgkd-faust`"  # the temp dir differs per machine
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
