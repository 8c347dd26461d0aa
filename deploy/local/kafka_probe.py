"""Exit 0 when a Kafka broker at HOST:PORT answers a Metadata request with at
least one registered broker; exit 1 otherwise. Standard library only, so that
`deploy/local/kafka start` works before the Python package is installed.

    python3 deploy/local/kafka_probe.py 127.0.0.1:9092

Metadata v4 is the oldest version Kafka 4.x still serves (KIP-896) and the
newest without the "flexible" encoding, which keeps the wire format trivial.
"""

from __future__ import annotations

import socket
import struct
import sys

API_METADATA = 3
API_VERSION = 4
CORRELATION_ID = 0x5047  # "PG"


def metadata_brokers(host: str, port: int, timeout: float = 2.0) -> int:
    """Number of brokers in the Metadata response (raises OSError on failure)."""
    client_id = b"pgkd-probe"
    # header v1: api_key, api_version, correlation_id, client_id (int16-prefixed)
    header = struct.pack(">hhih", API_METADATA, API_VERSION, CORRELATION_ID, len(client_id)) + client_id
    # body v4: topics = [] (no topics, not "all"), allow_auto_topic_creation = false
    body = struct.pack(">ib", 0, 0)
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _read(sock, 4))[0]
        payload = _read(sock, size)
    correlation_id, _throttle_ms, n_brokers = struct.unpack(">iii", payload[:12])
    if correlation_id != CORRELATION_ID:
        raise OSError(f"unexpected correlation id {correlation_id}")
    return n_brokers


def _read(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed by the broker")
        buf += chunk
    return buf


def main(argv: list[str]) -> int:
    host, _, port = (argv[1] if len(argv) > 1 else "127.0.0.1:9092").rpartition(":")
    try:
        return 0 if metadata_brokers(host or "127.0.0.1", int(port)) > 0 else 1
    except (OSError, struct.error) as err:
        if "-v" in argv:
            print(f"kafka_probe: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
