"""Helpers of the Prometheus/Grafana tests (not a test module): promtool, the
PromQL expressions of the dashboards and rules, the metric names they use, and
the names the code exports."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
METRICS_DOC = ROOT / "docs" / "METRICS.md"

# Exported by danielqsj/kafka-exporter (docs/METRICS.md, "Kafka consumer lag") and by Prometheus itself.
KAFKA_EXPORTER = {
    "kafka_brokers",
    "kafka_consumergroup_lag",
    "kafka_consumergroup_lag_sum",
    "kafka_consumergroup_members",
    "kafka_consumergroup_current_offset",
    "kafka_topic_partition_current_offset",
}
PROMETHEUS = {"up"}

# Grafana's variables, replaced by a plausible value before promtool parses an expression.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}


def promtool() -> str:
    """The promtool binary; skips the test without it (fails under CI=true)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("promtool missing under CI: deploy/local/setup installs it (Debian package prometheus)")
        pytest.skip("promtool not installed (deploy/local/setup installs it)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_panels(dashboard: dict) -> list[dict]:
    return list(_panels(dashboard.get("panels", [])))


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every query of every dashboard, Grafana variables replaced."""
    out = []
    for name, dashboard in dashboards().items():
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{name}: panel {panel.get('id')} {panel.get('title')!r} ref {target.get('refId')}"
                    out.append((where, grafana_to_promql(target["expr"])))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    return [(f"alerts.yml: {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in alert_rules()]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    >>> sorted(metric_names('sum by (le) (rate(pgkd_x_bucket{source="a b"}[5m])) / on() group_left max(up) > 0.5e1'))
    ['pgkd_x_bucket', 'up']
    >>> sorted(metric_names('absent(up{job="classifier"} == 1) or on() vector(0)'))
    ['up']
    """
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"(?<![\w:.])\d+(\.\d*)?([eE][+-]?\d+)?|(?<![\w:])\.\d+([eE][+-]?\d+)?", " ", s)  # numbers
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if re.match(r"\s*\(", s[match.end():]):  # a function or an aggregation
            continue
        if match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def _series_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {name if name.endswith("_total") else name + "_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


@functools.cache
def exported_names() -> frozenset[str]:
    """Series names the workers export (their prometheus_client registries), the
    curator/trainer contract of docs/METRICS.md, the kafka-exporter's and ``up``."""
    from prometheus_client import REGISTRY

    import streams.drift_metrics  # registers the drift metrics
    import streams.metrics  # noqa: F401

    names = set(PROMETHEUS | KAFKA_EXPORTER)
    for family in REGISTRY.collect():
        names |= _series_names(family.name, family.type)
    section = METRICS_DOC.read_text().split("## Curator and trainer", 1)[1].split("\n## ", 1)[0]
    for name, kind in re.findall(r"^\| `(pgkd_\w+)` \|\s*(\w+)\s*\|", section, flags=re.MULTILINE):
        names |= _series_names(name, kind)
    return frozenset(names)


def check_expressions(expressions: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess:
    """``promtool check rules`` on the expressions written as recording rules
    (promtool parses PromQL only inside rule files)."""
    rules = [{"record": f"pgkd_check:expr_{i}", "expr": expr} for i, (_where, expr) in enumerate(expressions)]
    path = tmp_path / "expressions.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}, sort_keys=False))
    return run_promtool("check", "rules", str(path))
