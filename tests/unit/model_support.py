"""Helpers of the unit tests that serve a tiny model (test_serving, test_inference_process)."""

import socket

from pgkd.settings import Settings, load_settings

LABELS = ["neg", "neu", "pos"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def fallback_settings(path, tmp_path, **overrides) -> Settings:
    """Settings that serve the PGKD_SERVE_MODEL directory ``path``: the registry's Redis does not answer."""
    return load_settings(serve_model=str(path), model_store=tmp_path / "store", redis_timeout_s=0.5,
                         redis_url=f"redis://127.0.0.1:{closed_port()}/0", **overrides)
