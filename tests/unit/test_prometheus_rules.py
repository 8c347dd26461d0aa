"""deploy/prometheus: the alert rules pass `promtool check rules` and their
unit tests (`promtool test rules`), every alert is tested firing and quiet,
and the scrape config covers every worker type."""

from __future__ import annotations

import yaml
from promql_support import ALERTS, ALERTS_TEST, METRICS_DOC, PROMETHEUS_DIR, alert_rules, run_promtool

WORKER_JOBS = {"classifier", "teacher", "curator", "trainer", "kafka-exporter"}


def test_rules_pass_promtool_check():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_their_unit_tests():
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    cases = [case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert set(names) - firing == set(), "alerts never tested firing"
    assert set(names) - quiet == set(), "alerts never tested quiet"


def test_every_alert_has_severity_summary_description_and_is_documented():
    doc = METRICS_DOC.read_text()
    for rule in alert_rules():
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule.get("annotations", {})), rule["alert"]
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is not in docs/METRICS.md (Alerts)"


def test_prometheus_scrapes_every_worker_type_and_loads_the_rules():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert WORKER_JOBS <= set(jobs)
    # the classifier is scaled: every replica through Docker's DNS
    (sd,) = jobs["classifier"]["dns_sd_configs"]
    assert sd["names"] == ["classifier"] and sd["type"] == "A" and sd["port"] == 9100
    assert config["rule_files"] == ["alerts.yml"]
    result = run_promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
