"""Netron tab: the exported graph in an embedded, offline-only web view."""

from __future__ import annotations

import webbrowser
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPushButton,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.netron_server import HOST, NetronServer
from app.qt_common import QtMessageLine

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

_ALLOWED_SCHEMES = {"data", "blob", "about", "qrc"}


def _webengine():
    """Import Qt WebEngine lazily: it is heavy and may be missing or broken on a bare machine."""
    from PySide6.QtWebEngineCore import (  # noqa: PLC0415 -- optional and heavy: the tab works without it
        QWebEnginePage,
        QWebEngineProfile,
        QWebEngineUrlRequestInterceptor,
    )
    from PySide6.QtWebEngineWidgets import QWebEngineView  # noqa: PLC0415 -- optional, as above

    class LocalOnlyInterceptor(QWebEngineUrlRequestInterceptor):
        """Blocks every request that is not for the local netron server (no telemetry, no lookups)."""

        def __init__(self, parent=None) -> None:
            super().__init__(parent)
            self.port: int | None = None
            self.seen: list[str] = []
            self.blocked: list[str] = []

        def interceptRequest(self, info) -> None:  # noqa: N802 - Qt override
            url = info.requestUrl()
            text = url.toString()
            self.seen.append(text)
            scheme = url.scheme()
            if scheme in _ALLOWED_SCHEMES:
                return
            local = scheme == "http" and url.host() == HOST and (self.port is None or url.port() == self.port)
            if not local:
                self.blocked.append(text)
                info.block(True)

    return QWebEngineView, QWebEnginePage, QWebEngineProfile, LocalOnlyInterceptor


class QtNetronTab(QWidget):
    """Starts the 127.0.0.1 netron server on demand and shows it; stops it on shutdown."""

    sigLoaded = Signal(bool)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self.server = NetronServer()
        self.view = None
        self.page = None
        self.profile = None
        self.interceptor = None
        self.webengine_error: str | None = None

        self.file_label = QLabel("No model served")
        self.file_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.browser_button = QPushButton("Open in browser")
        self.browser_button.setObjectName("openInBrowserButton")
        self.browser_button.setEnabled(False)
        self.reload_button = QPushButton("Reload")
        self.reload_button.setEnabled(False)
        self.message = QtMessageLine()

        self.placeholder = QLabel(
            "Export a Circle model, then press “Open in Netron” to inspect its graph here.\n"
            "The graph is served only to this machine (127.0.0.1) and nothing leaves it."
        )
        self.placeholder.setAlignment(Qt.AlignCenter)
        self.placeholder.setWordWrap(True)
        self.placeholder.setStyleSheet("color: palette(dark); font-size: 13px;")
        self.stack = QStackedWidget()
        self.stack.addWidget(self.placeholder)

        bar = QHBoxLayout()
        bar.addWidget(self.file_label, 1)
        bar.addWidget(self.reload_button)
        bar.addWidget(self.browser_button)
        layout = QVBoxLayout(self)
        layout.addLayout(bar)
        layout.addWidget(self.stack, 1)
        layout.addWidget(self.message)

        self.browser_button.clicked.connect(self.open_in_browser)
        self.reload_button.clicked.connect(self._reload)
        # Whatever ends this widget (close, deletion, app exit) ends the server too.
        self.destroyed.connect(self.server.stop)

    @property
    def url(self) -> str | None:
        """The served page URL, or None."""
        return self.server.url

    def _ensure_view(self) -> bool:
        if self.view is not None:
            return True
        if self.webengine_error is not None:
            return False
        try:
            view_cls, page_cls, profile_cls, interceptor_cls = _webengine()
            # An off-the-record profile: nothing of netron's state is written to disk.
            self.profile = profile_cls()
            self.interceptor = interceptor_cls(self.profile)
            self.profile.setUrlRequestInterceptor(self.interceptor)
            self.view = view_cls()
            self.view.setObjectName("netronView")
            self.page = page_cls(self.profile, self.view)
            # The profile must outlive its page: as the page's child it is deleted right after it.
            self.profile.setParent(self.page)
            self.view.setPage(self.page)
            self.page.loadFinished.connect(self._on_load_finished)
            self.page.renderProcessTerminated.connect(self._on_render_died)
        except Exception as exc:  # noqa: BLE001 - any WebEngine failure falls back to the browser
            self.webengine_error = f"Qt WebEngine could not start ({type(exc).__name__}: {exc})."
            self._show_fallback()
            return False
        self.stack.addWidget(self.view)
        return True

    def _show_fallback(self) -> None:
        fallback = QLabel(
            f"{self.webengine_error}\nThe graph can still be viewed in your web browser: press “Open in browser”."
        )
        fallback.setObjectName("netronFallback")
        fallback.setAlignment(Qt.AlignCenter)
        fallback.setWordWrap(True)
        self.stack.addWidget(fallback)
        self.stack.setCurrentWidget(fallback)
        self.message.show_message(self.webengine_error, "error")

    def show_model(self, path: str) -> str:
        """Serve ``path`` and show it; returns the local URL."""
        try:
            url = self.server.start(path)
        except OSError as exc:
            self.message.show_message(f"Cannot serve {path}: {exc}", "error")
            return ""
        self.file_label.setText(f"{path}  ·  served at {url}")
        self.browser_button.setEnabled(True)
        self.reload_button.setEnabled(True)
        if self._ensure_view():
            self.interceptor.port = int(QUrl(url).port())
            self.stack.setCurrentWidget(self.view)
            self.message.show_message("Loading the graph…")
            self.view.load(QUrl(url))
        return url

    def open_in_browser(self) -> None:
        """Open the served page in the system browser (the fallback when WebEngine is missing)."""
        if self.server.url:
            webbrowser.open(self.server.url)

    def _reload(self) -> None:
        if self.view is not None:
            self.view.reload()

    def _on_load_finished(self, ok: bool) -> None:
        if ok:
            blocked = len(self.interceptor.blocked) if self.interceptor is not None else 0
            note = f" ({blocked} outside request(s) blocked)" if blocked else ""
            self.message.show_message(f"Graph loaded from {self.server.url}{note}.", "ok")
        else:
            self.message.show_message("The netron page did not load; try Reload or Open in browser.", "error")
        self.sigLoaded.emit(bool(ok))

    def _on_render_died(self, _status, code: int) -> None:
        self.message.show_message(
            f"The web view's renderer stopped (code {code}); use Reload or Open in browser.", "error"
        )

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the server and release the web engine objects in a safe order."""
        self.server.stop()
        if self.view is not None:
            import shiboken6  # noqa: PLC0415 -- only needed when a web view was made

            self.view.stop()
            self.stack.removeWidget(self.view)
            # Delete now, while the QApplication is alive: the view takes its page, the page its profile.
            shiboken6.delete(self.view)
            self.view = self.page = self.profile = self.interceptor = None
