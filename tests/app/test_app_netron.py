"""Netron tab: a private 127.0.0.1 server, an embedded page with no prompt and no outside traffic."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PySide6.QtCore import QUrl

from app.netron_server import NetronServer
from app.qt_netron_tab import QtNetronTab


class _Host:
    session = None


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", {}


@pytest.fixture
def netron_tab(qtbot):
    """A Netron tab registered with qtbot (the fixture keeps it alive until pytest-qt closes it)."""
    tab = QtNetronTab(_Host())
    qtbot.addWidget(tab)
    tab.resize(1000, 700)
    tab.show()
    return tab


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A stand-in .circle file beside a file that must never be served."""
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "secret.txt").write_text("not for the browser")
    path = folder / "model.circle"
    path.write_bytes(b"\x1c\x00\x00\x00CIR0" + bytes(64))
    return path


def test_server_serves_only_the_model_on_loopback(model_file):
    server = NetronServer()
    try:
        url = server.start(model_file)
        assert url.startswith("http://127.0.0.1:")
        status, body, headers = _get(url)
        assert status == 200 and b"<title>Netron</title>" in body
        assert b'content="/data/model.circle"' in body
        assert b'<meta name="version" content="0.0.0">' in body  # unpackaged: netron's telemetry stays off
        assert "consent=" in headers.get("Set-Cookie", "")
        assert "connect-src 'self'" in headers.get("Content-Security-Policy", "")
        status, body, _ = _get(url + "data/model.circle")
        assert status == 200 and body == model_file.read_bytes()
        for path in ("data/secret.txt", "data/../secret.txt", "../secret.txt", "data/%2e%2e/secret.txt", "server.py"):
            assert _get(url + path)[0] == 404, path
        assert _get(url + "index.js")[0] == 200
    finally:
        server.stop()
    assert not server.running


def test_netron_tab_loads_page_with_no_prompt_and_no_outside_requests(qtbot, netron_tab, model_file):
    tab = netron_tab
    with qtbot.waitSignal(tab.sigLoaded, timeout=60_000) as blocker:
        url = tab.show_model(str(model_file))
    if tab.webengine_error:
        pytest.skip(tab.webengine_error)
    assert blocker.args == [True]
    view = tab.findChild(type(tab.view), "netronView")
    assert view is tab.view and view.url().toString() == url
    assert _get(url)[0] == 200
    # netron's page asks for its scripts and the model, all from 127.0.0.1
    qtbot.waitUntil(lambda: any("/data/model.circle" in u for u in tab.interceptor.seen), timeout=30_000)
    http = [u for u in tab.interceptor.seen if u.startswith("http")]
    assert http and all(QUrl(u).host() == "127.0.0.1" for u in http), http
    assert tab.interceptor.blocked == []
    # the consent cookie is there, so no consent prompt
    state = {}
    tab.page.runJavaScript(
        "document.cookie + '|' + ((document.querySelector('.message-text') || {}).textContent || '')",
        0,
        lambda value: state.setdefault("js", value),
    )
    qtbot.waitUntil(lambda: "js" in state, timeout=10_000)
    cookie, message = state["js"].split("|", 1)
    assert "consent=" in cookie
    assert "cookies" not in message.lower()
    # anything outside the machine is blocked before it leaves
    tab.page.runJavaScript("window.location.href = 'http://example.invalid/track';")
    qtbot.waitUntil(lambda: any("example.invalid" in u for u in tab.interceptor.blocked), timeout=10_000)


def test_server_stops_with_the_tab(netron_tab, model_file):
    tab = netron_tab
    tab.server.start(model_file)
    url = tab.url
    assert _get(url)[0] == 200
    tab.shutdown()
    assert tab.url is None
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
