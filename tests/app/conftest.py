"""pytest-qt setup for the GUI tests: offscreen, WebEngine-ready, no thread left behind."""

from __future__ import annotations

import gc
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
            # Collect the closed window's Qt wrappers here, on the GUI thread. Left in reference
            # cycles, they were collected by whichever thread next triggered the cyclic GC: a
            # later test's worker, whose ~QObject then waited for the GIL while the GUI thread,
            # deleting a QMenu, waited for that QObject's mutex (a deadlock seen in CI).
            gc.collect()
            return
        time.sleep(0.05)
    pytest.fail(f"test left threads running: {[t.objectName() for t in qthreads] + [t.name for t in extra]}")


@pytest.fixture
def qsettings(tmp_path):
    """A private settings file, so tests never touch the user's QSettings."""
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)


@pytest.fixture
def make_window(qtbot, qsettings):
    """A main window on the tiny model at 70 soft tokens, shown at 1280x800, idle once its session is loaded."""
    from app.qt_main_window import QtMainWindow

    def make(images=(), session_factory=None) -> QtMainWindow:
        window = QtMainWindow(
            model_spec="tiny",
            images=list(images),
            max_soft_tokens=70,
            settings=qsettings,
            session_factory=session_factory,
        )
        qtbot.addWidget(window)  # alive until pytest-qt closes it after the test
        window.resize(1280, 800)
        window.show()
        # Loading the model runs in the worker; 180 s because the CI's 2 cores are shared.
        qtbot.waitUntil(lambda: window.session is not None and not window.runner.busy, timeout=180_000)
        return window

    return make
