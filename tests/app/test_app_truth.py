"""The window always tells the truth (issue 13, item 4): what it says matches what the core did.

Driven as a user drives it (pytest-qt, offscreen, the real core on the tiny model at 70 soft tokens).
"""

from __future__ import annotations

import threading
import time

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton

import app.qt_common
from app.qt_common import QtTaskProgress
from core.session import Session

LONG = 180_000  # ms; calibration, evaluation and the locator share 2 busy cores in CI


def _wait_idle(qtbot, window, timeout=LONG):
    qtbot.waitUntil(lambda: window.session is not None and not window.runner.busy, timeout=timeout)


class _SlowSession(Session):
    """The real Session, with a pause per image so Cancel and the progress text can be caught mid-run."""

    def batches(self, entries, batch_size=1):
        for batch in super().batches(entries, batch_size):
            time.sleep(0.3)
            yield batch


def _slow(spec, cfg, mst, device="cpu") -> Session:
    return _SlowSession(spec, cfg, mst, device=device)


def _calibrate(qtbot, window) -> None:
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(window.findChild(QPushButton, "calibrateButton"), Qt.LeftButton)
    _wait_idle(qtbot, window)


def test_cancelled_recalibration_says_the_earlier_one_is_restored(make_window, sample_images, qtbot):
    window = make_window(sample_images[:3], session_factory=_slow)
    _calibrate(qtbot, window)
    summary = window.model_panel.summary["calibration"].text()
    assert summary.startswith("3/3 images")
    evaluated = window.errors_tab.result
    tab = window.calibration_tab
    qtbot.mouseClick(tab.calibrate_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: tab.progress.bar.value() >= 1, timeout=LONG)
    with qtbot.waitSignal(tab.sigCalibrated, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.cancel_button, Qt.LeftButton)
    assert blocker.args[0].cancelled
    text = tab.message.text()
    assert "earlier calibration (3/3 images) is restored" in text and "completed images are kept" not in text
    # The summary still names the earlier calibration, and nothing is re-run on unchanged statistics.
    assert window.model_panel.summary["calibration"].text() == summary
    assert not window.runner.busy
    assert window.errors_tab.result is evaluated
    assert window.session.state == "calibrated" and tab.calibrate_button.isEnabled()


def test_eta_counts_from_when_the_task_started(qtbot, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(app.qt_common.time, "monotonic", lambda: clock[0])
    progress = QtTaskProgress()
    qtbot.addWidget(progress)
    progress.begin(25, "images", "calibrating…")
    clock[0] += 600  # queued behind a run being cancelled
    progress.mark_started()
    clock[0] += 2
    progress.update_progress(1, 25)
    assert progress.bar.format().startswith("1/25 images · ETA 0:48")


def test_state_names_the_running_task_and_what_is_queued(make_window, qtbot):
    window = make_window()
    gate = threading.Event()
    window.submit("first job", lambda: gate.wait(60), takes_progress=False)
    window.submit("second job", lambda: None, takes_progress=False)
    state = window.model_panel.summary["state"]
    try:
        qtbot.waitUntil(lambda: state.text().startswith("first job…"), timeout=10_000)
        assert "queued: second job" in state.text()
        assert window.status_mode.text() == f"mode: {state.text()}"
    finally:
        gate.set()
    _wait_idle(qtbot, window)
    assert state.text() == window.session.state


def test_evaluation_progress_counts_images_and_the_banner_waits(make_window, sample_images, qtbot):
    window = make_window(sample_images[:3], session_factory=_slow)
    tab = window.errors_tab
    with qtbot.waitSignal(window.calibration_tab.sigCalibrated, timeout=LONG):
        qtbot.mouseClick(window.calibration_tab.calibrate_button, Qt.LeftButton)
    # The window has queued the evaluation; the locator follows it.
    assert "evaluate to locate" not in tab.banner.text_label.text()
    assert "waits for the evaluation" in tab.banner.text_label.text()
    qtbot.waitUntil(lambda: "/3 " in tab.progress.bar.format(), timeout=LONG)
    assert "/3 images" in tab.progress.bar.format()
    _wait_idle(qtbot, window)
    assert tab.progress.bar.format() == "evaluated on 3 images"


def test_calibrate_waits_for_changed_settings_to_be_applied(make_window, sample_images, qtbot):
    window = make_window(sample_images[:1])
    button = window.calibration_tab.calibrate_button
    assert button.isEnabled()
    panel = window.model_panel
    panel.activation_combo.setCurrentIndex(panel.activation_combo.findText("int16"))
    assert not button.isEnabled()
    assert "Apply the changed settings first" in button.toolTip()
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert button.isEnabled() and window.session.config.activation.dtype == "int16"


def test_export_tab_after_calibration_and_its_layout_choice(make_window, sample_images, qtbot, monkeypatch):
    from pathlib import Path

    from core.data.grid import patch_layout
    from core.errors import ExportError

    window = make_window(sample_images[:2])
    tab = window.export_tab
    assert tab.message.text().startswith("Calibrate first")
    home = Path.home()
    assert Path(tab.path_edit.text()).parent != home and Path(tab.path_edit.text()).name == "gemma4_vision_tiny.circle"
    _calibrate(qtbot, window)
    assert not tab.message.text().startswith("Calibrate first") and "Ready to export" in tab.message.text()
    # The file is built for one calibration image's patch grid, the first by default; the tab says which.
    assert [tab.layout_combo.itemData(i) for i in range(tab.layout_combo.count())] == [str(p) for p in sample_images[:2]]
    session = window.session

    def grid(path):
        return patch_layout(session.qmodel, session.preprocessor([path])["pixel_position_ids"]).grid

    rows, cols = grid(sample_images[0])
    assert tab.layout_label.text() == f"the file is fixed to {rows}×{cols} patches of {sample_images[0].name}"
    tab.layout_combo.setCurrentIndex(1)
    _wait_idle(qtbot, window)
    rows, cols = grid(sample_images[1])
    assert tab.layout_label.text() == f"the file is fixed to {rows}×{cols} patches of {sample_images[1].name}"
    asked = {}

    def fake_export(out, image=None, **kw):
        asked["image"] = image
        asked["in_process"] = kw.get("in_process", True)
        raise ExportError("stopped by the test", out)

    monkeypatch.setattr(session, "export", fake_export)
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert asked["image"] == str(sample_images[1])
    assert asked["in_process"] is False  # a child process converts: the window must not stall


def test_default_export_path_follows_the_model(make_window, sample_images, qtbot):
    def factory(spec, cfg, mst, device="cpu"):
        # A tiny model standing in for e2b: the test is about the file name, not the model's size.
        session = Session("tiny", cfg, mst, device=device)
        session.model_spec = spec
        return session

    window = make_window()
    window._session_factory = factory
    assert window.export_tab.path_edit.text().endswith("gemma4_vision_tiny.circle")
    panel = window.model_panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("e2b"))
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert window.export_tab.path_edit.text().endswith("gemma4_vision_e2b.circle")
    # A path the user typed is theirs: it does not follow the model.
    window.export_tab.path_edit.setText("/tmp/mine.circle")
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("tiny"))
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert window.export_tab.path_edit.text() == "/tmp/mine.circle"


def test_ranges_summary_names_the_widest_range_and_log_mode_draws_both_ends(make_window, sample_images, qtbot):
    import numpy as np

    from app.qt_common import scalar

    window = make_window(sample_images[:2])
    window.resize(1400, 900)
    _calibrate(qtbot, window)
    tab = window.ranges_tab
    records = window.session.observer_table()
    n_out = sum(r.outlier for r in records)
    mags = [max(abs(scalar(r.min, "min")), abs(scalar(r.max, "max"))) for r in records]
    widest = records[int(np.nanargmax(mags))]
    text = tab.summary.text()
    assert f"{n_out} with outlier values" in text and f"widest: #{int(np.nanargmax(mags))} {widest.name}" in text
    assert f"{n_out} outliers" not in text
    # Log mode: |min| is drawn as measured, not as a flat line at the floor.
    tab.log_radio.click()
    mins = np.abs([scalar(r.min, "min") for r in records])
    shown = np.asarray(tab._min_curve.yData, dtype=float)
    keep = mins > 0
    np.testing.assert_allclose(shown[keep], mins[keep])
    assert np.unique(shown[np.isfinite(shown)]).size > 1


@pytest.fixture
def ranges_at_1400(make_window, sample_images, qtbot):
    window = make_window(sample_images[:2])
    window.resize(1400, 900)
    _calibrate(qtbot, window)
    window.tabs.setCurrentWidget(window.ranges_tab)
    qtbot.waitUntil(lambda: window.ranges_tab.table.isVisible())
    return window


def test_ranges_table_shows_min_and_max_at_1400(ranges_at_1400):
    table = ranges_at_1400.ranges_tab.table
    for column in (6, 7):  # Min, Max
        x = table.columnViewportPosition(column)
        assert 0 <= x and x + table.columnWidth(column) <= table.viewport().width(), column


def test_ranges_panes_keep_their_width_when_a_row_is_selected(ranges_at_1400, qtbot):
    window = ranges_at_1400
    tab = window.ranges_tab
    table = tab.table
    lower = tab.table_tabs.parentWidget()
    before = lower.sizes()
    for row in (3, 40):
        index = table.model().index(row, 1)
        table.scrollTo(index)
        qtbot.mouseClick(table.viewport(), Qt.LeftButton, pos=table.visualRect(index).center())
        _wait_idle(qtbot, window)
        assert lower.sizes() == before


def test_heatmap_fills_its_view_when_the_errors_tab_is_first_opened(make_window, sample_images, qtbot):
    window = make_window(sample_images[:2])
    assert window.tabs.currentWidget() is window.calibration_tab
    _calibrate(qtbot, window)  # the maps arrive while the Errors tab is hidden
    heatmap = window.errors_tab.heatmap
    qtbot.waitUntil(lambda: heatmap.heatmap is not None, timeout=LONG)
    window.tabs.setCurrentWidget(window.errors_tab)
    window.errors_tab.detail_tabs.setCurrentWidget(heatmap)
    qtbot.waitUntil(lambda: heatmap.view.isVisible())
    h, w = heatmap.photo_item.image.shape[:2]

    def fitted() -> bool:
        (x0, x1), (y0, y1) = heatmap.vb.viewRange()
        contains = x0 <= 0 and x1 >= w and y0 <= 0 and y1 >= h
        # Aspect locked: one side is tight, the other may have room. A speck has room on both.
        return contains and min((x1 - x0) / w, (y1 - y0) / h) < 1.2

    qtbot.waitUntil(fitted, timeout=5_000)
    # After the user zooms in, Fit brings the whole image back.
    heatmap.vb.scaleBy((0.2, 0.2))
    assert not fitted()
    qtbot.mouseClick(heatmap.fit_button, Qt.LeftButton)
    qtbot.waitUntil(fitted, timeout=5_000)


def test_same_named_files_are_told_apart_and_counts_are_plural_right(make_window, sample_images, tmp_path, qtbot):
    import shutil

    from test_app_window import drop_paths

    for folder, source in (("a", sample_images[0]), ("b", sample_images[1])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "photo.jpg")
    window = make_window([tmp_path / "a" / "photo.jpg"])
    tab = window.calibration_tab
    assert tab.count_label.text().startswith("1 image ·")
    drop_paths(window.findChild(type(tab.drop_zone), "dropZone"), [tmp_path / "b" / "photo.jpg"])
    _wait_idle(qtbot, window)
    assert [tab.model.item(r).text() for r in range(tab.model.rowCount())] == ["a/photo.jpg", "b/photo.jpg"]
    assert tab.count_label.text().startswith("2 images ·")


def test_window_fits_the_screen_and_says_the_weights_are_random(make_window, qtbot):
    window = make_window()
    free = window.screen().availableGeometry()
    size = window.default_size()
    assert size.width() <= free.width() and size.height() <= free.height()
    # The window can shrink onto a 1280x800 screen and a 1366x768 one with a 28 px panel.
    least = window.minimumSizeHint()
    assert least.width() <= 1280 and least.height() <= 740, least
    assert "random weights" in window.model_panel.model_info.text()
    combo = window.model_panel.model_combo
    assert "not trained" in combo.itemData(combo.findData("tiny"), Qt.ToolTipRole)
