"""Every Kafka client gets the same security settings: the Faust apps through
``streams.app._credentials`` and the plain aiokafka clients (announcements, hot
swap, demo) through ``streams.topics.kafka_kwargs``. TLS is checked against a
throwaway CA made here with openssl (no TLS broker needed)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import faust
import pytest

from pgkd.errors import ConfigError
from pgkd.settings import Settings, load_settings
from streams.topics import kafka_kwargs
from streams.app import _credentials

CA_NAME = "pgkd-test-ca"


@pytest.fixture(scope="module")
def cafile(tmp_path_factory) -> Path:
    """A self-signed CA certificate (its key stays in the temp dir)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    work = tmp_path_factory.mktemp("ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={CA_NAME}",
         "-keyout", str(work / "ca.key"), "-out", str(work / "ca.pem")],
        check=True, capture_output=True, timeout=60,
    )
    return work / "ca.pem"


def _ca_names(context: ssl.SSLContext) -> list[str]:
    return [value for cert in context.get_ca_certs() for rdn in cert["subject"] for key, value in rdn
            if key == "commonName"]


def _settings(protocol: str, cafile: Path | str = "", **extra) -> Settings:
    sasl = {"kafka_sasl_mechanism": "SCRAM-SHA-256", "kafka_sasl_username": "app",
            "kafka_sasl_password": "pw-1234"} if protocol.startswith("SASL") else {}
    return Settings(kafka_bootstrap="b1:9093, b2:9093", kafka_security_protocol=protocol,
                    kafka_ssl_cafile=str(cafile), **sasl, **extra)


def test_plaintext_has_no_tls_and_no_sasl():
    s = _settings("PLAINTEXT")
    assert _credentials(s) is None
    assert kafka_kwargs(s) == {"bootstrap_servers": ["b1:9093", "b2:9093"], "security_protocol": "PLAINTEXT"}


def test_ssl_trusts_exactly_the_given_ca(cafile):
    s = _settings("SSL", cafile)
    creds = _credentials(s)
    assert isinstance(creds, faust.SSLCredentials)
    assert _ca_names(creds.context) == [CA_NAME]
    assert creds.context.verify_mode == ssl.CERT_REQUIRED and creds.context.check_hostname
    kwargs = kafka_kwargs(s)
    assert kwargs["security_protocol"] == "SSL" and "sasl_mechanism" not in kwargs
    assert _ca_names(kwargs["ssl_context"]) == [CA_NAME]


def test_sasl_ssl_carries_the_ca_and_the_login(cafile):
    s = _settings("SASL_SSL", cafile)
    creds = _credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol == faust.types.auth.AuthProtocol.SASL_SSL
    assert (creds.mechanism.value, creds.username, creds.password) == ("SCRAM-SHA-256", "app", "pw-1234")
    assert _ca_names(creds.ssl_context) == [CA_NAME]
    kwargs = kafka_kwargs(s)
    assert {k: kwargs[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                   "sasl_plain_password")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "app",
        "sasl_plain_password": "pw-1234"}
    assert _ca_names(kwargs["ssl_context"]) == [CA_NAME]


def test_sasl_plaintext_has_the_login_and_no_tls():
    s = _settings("SASL_PLAINTEXT")
    creds = _credentials(s)
    assert creds.protocol == faust.types.auth.AuthProtocol.SASL_PLAINTEXT and creds.ssl_context is None
    kwargs = kafka_kwargs(s)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in kwargs
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_password"]) == ("SCRAM-SHA-256", "pw-1234")


def test_a_missing_cafile_stops_start_up(monkeypatch, tmp_path):
    monkeypatch.setenv("PGKD_KAFKA_SSL_CAFILE", str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match=f"^invalid setting PGKD_KAFKA_SSL_CAFILE: Value error, no such file: "
                                          f"{tmp_path / 'ca.pem'}$"):
        load_settings()
