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
