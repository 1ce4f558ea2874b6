"""The window always tells the truth, continued (issue 13): empty states, readable headers, reconcilable numbers.

Driven as a user drives it (pytest-qt, offscreen, the real core on the tiny model at 70 soft tokens).
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from test_app_truth import LONG, _calibrate, _wait_idle


def _visible_texts(widget) -> list[str]:
    from PySide6.QtWidgets import QLabel

    return [label.text() for label in widget.findChildren(QLabel) if label.isVisible()]


def test_ab_tab_shows_what_it_does_until_the_first_comparison(make_window, sample_images, qtbot):
    window = make_window(sample_images[:1])
    tab = window.ab_tab
    window.tabs.setCurrentWidget(tab)
    qtbot.waitUntil(tab.isVisible)

    def empty_state() -> None:
        # No empty 0-1 axes: the charts and the table are not shown at all, the how-to is.
        assert not tab.plot.isVisible() and not tab.delta_plot.isVisible() and not tab.table.isVisible()
        assert tab.empty_label.isVisible() and "Calibrate B and compare" in tab.empty_label.text()

    empty_state()
    _calibrate(qtbot, window)  # calibrating A clears the (absent) comparison: nothing was stale
    empty_state()
    assert not any("compare again" in text for text in _visible_texts(tab))
    with qtbot.waitSignal(tab.sigCompared, timeout=LONG):
        qtbot.mouseClick(tab.compare_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert tab.plot.isVisible() and tab.delta_plot.isVisible() and tab.table.isVisible()
    assert not tab.empty_label.isVisible()
    assert tab.summary_label.text().startswith("<b>End to end</b>")
    # Now there was a comparison: recalibrating A drops it, and the tab says so.
    _calibrate(qtbot, window)
    empty_state()
    assert "A changed since the last comparison" in tab.empty_label.text()


def test_threeway_headers_are_readable_and_say_what_they_mean(make_window, qtbot):
    window = make_window()
    tab = window.export_tab
    window.tabs.setCurrentWidget(tab)
    table = tab.threeway_table
    qtbot.waitUntil(table.isVisible)
    header = table.horizontalHeader()
    lines = max(len(table.horizontalHeaderItem(c).text().splitlines()) for c in range(table.columnCount()))
    assert header.height() >= lines * header.fontMetrics().height()  # two-line headers get two lines
    # Not cut off: every column is as wide as its header's text needs.
    cut = [name for c, name in enumerate(tab.THREEWAY_COLUMNS) if table.columnWidth(c) < header.sectionSizeHint(c)]
    assert not cut
    assert all(table.horizontalHeaderItem(c).toolTip() for c in range(table.columnCount()))
    peir = tab.THREEWAY_COLUMNS.index("Fake-quant vs Circle PEIR")
    assert "Fake-quant vs Circle PEIR" in table.horizontalHeaderItem(peir).toolTip()
