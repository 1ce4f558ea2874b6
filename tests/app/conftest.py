"""pytest-qt setup for the GUI tests: offscreen, WebEngine-ready, no thread left behind."""

from __future__ import annotations

import os
import threading
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from app.main import prepare_qt_environment  # noqa: E402

# Must run before pytest-qt creates the QApplication (WebEngine needs shared GL contexts).
prepare_qt_environment()


@pytest.fixture(autouse=True)
def no_thread_left_running():
    """Fail a test that leaves a worker QThread or a server thread running."""
    from app.workers import live_threads

    before = {t for t in threading.enumerate() if t.is_alive()}
    yield
    # Closing the window (pytest-qt's teardown, which runs before this one) stops the threads;
    # give them a moment to notice.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        qthreads = live_threads()
        extra = [t for t in threading.enumerate() if t.is_alive() and t not in before and t.name.startswith("ptq-")]
        if not qthreads and not extra:
            return
        time.sleep(0.05)
    pytest.fail(f"test left threads running: {[t.objectName() for t in qthreads] + [t.name for t in extra]}")


@pytest.fixture
def qsettings(tmp_path):
    """A private settings file, so tests never touch the user's QSettings."""
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
