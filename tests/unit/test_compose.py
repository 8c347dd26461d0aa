"""docker-compose.yml and its provisioning files are well formed. There is no
Docker engine on the development and CI machines, so the structure is checked
here; `docker compose config` runs too where the compose client exists."""

from __future__ import annotations

import json
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


def compose_client() -> str:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` client on this machine; the structure is checked above")
    return docker


def test_docker_compose_config_accepts_the_file():
    result = subprocess.run(
        [compose_client(), "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "GF_ADMIN_PASSWORD": "test-only"},
    )
    assert result.returncode == 0, result.stderr


# --- least privilege: each secret of .env reaches only the containers that use it -----

TEACHER_KEY = ("PGKD_TEACHER_API_KEY", "PGKD_TEACHER_API_KEY_FILE", "OPENAI_API_KEY")
CALLS_THE_TEACHER = {"teacher", "curator"}
WORKERS = {name for name, service in SERVICES.items() if service.get("image", "").startswith("pgkd-stream")}
ONE_SHOT = {"topics"}  # runs once and exits (docker compose waits for service_completed_successfully)


def test_workers_are_found():
    assert {"classifier", "teacher", "curator", "trainer", "trainer-cpu", "teacher-sim"} <= WORKERS


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_a_worker_gets_the_teacher_key_only_if_it_calls_the_teacher(name):
    """`environment:` wins over env_file: a blank value hides what .env holds."""
    service, env = SERVICES[name], environment(SERVICES[name])
    if not service.get("env_file"):
        assert name == "teacher-sim" and not env, "the simulator reads nothing of .env"
        return
    assert env.get("GF_ADMIN_PASSWORD") == "", f"{name}: Grafana's password would reach it from .env"
    for variable in TEACHER_KEY:
        if name in CALLS_THE_TEACHER:
            assert variable not in env, f"{name} calls the teacher: {variable} must come from .env"
        else:
            assert env.get(variable) == "", f"{name} never calls the teacher: blank {variable}"


def test_docker_compose_resolves_the_secrets_of_dot_env_only_where_they_are_used(tmp_path):
    """The real client: a .env with every secret, each service's resolved environment."""
    docker = compose_client()
    project = tmp_path / "project"
    shutil.copytree(ROOT / "deploy", project / "deploy")
    shutil.copy(ROOT / "docker-compose.yml", project)
    (project / ".env").write_text("GF_ADMIN_PASSWORD=grafana-secret\nPGKD_TEACHER_API_KEY=sk-teacher-secret\n"
                                  "OPENAI_API_KEY=sk-openai-secret\nPGKD_TEACHER_BUDGET_USD=3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GF_", "PGKD_", "OPENAI_"))}
    result = subprocess.run([docker, "compose", "--profile", "sim", "--profile", "cpu", "config", "--format", "json"],
                            cwd=project, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert WORKERS <= set(services)
    for name in WORKERS:
        resolved = services[name].get("environment") or {}
        secrets = {k for k, v in resolved.items() if v and "secret" in v}
        if name in CALLS_THE_TEACHER:
            assert secrets == {"PGKD_TEACHER_API_KEY", "OPENAI_API_KEY"}, (name, secrets)
            assert resolved["PGKD_TEACHER_BUDGET_USD"] == "3"  # and the settings of .env
        else:
            assert not secrets, (name, secrets)
    assert services["classifier"]["environment"]["PGKD_TEACHER_BUDGET_USD"] == "3"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "grafana-secret"


# --- the application services (one image, four roles) ---------------------------------

APP = {"classifier": "classify", "teacher": "teacher", "curator": "curator", "trainer": "trainer"}
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def test_kafka_exporter_feeds_the_lag_alerts():
    exporter = SERVICES["kafka-exporter"]
    assert exporter["image"].startswith("danielqsj/kafka-exporter:")
    assert "--kafka.server=kafka:29092" in exporter["command"]
    assert exporter.get("healthcheck", {}).get("test") and exporter.get("restart") == "unless-stopped"


@pytest.mark.parametrize("name,role", sorted(APP.items()))
def test_app_service_runs_its_worker_from_the_image(name, role):
    service = SERVICES[name]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile" and service["build"]["context"] == "."
    assert service["command"] == ["worker", role]
    assert service.get("restart") == "unless-stopped"
    check = service["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and "127.0.0.1:9100/metrics" in check[3]
    env = environment(service)
    assert env["PGKD_METRICS_HOST"] == "0.0.0.0" and env["PGKD_METRICS_PORT"] == "9100"
    assert f"models:{env['PGKD_MODEL_STORE']}" in service["volumes"], "the shared model store"
    assert {"kafka", "redis"} <= set(service["depends_on"])
    assert any(f.get("path") == ".env" and f.get("required") is False for f in service["env_file"])


def _seconds(duration: str) -> float:
    """A compose duration ("90s", "5m", "1m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, f"not a compose duration: {duration!r}"
    h, m, sec = (int(x or 0) for x in parts.groups())
    return h * 3600 + m * 60 + sec


def test_a_stopped_worker_has_time_to_finish_what_it_does():
    """A teacher request (up to PGKD_TEACHER_TIMEOUT_S) and a retrain round end
    before compose kills the worker (test_continual checks the trainer does finish)."""
    from pgkd.settings import Settings

    request_s = Settings.model_fields["teacher_timeout_s"].default
    assert _seconds("1m30s") == 90
    for name in ("teacher", "curator"):
        assert _seconds(SERVICES[name]["stop_grace_period"]) >= request_s + 10, name
    for name in ("trainer", "trainer-cpu"):
        assert _seconds(SERVICES[name]["stop_grace_period"]) >= 120, name


def test_every_role_serves_and_publishes_the_measured_int8_onnxruntime_profile():
    """The trainer reads the classifiers' serving settings: it stores the graph they load."""
    for name in ("classifier", "teacher", "curator", "trainer", "trainer-cpu"):
        env = environment(SERVICES[name])
        assert env["PGKD_INFERENCE_GRAPH"] == "${PGKD_INFERENCE_GRAPH:-onnxruntime}", name
        assert env["PGKD_INFERENCE_QUANTIZE"] == "${PGKD_INFERENCE_QUANTIZE:-int8}", name


def test_classifier_scales():
    classifier = SERVICES["classifier"]
    assert "container_name" not in classifier and "ports" not in classifier


def test_trainer_reserves_a_gpu_and_has_a_cpu_variant():
    (device,) = SERVICES["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "cu" in SERVICES["trainer"]["build"]["args"]["TORCH_INDEX"].rsplit("/", 1)[-1]
    cpu = SERVICES["trainer-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and cpu["command"] == ["worker", "trainer"]
    assert cpu["networks"]["default"]["aliases"] == ["trainer"]  # Prometheus scrapes trainer:9100
    assert "whl/cpu" in cpu["build"]["args"]["TORCH_INDEX"]


def test_teacher_simulator_is_an_optional_profile():
    sim = SERVICES["teacher-sim"]
    assert sim["profiles"] == ["sim"] and sim["command"][0] == "teacher-sim" and "--host=0.0.0.0" in sim["command"]
    assert environment(SERVICES["teacher"])["PGKD_TEACHER_BASE_URL"].endswith("teacher-sim:8089/v1}")


def test_every_service_has_a_healthcheck_and_restart_policy():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:  # compose waits for its exit code, not its health
            assert service["healthcheck"] == {"disable": True} and service["restart"] == "on-failure", name
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert service.get("restart") in {"unless-stopped", "always", "on-failure"}, f"{name}: no restart policy"


def test_the_topics_exist_before_any_worker_starts_and_the_broker_creates_none():
    """labels.out must be compacted: whoever touched it first would otherwise make it with the
    broker's defaults (tests/integration/test_topics.py runs the command on a real broker)."""
    topics = SERVICES["topics"]
    assert topics["command"] == ["topics", "create"] and set(topics["depends_on"]) == {"kafka"}
    for name in WORKERS - ONE_SHOT - {"teacher-sim"}:
        assert SERVICES[name]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name
    assert environment(SERVICES["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].startswith("false")
    local = (ROOT / "deploy" / "local" / "kafka").read_text()
    assert re.search(r"^auto\.create\.topics\.enable=false$", local, flags=re.MULTILINE)


def test_pgkd_variables_are_settings():
    from pgkd.settings import Settings

    known = {f"PGKD_{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        unknown = {k for k in environment(service) if k.startswith("PGKD_")} - known
        assert not unknown, f"{name}: {sorted(unknown)} are not settings (docs/CONFIG.md)"
    example = (ROOT / ".env.example").read_text()
    in_example = set(re.findall(r"^#?\s*(PGKD_[A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert in_example and in_example <= known, sorted(in_example - known)


def test_prometheus_targets_are_compose_services():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    names = set(SERVICES) | {alias for s in SERVICES.values()
                             for net in (s.get("networks") or {}).values() for alias in (net or {}).get("aliases", [])}
    for job in config["scrape_configs"]:
        hosts = [t.rsplit(":", 1)[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        hosts += [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        for host in hosts:
            assert host in names | {"localhost"}, f"job {job['job_name']}: {host} is no compose service"
    mounts = SERVICES["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_dockerfile_builds_a_cpu_image_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.MULTILINE)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX}" torch' in text
    assert re.search(r"pip install \.(\s|$)", text)
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert not re.search(r"^COPY .*(models|\.safetensors)", text, flags=re.MULTILINE), "no weights baked into the image"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[0] == "*" or "*" in ignored, ".dockerignore keeps the build context small"
