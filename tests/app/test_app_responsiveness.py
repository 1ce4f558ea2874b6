"""What keeps the window responsive while the worker thread computes (measured by bench/bench_gui.py)."""

from __future__ import annotations

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
