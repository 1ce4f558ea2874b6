"""Serve one exported model with netron's web UI on 127.0.0.1, privately and offline.

Why not ``netron.start(path)`` as is: netron's Python server answers ``/data/<anything>``
from the model's whole folder, and its page asks for cookie consent, reports usage to an
analytics service and locks itself 180 days after its build date. So this module serves the
web UI files from the installed ``netron`` package itself, but:

- the model is the only file under ``/data/`` (one exact name; nothing else of its folder is
  reachable, so no private copy is needed and a large model is never copied on the UI thread);
- the page is marked unpackaged (version ``0.0.0``), which switches netron's telemetry off,
  and its build date is set to today so the age lock never triggers;
- the ``consent`` cookie netron checks is set by the server, so no prompt appears;
- a Content-Security-Policy limits fetches to this server (``connect-src 'self'``);
- the socket is bound to 127.0.0.1 only, on a free port chosen by the OS, and answers only
  requests addressed to ``127.0.0.1:<port>`` or ``localhost:<port>`` (DNS rebinding).
"""

from __future__ import annotations

import datetime as _dt
import http.server
import os
import re
import socketserver
import threading
import time
import urllib.parse
from pathlib import Path

import netron

NETRON_DIR = Path(netron.__file__).resolve().parent
HOST = "127.0.0.1"

_MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
}

# Page-level CSP: the UI may only talk to this server (no analytics, no IP lookups).
_CSP = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self' 'unsafe-inline'; font-src 'self' data:; worker-src 'self' blob:; frame-src 'none'"
)


def _patched_index(model_name: str) -> bytes:
    """netron's index.html with our metadata: the model URL, unpackaged version, today's date."""
    text = (NETRON_DIR / "index.html").read_text(encoding="utf-8")
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    quoted = urllib.parse.quote(model_name)
    meta = "\n".join(
        [
            '<meta name="type" content="Python">',
            '<meta name="version" content="0.0.0">',
            f'<meta name="file" content="/data/{quoted}">',
            f'<meta name="identifier" content="{model_name}">',
        ]
    )
    text = re.sub(r'<meta name="version" content="[^"]*">', lambda _m: meta, text, count=1)
    text = re.sub(r'<meta name="date" content="[^"]*">', f'<meta name="date" content="{today}">', text, count=1)
    return text.encode("utf-8")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._respond(head=True)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._respond(head=False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base signature
        self.server.requests.append(self.path)

    def _host_allowed(self) -> bool:
        # DNS rebinding: a page from evil.example can re-point its name at 127.0.0.1 and read
        # what we serve, but its requests still carry its own Host; only ours are answered.
        port = self.server.server_address[1]
        host = (self.headers.get("Host") or "").strip().lower()
        return host in (f"{HOST}:{port}", f"localhost:{port}")

    def _respond(self, head: bool) -> None:
        if not self._host_allowed():
            self.send_response(421)  # Misdirected Request
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        body: bytes | None = None
        content_type = "application/octet-stream"
        extra: list[tuple[str, str]] = []
        if path in ("/", "/index.html"):
            body = _patched_index(self.server.model_name)
            content_type = _MIME_TYPES[".html"]
            expires = (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=3650)).strftime(
                "%a, %d %b %Y %H:%M:%S GMT"
            )
            extra.append(("Set-Cookie", f"consent={int(time.time() * 1000)}; Path=/; Expires={expires}; SameSite=Strict"))
        elif path == f"/data/{self.server.model_name}":
            try:
                body = self.server.model_path.read_bytes()
            except OSError:  # stopped while this request was in flight
                body = None
        elif not path.startswith("/data/"):
            name = path.lstrip("/")
            candidate = (NETRON_DIR / name).resolve()
            # Only plain files of the netron package, never anything outside it.
            if (
                name
                and "/" not in name
                and candidate.parent == NETRON_DIR
                and candidate.suffix in _MIME_TYPES
                and candidate.is_file()
            ):
                body = candidate.read_bytes()
                content_type = _MIME_TYPES[candidate.suffix]
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def handle_error(self, request, client_address) -> None:
        # A browser that navigates away mid-response resets the socket; that is not an error.
        import sys  # noqa: PLC0415

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def __init__(self, model_path: Path) -> None:
        super().__init__((HOST, 0), _Handler)
        self.model_path = model_path
        self.model_name = model_path.name
        self.requests: list[str] = []


class NetronServer:
    """One netron UI server for one model file; ``start()`` returns its 127.0.0.1 URL."""

    def __init__(self) -> None:
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.source: Path | None = None

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._server is not None

    @property
    def url(self) -> str | None:
        """The page URL, or None when stopped."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    @property
    def requests(self) -> list[str]:
        """Paths requested so far (for diagnostics and tests)."""
        return list(self._server.requests) if self._server is not None else []

    def start(self, model_path: str | os.PathLike[str]) -> str:
        """Serve ``model_path`` (and only it); restarts if another file was served."""
        source = Path(model_path).resolve()
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such file; export a Circle model first")
        self.stop()
        self._server = _Server(source)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="ptq-netron-server", daemon=True
        )
        self._thread.start()
        self.source = source
        return self.url or ""

    def stop(self) -> None:
        """Stop serving and delete the private copy."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.source = None
