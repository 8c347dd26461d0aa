"""A real Prometheus (the Debian package's binary) scrapes a running classify
worker: what the worker counted while classifying is what Prometheus's HTTP API
answers (its drift gauges too), and Prometheus loads the alert rules of
deploy/prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from streaming_support import REPO_ROOT, TORCH_SERVING, StreamEnv, collect_sync, free_port, metric_sum, produce_sync, text_message

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_TEXTS = 24
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("prometheus missing under CI: deploy/local/setup installs it (Debian package prometheus)")
        pytest.skip("prometheus not installed (deploy/local/setup installs it)")
    return path


@pytest.fixture
def env(kafka_bootstrap, redis_db_url, unique_topic, tiny_encoder_dir, tmp_path):
    """A StreamEnv serving the tiny random encoder with three labels (what it
    answers does not matter here, only that it answers); stops the workers.
    Small batches and a drift window of 10: the worker's first 12 answers become
    its drift reference (no manifest), the next 12 fill a window."""
    from pgkd.student import Student

    model = tmp_path / "tiny-scrape"
    Student.from_pretrained(tiny_encoder_dir, ["card", "refund", "transfer"], max_length=32, device="cpu").save(model)
    made = StreamEnv.make(kafka_bootstrap, redis_db_url, unique_topic, tmp_path, model, kafka_session_timeout_s=10,
                          batch_size=4, drift_window=10, **TORCH_SERVING)
    yield made
    made.stop_all()
    print(made.logs())


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping ``targets`` every second."""

    def __init__(self, workdir: Path, targets: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "classifier", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [_prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> dict:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def scalar(self, query: str) -> float | None:
        result = self.get("/api/v1/query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_prometheus_scrapes_what_the_classifier_counted(env, tmp_path):
    classify = env.start("classify")
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{classify.metrics_port}"])
    try:
        prometheus.wait_ready()
        classify.wait_ready()
        ids = [f"s{i}" for i in range(N_TEXTS)]
        produce_sync(env.bootstrap, env.topics["texts_in"],
                     (text_message(i, f"where is my card number {i}?") for i in ids))
        got = collect_sync(env.bootstrap, [env.topics["labels_out"]],
                           lambda g: len({r["id"] for r in g.of(env.topics["labels_out"])}) >= N_TEXTS,
                           timeout_s=120, workers=[classify])
        assert sorted({r["id"] for r in got.of(env.topics["labels_out"])}) == sorted(ids)
        # the worker's own count, then Prometheus's (the counter is incremented before the batch is acked)
        assert metric_sum(classify.metrics(), "pgkd_texts_classified_total") == N_TEXTS

        deadline = time.monotonic() + 30
        scraped = None
        while time.monotonic() < deadline:
            scraped = prometheus.scalar('sum(pgkd_texts_classified_total{job="classifier"})')
            if scraped == N_TEXTS:
                break
            time.sleep(0.5)
        assert scraped == N_TEXTS, f"Prometheus has {scraped}, the worker classified {N_TEXTS}"
        assert prometheus.scalar('up{job="classifier"}') == 1
        assert prometheus.scalar("sum(pgkd_texts_total)") == N_TEXTS
        assert prometheus.scalar("sum(pgkd_model_info)") == 1
        # drift: the stream is compared with its own first answers, so it reads ~0 and does not alarm
        deadline = time.monotonic() + 15  # set after the last batch's records are acked: a scrape or two later
        while (psi := prometheus.scalar('max(pgkd_drift_psi{kind="class"})')) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert psi is not None and psi < 0.2, psi
        assert prometheus.scalar("max(pgkd_drift_alarm)") == 0

        # the alert rules load and evaluate in a real server
        groups = prometheus.get("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert {r["name"] for r in rules} == {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
                                              for r in g["rules"]}
        assert all(r["health"] != "err" for r in rules), [r for r in rules if r["health"] == "err"]
    finally:
        prometheus.stop()
        print(f"----- prometheus.log -----\n{prometheus.log.read_text()[-3000:]}")
