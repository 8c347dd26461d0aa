"""Every server the project starts listens on 127.0.0.1 unless someone configures
otherwise: the settings' bind addresses, the workers' /metrics and Faust web
servers, the teacher simulator, and the local Kafka and Redis scripts. A new
0.0.0.0 default fails here. (docker-compose.yml publishes its ports on
127.0.0.1 only: tests/unit/test_compose.py.)"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pgkd.data import LabelledTexts
from pgkd.settings import Settings
from pgkd.simulator import SimulatorServer, add_simulator_args

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket in LISTEN on ``port`` (Linux /proc/net)."""
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / table
        if not path.exists():
            pytest.skip("no /proc/net/tcp: not Linux")
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.partition(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if width == 8:  # little-endian IPv4
                    found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.add("::" if set(address) == {"0"} else f"ipv6:{address}")
    return found


def test_every_host_setting_defaults_to_loopback():
    hosts = {name: field.default for name, field in Settings.model_fields.items() if "host" in name}
    assert {"metrics_host", "web_host"} <= set(hosts)
    assert hosts == dict.fromkeys(hosts, LOOPBACK)


def test_metrics_server_listens_on_loopback_only():
    from streams.metrics import start_metrics_server

    port = start_metrics_server(Settings().metrics_host, 0)
    assert listening_addresses(port) == {LOOPBACK}


def test_faust_web_server_binds_loopback_and_is_off(tmp_path):
    from streams.app import build_app

    app = build_app(Settings(faust_datadir=tmp_path), "classify")
    assert (app.conf.web_bind, app.conf.web_enabled) == (LOOPBACK, False)


def test_teacher_simulator_listens_on_loopback_by_default():
    parser = argparse.ArgumentParser()
    add_simulator_args(parser)
    assert parser.parse_args(["--pool", "p", "--text-col", "t", "--label-col", "l"]).host == LOOPBACK
    sim = SimulatorServer(LabelledTexts(("lost my card",), ("card_lost",)))
    try:
        port = int(sim.url.rsplit(":", 1)[1].split("/")[0])
        assert listening_addresses(port) == {LOOPBACK}
    finally:
        sim.close()


def test_local_kafka_listeners_are_all_on_loopback():
    script = (ROOT / "deploy/local/kafka").read_text()
    endpoints = re.findall(r"\b[A-Z_]+://([^:/\s\"]+):", script)  # PLAINTEXT://host:, SASL_PLAINTEXT://host:, ...
    voters = re.findall(r"controller\.quorum\.voters=\d+@([^:\s]+):", script)
    assert len(endpoints) >= 5 and voters, "expected the listener definitions in deploy/local/kafka"
    assert set(endpoints) | set(voters) == {LOOPBACK}
    config = dict(re.findall(r"^((?:advertised\.)?listeners)=(\S+)$", script, flags=re.MULTILINE))
    assert config == {"listeners": "$LISTENERS", "advertised.listeners": "$ADVERTISED"}


def test_local_redis_binds_loopback_with_protected_mode():
    script = (ROOT / "deploy/local/redis").read_text()
    (invocation,) = re.findall(r"redis-server - [^\n]*", script)
    assert f"--bind {LOOPBACK} " in invocation and "--protected-mode yes" in invocation


@pytest.mark.parametrize("package", ["pgkd", "streams"])
def test_no_code_binds_every_interface(package):
    # the containers' deliberate 0.0.0.0 lives in deploy/Dockerfile and docker-compose.yml
    # "0.0.0.0", "::", bind(("", port)), addr="" / host=""
    wildcard = re.compile(r"""["'](0\.0\.0\.0|::)["']|\(\(\s*["']["']\s*,|\b(addr|host|bind)\s*=\s*["']["']""")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / package).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if wildcard.search(line)]
    assert not offenders, f"binds every interface: {offenders}"
