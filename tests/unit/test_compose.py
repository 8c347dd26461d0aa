"""docker-compose.yml and its provisioning files are well formed. There is no
Docker engine on the development and CI machines, so the structure is checked
here; `docker compose config` runs too where the compose client exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
INFRA = {"kafka", "redis", "prometheus", "grafana"}
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):\?[^}]+\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|CREDENTIAL", re.IGNORECASE)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def test_infrastructure_services_are_declared():
    assert INFRA <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(INFRA))
def test_service_has_healthcheck_restart_policy_and_named_volume(name):
    service = SERVICES[name]
    check = service.get("healthcheck", {})
    assert check.get("test"), f"{name}: no healthcheck"
    assert service.get("restart") in {"unless-stopped", "always", "on-failure"}, f"{name}: no restart policy"
    named = [v.split(":", 1)[0] for v in service.get("volumes", []) if not v.startswith((".", "/"))]
    assert named, f"{name}: no named volume for its data"
    assert set(named) <= set(COMPOSE.get("volumes", {})), f"{name}: volume not declared at the top level"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_ports_are_published_on_loopback_only(name):
    for port in SERVICES[name].get("ports", []):
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", f"{name}: port {port!r} is not bound to 127.0.0.1"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_no_literal_secrets(name):
    for key, value in environment(SERVICES[name]).items():
        if SECRET_NAME.search(key) and value:
            assert REQUIRED_VAR.match(value), f"{name}: {key} must come from the environment as ${{VAR:?message}}"


def test_every_required_variable_is_listed_in_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = {
        line.split("=", 1)[0].strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert required, "expected at least GF_ADMIN_PASSWORD"
    assert required <= example, f"missing from .env.example: {sorted(required - example)}"


def test_grafana_keeps_anonymous_access_off():
    env = environment(SERVICES["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_bind_mounts_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_kafka_image_matches_the_local_broker_version():
    pom = ET.parse(ROOT / "deploy/local/pom.xml").getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = pom.find("m:properties/m:kafka.version", ns).text
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{version}"


def test_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool missing under CI: deploy/local/setup installs it (Debian package prometheus)")
        pytest.skip("promtool not installed (deploy/local/setup installs it)")
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_datasource_points_at_compose_prometheus():
    provisioning = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` client on this machine; the structure is checked above")
    result = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "GF_ADMIN_PASSWORD": "test-only"},
    )
    assert result.returncode == 0, result.stderr
