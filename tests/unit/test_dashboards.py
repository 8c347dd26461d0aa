"""The Grafana dashboards and the alert rules: every PromQL expression parses
(promtool) and uses only metric names that the code exports (or that
docs/METRICS.md promises for the curator/trainer, or kafka-exporter's and `up`);
the provisioning finds the dashboards and the datasource they name."""

from __future__ import annotations

import re

import pytest
import yaml
from promql_support import (
    ROOT,
    check_expressions,
    dashboard_expressions,
    dashboard_panels,
    dashboards,
    exported_names,
    metric_names,
    rule_expressions,
)

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
# What the issue asks the dashboard to show: a panel title matching each.
REQUIRED_PANELS = [
    r"throughput", r"latency", r"confidence", r"low-confidence ratio", r"teacher calls", r"teacher cost",
    r"cache hit ratio", r"dead letters by reason", r"drift psi", r"retrain rounds", r"model version",
    r"per-class f1",
]


def test_there_is_a_dashboard():
    assert "pgkd.json" in dashboards()


def test_every_expression_parses(tmp_path):
    expressions = dashboard_expressions() + rule_expressions()
    assert len(expressions) > 20
    result = check_expressions(expressions, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("where,expr", dashboard_expressions() + rule_expressions())
def test_every_metric_name_is_exported(where, expr):
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - exported_names()
    assert not unknown, f"{where}: {sorted(unknown)} exported by nothing (docs/METRICS.md lists what is)"


def test_metric_names_are_extracted_from_promql():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(pgkd_end_to_end_latency_seconds_bucket{source="student"}[1m])))'
            ' > on() group_left() 1e3 * max without (instance) (pgkd_drift_psi offset 5m) unless ignoring(job) up')
    assert metric_names(expr) == {"pgkd_end_to_end_latency_seconds_bucket", "pgkd_drift_psi", "up"}
    assert metric_names('count by (model_version) (pgkd_model_info == 1) or on() vector(0)') == {"pgkd_model_info"}


def test_panels_cover_the_issue_and_use_the_provisioned_datasource():
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    for name, dashboard in dashboards().items():
        panels = dashboard_panels(dashboard)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert dashboard.get("uid"), f"{name}: no uid (links break on every provisioning)"
        for panel in panels:
            if panel["type"] == "row":
                continue
            uids = {panel["datasource"]["uid"]} | {t["datasource"]["uid"] for t in panel["targets"]}
            assert uids == {datasource["uid"]}, f"{name}: panel {panel['title']!r} uses {uids}"
    titles = [p["title"].lower() for d in dashboards().values() for p in dashboard_panels(d)]
    for wanted in REQUIRED_PANELS:
        assert any(re.search(wanted, t) for t in titles), f"no panel about {wanted!r}"


def test_dashboard_provider_reads_the_directory_compose_mounts():
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "pgkd.yml").read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
