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


def _divergence(located: int, inputs, outputs, reference: float, unit: str = "layer"):
    from core.analysis.divergence import DivergenceEntry, DivergenceResult, jump_db

    names = ["patch_embedder"] + [f"encoder.layers.{i}" for i in range(len(inputs) - 3)] + ["pooler", "model"]
    entries = [
        DivergenceEntry(name, "layer", i, o, o + 3.0, jump_db(i, o, reference), 0.0, 0.0)
        for name, i, o in zip(names, inputs, outputs)
    ]
    return DivergenceResult(unit, entries, entries[located], ["a.jpg"], reference_db=reference)


def _numbers(text: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"(-?\d+\.\d) dB", text)]


def test_divergence_banner_numbers_add_up_and_the_marked_unit_has_a_label(qtbot):
    import math

    from app.qt_errors_tab import QtDivergenceBanner, QtDivergenceChart

    banner = QtDivergenceBanner()
    qtbot.addWidget(banner)
    chart = QtDivergenceChart()
    qtbot.addWidget(chart)
    # Layer 5 reads a 34.24 dB input, cleaner than the 28.46 dB reference: its loss counts from the reference.
    inputs = [math.inf, 40.0, 39.0, 37.0, 36.0, 35.0, 34.24, 17.54, 17.0, 16.5, 16.4, 16.3]
    outputs = inputs[1:] + [16.2]
    result = _divergence(6, inputs, outputs, reference=28.46)
    banner.set_result(result)
    text = banner.text_label.text()
    assert "\n" not in text and text.startswith("first divergence: encoder.layers.5 loses ")
    loss, start, inp, counted, out = _numbers(text)[:5]
    assert (start, inp, counted, out) == (28.5, 34.2, 28.5, 17.5)
    assert loss == round(start - out, 1) and abs(loss - result.located.jump_db) < 0.1
    assert "median SQNR a unit keeps when it alone is quantized" in text  # the reference is explained
    # An ordinary input: from the input's SQNR to the output's.
    result = _divergence(6, inputs, outputs, reference=38.0)
    banner.set_result(result)
    loss, start, out = _numbers(banner.text_label.text())[:3]
    assert (start, out) == (34.2, 17.5) and loss == round(start - out, 1)
    # The marked unit is labelled on the chart's axis, though the regular labels fall on every other unit,
    # and its neighbours' labels give way so none prints over it.
    chart.set_result(_divergence(7, inputs, outputs, reference=38.0))
    ticks = dict(chart.getAxis("bottom")._tickLevels[0])
    assert chart.marker.isVisible() and chart.marker.value() == 7
    assert ticks.get(7) == "layers.6" and 6 not in ticks and 8 not in ticks and ticks.get(4) == "layers.3"
