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


def test_a_later_step_keeps_the_runner_busy_until_it_ran(qtbot):
    """A result drawn in two passes (SessionRunner.later) is one busy stretch: idle is announced once, after
    the last pass, and only after a later pass of the event loop (the window paints in between)."""
    runner = SessionRunner()
    busy_changes: list[bool] = []
    runner.sigBusyChanged.connect(busy_changes.append)
    seen: list[tuple[str, bool]] = []

    def second_pass() -> None:
        seen.append(("second", runner.busy))

    def first_pass(_result) -> None:
        runner.later("drawing", second_pass)
        seen.append(("first", runner.busy))
        assert runner.pending() == ["drawing"] and runner.queued() == []  # drawing is not a queued task

    try:
        with qtbot.waitSignal(runner.sigBusyChanged, check_params_cb=lambda busy: not busy, timeout=10_000):
            runner.submit("evaluate", lambda: 1, takes_progress=False, on_done=first_pass)
        assert seen == [("first", True), ("second", True)]
        assert busy_changes == [True, False] and not runner.busy
    finally:
        assert runner.shutdown()


def test_the_errors_tab_draws_the_final_result_in_two_passes(qtbot):
    """The table is on screen when the evaluation's callback returns; the diagnostics start on a later pass."""
    from types import SimpleNamespace

    from app.qt_errors_tab import QtErrorsTab

    later: list = []
    host = SimpleNamespace(submit=lambda *a, **k: None, later=lambda name, fn: later.append((name, fn)))
    tab = QtErrorsTab(host)
    qtbot.addWidget(tab)
    started: list = []
    tab.diagnostics.start = lambda *args: started.append(args)
    modules = [
        SimpleNamespace(name=f"encoder.layers.{i}", kind="layer", sqnr_db=20.0 - i, peir=0.1, mse=0.1, max_abs=1.0,
                        cosine=0.9, clipped_fraction=0.0, samples_fp=[0.0, 1.0], samples_q=[0.0, 1.0])
        for i in range(3)
    ]
    result = SimpleNamespace(modules=modules, images=["a"], keep_float=[], end_to_end=SimpleNamespace(sqnr_db=9.0, peir=0.2))
    tab.stream.running = True
    tab._on_evaluated(result, 1, SimpleNamespace(compare=result))  # noqa: SLF001 -- the worker's callback
    assert tab.result is result and tab.model.rowCount() == len(result.modules) and started == []
    with qtbot.waitSignal(tab.sigEvaluated, timeout=1000):
        [(name, fn)] = later
        fn()
    assert len(started) == 1 and name == "drawing the analysis"


def test_a_steady_label_grows_with_its_text_and_never_shrinks_back(qtbot):
    """Streamed texts must not re-lay out the tab each time they get shorter or longer again."""
    from app.qt_common import QtSteadyLabel

    label = QtSteadyLabel("", lines=1)
    qtbot.addWidget(label)
    label.resize(200, label.minimumHeight())
    one_line = label.minimumHeight()
    assert one_line == label.fontMetrics().lineSpacing()
    label.setText("a sentence long enough to wrap onto several lines at two hundred pixels wide " * 3)
    grown = label.minimumHeight()
    assert grown >= 3 * one_line
    label.setText("short")
    assert label.minimumHeight() == grown
