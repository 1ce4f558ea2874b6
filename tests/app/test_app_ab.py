"""The A/B tab follows the Session's events itself (no main-window call), and its view state."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from PySide6.QtCore import Qt
from test_app_truth import LONG, _calibrate, _wait_idle

from app.ab_state import ABViewState
from core.cancel import CancelToken


def test_view_state_drops_a_comparison_only_when_a_changes():
    view = ABViewState()
    assert view.a_changed(1) and not view.stale  # nothing was shown: the how-to, not "compare again"
    view.compared("result", 1)
    assert not view.a_changed(1) and view.result == "result"  # the compared statistics, restored
    assert view.a_changed(2) and view.stale and view.result is None
    assert view.a_changed(0) and not view.stale  # a second change has nothing left to drop
    view.compared("result", 3)
    assert view.a_changed(None) and view.stale  # None (a new session) always drops it


def test_ab_tab_follows_calibrated_config_changed_and_exported(make_window, sample_images, qtbot):
    window = make_window(sample_images[:1])
    tab = window.ab_tab
    session = window.session
    window.tabs.setCurrentWidget(tab)
    _calibrate(qtbot, window)
    with qtbot.waitSignal(tab.sigCompared, timeout=LONG):
        qtbot.mouseClick(tab.compare_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert tab.result is not None and tab.view.stats_version == session.stats_version

    # Driven through the session alone (on this thread, so the events arrive at once).
    cancelled = CancelToken()
    cancelled.cancel()
    session.calibrate(cancel=cancelled)  # restores the compared statistics: the comparison holds
    assert tab.result is not None and not tab.empty_label.isVisible()
    session.calibrate()  # new statistics: the comparison no longer holds, and the tab says so
    assert tab.result is None and tab.empty_label.isVisible()
    assert "A changed since the last comparison" in tab.empty_label.text()

    session.set_config(replace(session.config, observer="ema"))
    assert "observer ema" in tab.config_a_label.text()
    assert "A changed" not in tab.empty_label.text()  # nothing was left to drop

    session.events.exported.emit(SimpleNamespace(tensor_modules={"circle/t0": "pooler"}, path="stand-in.circle", bytes=1024))
    assert tab.view.tensor_modules == {"circle/t0": "pooler"}
