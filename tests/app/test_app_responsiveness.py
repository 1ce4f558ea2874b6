"""What keeps the window responsive while the worker thread computes (measured by bench/bench_gui.py)."""

from __future__ import annotations

import gc
import sys

import pytest

from app.workers import GIL_SWITCH_INTERVAL_S, SessionRunner


@pytest.fixture
def switch_interval():
    """Restore the interpreter's GIL switch interval after the test."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_runner_shortens_the_gil_switch_interval(qtbot, switch_interval):
    """The UI thread gets the GIL back within GIL_SWITCH_INTERVAL_S of asking once a worker thread exists."""
    sys.setswitchinterval(0.005)  # CPython's default
    runner = SessionRunner()
    try:
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
    finally:
        assert runner.shutdown()


def test_runner_never_lengthens_a_shorter_interval(qtbot, switch_interval):
    """An interval already shorter (set by the user or an embedding app) is kept."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S / 2)
    runner = SessionRunner()
    try:
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S / 2)
    finally:
        assert runner.shutdown()


@pytest.fixture
def unfrozen():
    """Start and end with no object frozen out of the garbage collector's scans."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_runner_freezes_the_objects_alive_after_its_first_task_only(qtbot, unfrozen):
    """What the first task (the model load) left alive is frozen once; later tasks' objects stay collectable."""
    runner = SessionRunner()
    try:
        with qtbot.waitSignal(runner.sigBusyChanged, check_params_cb=lambda busy: not busy):
            runner.submit("load", lambda: [object() for _ in range(100)], takes_progress=False)
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        with qtbot.waitSignal(runner.sigBusyChanged, check_params_cb=lambda busy: not busy):
            runner.submit("analyse", lambda: [[] for _ in range(100)], takes_progress=False)
        assert gc.get_freeze_count() == 0
    finally:
        assert runner.shutdown()
