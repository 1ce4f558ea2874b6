"""The Netron server answers only requests addressed to itself (no DNS rebinding)."""

from __future__ import annotations

import http.client
import urllib.parse
from pathlib import Path

import pytest

from app.netron_server import NetronServer


def _status(url: str, path: str, host: str | None) -> int:
    parts = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        # skip_host: send exactly the Host header a rebinding page's browser would send (or none).
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path: Path):
    model = tmp_path / "model.circle"
    model.write_bytes(b"\x1c\x00\x00\x00CIR0" + bytes(64))
    server = NetronServer()
    url = server.start(model)
    yield url
    server.stop()


def test_own_host_names_are_answered(served: str) -> None:
    port = urllib.parse.urlparse(served).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert _status(served, "/data/model.circle", host) == 200, host


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "127.0.0.1", "127.0.0.1:1", "localhost.evil.example:{port}", "", None]
)
def test_other_host_headers_are_refused(served: str, host: str | None) -> None:
    port = urllib.parse.urlparse(served).port
    host = None if host is None else host.format(port=port)
    assert _status(served, "/data/model.circle", host) == 421
    assert _status(served, "/", host) == 421
