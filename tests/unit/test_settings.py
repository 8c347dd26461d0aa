"""The one settings object: validation messages name the variable; docs/CONFIG.md stays current."""

from pathlib import Path

import pytest

from pgkd.errors import ConfigError
from pgkd.settings import load_settings, settings_markdown

CONFIG_MD = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_defaults_bind_loopback(monkeypatch):
    s = load_settings()
    assert s.metrics_host == "127.0.0.1" and s.kafka_bootstrap.startswith("127.0.0.1:")
    with pytest.raises(Exception):
        s.batch_size = 3  # frozen


def test_unknown_variable_is_named(monkeypatch):
    monkeypatch.setenv("PGKD_BACTH_SIZE", "8")
    with pytest.raises(ConfigError, match="^unknown setting PGKD_BACTH_SIZE; known settings are listed in docs/CONFIG.md$"):
        load_settings()


def test_invalid_value_is_named(monkeypatch):
    monkeypatch.setenv("PGKD_BATCH_SIZE", "zero")
    with pytest.raises(ConfigError, match="^invalid setting PGKD_BATCH_SIZE: "):
        load_settings()


def test_secrets_stay_out_of_repr(monkeypatch):
    monkeypatch.setenv("PGKD_TEACHER_API_KEY", "sk-very-secret")
    s = load_settings()
    assert s.teacher_key() == "sk-very-secret"
    assert "sk-very-secret" not in repr(s) and "sk-very-secret" not in str(s.model_dump())


def test_config_doc_is_current():
    assert CONFIG_MD.read_text() == settings_markdown(), "regenerate: python -m pgkd.settings > docs/CONFIG.md"


def test_tooling_variables_are_not_settings(monkeypatch):
    monkeypatch.setenv("PGKD_TEST_BANKING77", "/data")
    monkeypatch.setenv("PGKD_SETUP_SKIP_PIP", "1")
    load_settings()


def test_inference_quantize_is_fp32_or_int8(monkeypatch):
    assert load_settings().inference_quantize == "fp32"  # serve the weights as trained unless asked
    monkeypatch.setenv("PGKD_INFERENCE_QUANTIZE", "int8")
    assert load_settings().inference_quantize == "int8"
    monkeypatch.setenv("PGKD_INFERENCE_QUANTIZE", "int4")
    with pytest.raises(ConfigError, match="^invalid setting PGKD_INFERENCE_QUANTIZE: Input should be 'fp32' or 'int8'$"):
        load_settings()


# --- secrets from files (PGKD_<SECRET>_FILE) ---------------------------------------


@pytest.mark.parametrize(
    "secret, read",
    [
        ("TEACHER_API_KEY", lambda s: s.teacher_key()),
        ("KAFKA_SASL_PASSWORD", lambda s: s.kafka_sasl_password.get_secret_value()),
        ("REDIS_URL", lambda s: s.redis_url.get_secret_value()),
    ],
)
def test_secret_comes_from_its_file_without_the_trailing_newline(monkeypatch, tmp_path, secret, read):
    value = "redis://:s3cret@cache:6380/2" if secret == "REDIS_URL" else "s3cret value"
    path = tmp_path / secret.lower()
    path.write_text(value + "\n")  # as `echo ... > file` writes it
    monkeypatch.setenv(f"PGKD_{secret}_FILE", str(path))
    if secret == "KAFKA_SASL_PASSWORD":
        monkeypatch.setenv("PGKD_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
        monkeypatch.setenv("PGKD_KAFKA_SASL_MECHANISM", "PLAIN")
    s = load_settings()
    assert read(s) == value
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())


def test_secret_file_keeps_inner_whitespace_and_strips_crlf(monkeypatch, tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b" sk key \r\n")
    monkeypatch.setenv("PGKD_TEACHER_API_KEY_FILE", str(path))
    assert load_settings().teacher_key() == " sk key "


def test_missing_secret_file_is_named(monkeypatch, tmp_path):
    missing = tmp_path / "nope"
    monkeypatch.setenv("PGKD_REDIS_URL_FILE", str(missing))
    with pytest.raises(ConfigError, match=f"^PGKD_REDIS_URL_FILE: cannot read {missing} \\(No such file or directory\\)$"):
        load_settings()


def test_unreadable_secret_file_names_the_file_not_the_content(monkeypatch, tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"\xff\xfe not utf-8 sk-hidden")
    monkeypatch.setenv("PGKD_TEACHER_API_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match=f"^PGKD_TEACHER_API_KEY_FILE: cannot read {path} \\(UnicodeDecodeError\\)$") as err:
        load_settings()
    assert "sk-hidden" not in str(err.value)
    monkeypatch.setenv("PGKD_TEACHER_API_KEY_FILE", str(tmp_path))  # a directory
    with pytest.raises(ConfigError, match=f"^PGKD_TEACHER_API_KEY_FILE: cannot read {tmp_path} \\(Is a directory\\)$"):
        load_settings()


def test_empty_secret_file_is_an_error(monkeypatch, tmp_path):
    path = tmp_path / "key"
    path.write_text("\n")
    monkeypatch.setenv("PGKD_TEACHER_API_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match=f"^PGKD_TEACHER_API_KEY_FILE: {path} is empty$"):
        load_settings()


def test_secret_and_its_file_together_are_refused(monkeypatch, tmp_path):
    path = tmp_path / "key"
    path.write_text("from-file")
    monkeypatch.setenv("PGKD_TEACHER_API_KEY", "from-env")
    monkeypatch.setenv("PGKD_TEACHER_API_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match="^PGKD_TEACHER_API_KEY and PGKD_TEACHER_API_KEY_FILE are both set; keep one$"):
        load_settings()
