"""Entry point of the desktop app: ``ptq-studio`` with no arguments calls ``main()``."""

from __future__ import annotations

import os
import sys


def prepare_qt_environment() -> None:
    """Settings Qt reads before the QApplication exists (WebEngine needs both)."""
    from PySide6.QtCore import QCoreApplication, Qt  # noqa: PLC0415 -- Qt loads only when the GUI opens

    # Qt WebEngine (the Netron tab) is created lazily, which needs shared GL contexts set first.
    QCoreApplication.setAttribute(Qt.AA_ShareOpenGLContexts, True)
    # Chromium refuses to start its sandbox as root (containers, CI); the page is local-only.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags = os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "")
        if "--no-sandbox" not in flags:
            os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = (flags + " --no-sandbox").strip()


def main(argv: list[str] | None = None) -> int:
    """Open the main window on the built-in tiny model with the bundled sample images."""
    argv = list(sys.argv if argv is None else argv)
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")
    ):
        print(
            "ptq-studio: error: no display found; run `xvfb-run -a ptq-studio`, set QT_QPA_PLATFORM=offscreen,"
            " or use the headless commands (ptq-studio --help)",
            file=sys.stderr,
        )
        return 2
    prepare_qt_environment()
    from PySide6.QtWidgets import QApplication  # noqa: PLC0415 -- Qt loads only when the GUI opens

    from app.qt_main_window import QtMainWindow  # noqa: PLC0415 -- torch and Qt load after the display check
    from core.data.resources import sample_images  # noqa: PLC0415 -- torch loads after the display check

    app = QApplication.instance() or QApplication(argv)
    app.setApplicationName("PTQ Studio")
    app.setOrganizationName("PTQ Studio")
    window = QtMainWindow(model_spec="tiny", images=sample_images())
    window.show()
    code = app.exec()
    window.shutdown()
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
