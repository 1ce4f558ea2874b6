"""The desktop app, driven as a user drives it (pytest-qt, offscreen, the real core)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QPushButton, QWidget

from app.qt_main_window import QtMainWindow
from core.session import Session

LONG = 120_000  # ms; calibrating on 2 shared cores can be slow


def _wait_idle(qtbot, window, timeout=LONG):
    qtbot.waitUntil(lambda: window.session is not None and not window.runner.busy, timeout=timeout)


def drop_paths(widget: QWidget, paths: list[Path]) -> QDropEvent:
    """Drag file URLs onto widget and drop them, as the desktop does."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    pos = widget.rect().center()
    enter = QDragEnterEvent(pos, Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)  # a QPoint in PySide6 6.11
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted(), "the drop zone refused a drag of local files"
    drop = QDropEvent(QPointF(pos), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, drop)
    return drop


def calibrate(qtbot, window) -> None:
    """Press Calibrate and wait for the ranges and errors to be shown."""
    button = window.findChild(QPushButton, "calibrateButton")
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(button, Qt.LeftButton)
    _wait_idle(qtbot, window)


def click_row(qtbot, table, proxy_row: int) -> None:
    """Click the first cell of a table row."""
    index = table.model().index(proxy_row, 1)
    table.scrollTo(index)
    rect = table.visualRect(index)
    qtbot.mouseClick(table.viewport(), Qt.LeftButton, pos=rect.center())


# -- the window ---------------------------------------------------------------------------


def test_opens_on_tiny_with_samples_and_object_names(make_window, sample_images):
    window = make_window(sample_images)
    for name in ("modelPanel", "dropZone", "calibrateButton", "cancelButton", "rangesTable", "rangesPlot",
                 "errorsTable", "scatterPlot", "exportButton"):
        assert window.findChild(QWidget, name) is not None, name
    shown = window.calibration_tab.entries_by_status()
    assert [Path(p).name for p in shown] == [p.name for p in sample_images]
    assert set(shown.values()) == {"ok"}
    assert window.session.model_spec == "tiny" and window.session.max_soft_tokens == 70
    assert "tiny" in window.status_model.text()
    assert f"images: {len(sample_images)}" in window.status_images.text()
    assert "memory" in window.status_memory.text()
    qtbot_tabs = [window.tabs.tabText(i) for i in range(window.tabs.count())]
    assert qtbot_tabs == ["Calibration", "Ranges", "Errors", "Fix", "A/B", "Export", "Netron"]


def test_window_state_and_folders_kept_in_qsettings(make_window, qsettings, tmp_path):
    window = make_window()
    window.remember_folder("images", str(tmp_path))
    window.close()
    assert qsettings.value("window/geometry") is not None
    assert qsettings.value("window/state") is not None
    assert qsettings.value("folders/images") == str(tmp_path)


# -- calibration tab ----------------------------------------------------------------------


def test_drop_files_and_a_folder(make_window, sample_images, tmp_path, qtbot):
    window = make_window()
    folder = tmp_path / "more"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(sample_images[2], folder / "a.jpg")
    shutil.copy(sample_images[3], folder / "sub" / "b.jpg")
    zone = window.findChild(QWidget, "dropZone")
    drop = drop_paths(zone, [sample_images[0], sample_images[1], folder])
    assert drop.isAccepted()
    _wait_idle(qtbot, window)
    tab = window.calibration_tab
    shown = tab.entries_by_status()
    expected = {str(sample_images[0]), str(sample_images[1]), str(folder / "a.jpg"), str(folder / "sub" / "b.jpg")}
    assert set(shown) == expected
    assert set(shown.values()) == {"ok"}
    assert [e.path for e in window.session.images] == list(shown)
    # thumbnails are decoded off the UI thread and arrive as icons
    qtbot.waitUntil(lambda: len(tab._thumbs) == 4, timeout=10_000)
    assert not tab.model.item(0).icon().isNull()
    assert "4 images" in tab.count_label.text()
    # a drag with no local files is refused
    mime = QMimeData()
    mime.setText("hello")
    enter = QDragEnterEvent(QPoint(5, 5), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(zone, enter)
    assert not enter.isAccepted()
    # remove and clear
    tab.grid.setCurrentIndex(tab.model.index(0, 0))
    qtbot.mouseClick(tab.remove_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert len(tab.entries_by_status()) == 3 and len(window.session.images) == 3
    qtbot.mouseClick(tab.clear_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert tab.model.rowCount() == 0 and window.session.images == []


def test_bad_file_among_good_ones(make_window, sample_images, bad_images, qtbot):
    window = make_window()
    zone = window.findChild(QWidget, "dropZone")
    good = sample_images[:2]
    bad = bad_images["text_renamed.jpg"]
    drop_paths(zone, [good[0], bad, good[1]])
    _wait_idle(qtbot, window)
    tab = window.calibration_tab
    statuses = tab.entries_by_status()
    assert statuses[str(good[0])] == "ok" and statuses[str(good[1])] == "ok"
    assert statuses[str(bad)] == "rejected"
    row = list(statuses).index(str(bad))
    tooltip = tab.model.item(row).toolTip()
    reason = next(e.reason for e in window.session.images if e.path == str(bad))
    assert reason and reason in tooltip
    assert tab.message.level == "error" and bad.name in tab.message.text()
    # the good images are still there and calibration works on them
    calibrate(qtbot, window)
    statuses = tab.entries_by_status()
    assert statuses[str(good[0])] == "used" and statuses[str(bad)] == "rejected"


class _SlowSession(Session):
    """The real Session, with a pause per batch so a user can press Cancel in time."""

    def batches(self, entries, batch_size=1):
        import time

        for batch in super().batches(entries, batch_size):
            time.sleep(0.4)
            yield batch


def test_cancel_mid_calibration(make_window, sample_images, qtbot):
    window = make_window(sample_images[:6], session_factory=lambda spec, cfg, mst, device: _SlowSession(spec, cfg, mst, device=device))
    tab = window.calibration_tab
    qtbot.mouseClick(tab.calibrate_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: tab.progress.bar.value() >= 1, timeout=LONG)
    assert tab.cancel_button.isEnabled()
    with qtbot.waitSignal(tab.sigCalibrated, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.cancel_button, Qt.LeftButton)
    result = blocker.args[0]
    assert result.cancelled and 1 <= result.images_done < 6
    assert f"Cancelled after {result.images_done}/6 images" in tab.message.text()
    # the message says what the core kept
    if window.session.state == "calibrated":
        assert "are kept" in tab.message.text()
    else:
        assert "uncalibrated" in tab.message.text()
    assert tab.calibrate_button.isEnabled() and not tab.cancel_button.isEnabled()
    _wait_idle(qtbot, window)
    # the images and the window survive; calibrating again completes
    assert len(tab.entries_by_status()) == 6
    calibrate(qtbot, window)
    assert window.session.state == "calibrated"


# -- ranges and errors --------------------------------------------------------------------


@pytest.fixture
def calibrated(make_window, sample_images, qtbot):
    window = make_window(sample_images[:3])
    calibrate(qtbot, window)
    return window


def test_ranges_table_shows_the_cores_observers(calibrated, qtbot):
    window = calibrated
    tab = window.ranges_tab
    expected = window.session.observer_table()
    assert [r.name for r in tab.records] == [r.name for r in expected]
    model = tab.model
    for row, rec in enumerate(expected):
        assert model.data(model.index(row, 1)) == rec.name
        assert model.data(model.index(row, 6), Qt.UserRole + 10) == pytest.approx(float(np.min(rec.min)))
        assert model.data(model.index(row, 7), Qt.UserRole + 10) == pytest.approx(float(np.max(rec.max)))
    # the chart holds every observer in forward order
    xs, ys = tab._max_curve.getData()
    assert len(xs) == len(expected)
    assert ys == pytest.approx([float(np.max(r.max)) for r in expected])
    # filter by name
    tab.filter_edit.setText("layers.1.mlp")
    assert 0 < tab.proxy.rowCount() < len(expected)
    assert all("layers.1.mlp" in tab.proxy.data(tab.proxy.index(r, 1)) for r in range(tab.proxy.rowCount()))
    tab.filter_edit.clear()
    # sorting by max puts the widest range on top
    tab.table.sortByColumn(7, Qt.DescendingOrder)
    top = tab.proxy.data(tab.proxy.index(0, 1))
    assert top == max(expected, key=lambda r: float(np.max(r.max))).name
    # linear/log toggle
    tab.log_radio.setChecked(True)
    assert tab.plot.getPlotItem().ctrl.logYCheck.isChecked()
    tab.linear_radio.setChecked(True)


def test_selecting_an_observer_shows_histogram_grid_and_sources(calibrated, qtbot):
    tab = calibrated.ranges_tab
    calibrated.tabs.setCurrentWidget(tab)
    acts = [i for i, r in enumerate(tab.records) if r.kind == "activation" and r.scale is not None]
    target = tab.records[acts[len(acts) // 2]]
    tab.filter_edit.setText(target.name)
    proxy_row = next(r for r in range(tab.proxy.rowCount()) if tab.proxy.data(tab.proxy.index(r, 1)) == target.name)
    click_row(qtbot, tab.table, proxy_row)
    assert tab.detail_title.text().endswith(target.name)
    xs, ys = tab._hist_curve.getData()
    assert len(ys) == len(target.hist_counts)
    assert tab._qmin_line.isVisible() and tab._qmax_line.isVisible()
    # the grid ends where the observed range ends, give or take the zero-point's rounding
    step = float(np.max(target.scale))
    assert tab._qmin_line.value() == pytest.approx(float(np.min(target.min)), abs=1.01 * step)
    assert tab._qmax_line.value() == pytest.approx(float(np.max(target.max)), abs=1.01 * step)
    assert tab.min_caption.text() == str(target.min_source)
    assert tab.max_caption.text() == str(target.max_source)


def test_errors_table_shows_the_cores_values_worst_first(calibrated, qtbot):
    window = calibrated
    tab = window.errors_tab
    expected = window.session.evaluate()
    by_name = {m.name: m for m in expected.modules}
    assert tab.model.rowCount() == len(expected.modules) > 0
    shown = [tab.proxy.data(tab.proxy.index(r, 1)) for r in range(tab.proxy.rowCount())]
    assert set(shown) == set(by_name)
    sqnrs = [tab.proxy.data(tab.proxy.index(r, 3), Qt.UserRole + 20) for r in range(tab.proxy.rowCount())]
    assert sqnrs == sorted(sqnrs), "worst modules are not on top"
    for r in range(tab.proxy.rowCount()):
        name = tab.proxy.data(tab.proxy.index(r, 1))
        assert tab.proxy.data(tab.proxy.index(r, 3)) == f"{by_name[name].sqnr_db:.2f}"
    assert f"{expected.end_to_end.sqnr_db:.2f} dB" in tab.end_to_end_label.text()


def test_select_module_gives_scatter_points(calibrated, qtbot):
    tab = calibrated.errors_tab
    calibrated.tabs.setCurrentWidget(tab)
    click_row(qtbot, tab.table, 3)
    name = tab.proxy.data(tab.proxy.index(3, 1))
    assert tab.selected_module() == name
    module = next(m for m in tab.model.modules if m.name == name)
    xs, ys = tab.scatter.getData()
    assert len(xs) == min(len(np.ravel(module.samples_fp)), 20000) > 0
    assert np.allclose(xs, np.ravel(module.samples_fp)[: len(xs)])
    ix, iy = tab.scatter_panel.identity.getData()
    assert list(ix) == list(iy)  # the y = x line


def test_keep_float_and_reevaluate_shows_old_and_new(calibrated, qtbot):
    tab = calibrated.errors_tab
    old = tab.result.end_to_end.sqnr_db
    worst_name = tab.proxy.data(tab.proxy.index(0, 1))
    keep_index = tab.proxy.index(0, tab.model.KEEP_COL)
    assert tab.proxy.setData(keep_index, Qt.Checked.value, Qt.CheckStateRole)
    assert tab.model.keep_float == {worst_name}
    assert tab.evaluate_button.text() == "Re-evaluate"
    with qtbot.waitSignal(tab.sigEvaluated, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.evaluate_button, Qt.LeftButton)
    result = blocker.args[0]
    assert worst_name in result.keep_float
    text = tab.end_to_end_label.text()
    assert f"before {old:.2f} dB" in text and f"now {result.end_to_end.sqnr_db:.2f} dB" in text
    # the check survives the refresh
    assert tab.model.keep_float == {worst_name}
    _wait_idle(qtbot, calibrated)


def test_sensitivity_runs_with_progress(calibrated, qtbot):
    tab = calibrated.errors_tab
    qtbot.mouseClick(tab.sensitivity_button, Qt.LeftButton)
    assert not tab.sensitivity_button.isEnabled()
    assert tab.progress.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: tab.sensitivity_table.rowCount() > 0, timeout=LONG)
    _wait_idle(qtbot, calibrated)
    assert tab.sensitivity_button.isEnabled()
    gains = [float(tab.sensitivity_table.item(r, 3).text()) for r in range(tab.sensitivity_table.rowCount())]
    assert gains == sorted(gains, reverse=True)


def test_scatter_for_one_image(calibrated, qtbot):
    tab = calibrated.errors_tab
    tab.select_module(tab.model.modules[2].name)
    image_id = tab.image_combo.itemText(1)
    tab.image_combo.setCurrentIndex(1)
    qtbot.waitUntil(lambda: image_id in tab.per_image, timeout=LONG)
    _wait_idle(qtbot, calibrated)
    single = tab.per_image[image_id]
    assert single.images == [image_id]
    module = next(m for m in single.modules if m.name == tab.model.modules[2].name)
    xs, _ys = tab.scatter.getData()
    assert 0 < len(xs) and np.allclose(xs, np.ravel(module.samples_fp)[: len(xs)])
    assert "only" in tab.scatter_title.text()


# -- export -------------------------------------------------------------------------------


def test_export_shows_verification_and_survives_unwritable_folder(calibrated, qtbot, tmp_path):
    window = calibrated
    tab = window.export_tab
    window.tabs.setCurrentWidget(tab)
    out = tmp_path / "out" / "tiny.circle"
    out.parent.mkdir()
    tab.path_edit.setText(str(out))
    with qtbot.waitSignal(tab.sigExported, timeout=600_000) as blocker:
        qtbot.mouseClick(window.findChild(QPushButton, "exportButton"), Qt.LeftButton)
    result = blocker.args[0]
    _wait_idle(qtbot, window)
    assert out.is_file() and out.stat().st_size == result.bytes
    assert tab.verify_labels["path"].text() == str(result.path)
    assert tab.verify_labels["within_one_step"].text().startswith(f"{100 * float(result.verify.within_one_step):.2f}%")
    # The default flow's verdict, judged against this machine's rounding noise (core.export.verdict), reads green.
    assert result.verify.verdict.level == "verified", result.verify.verdict
    assert tab.verify_labels["verdict"].text().startswith("verified ✓") and "torch vs itself" in tab.verify_labels["verdict"].text()
    assert tab.ops_table.rowCount() == len(result.op_counts)
    assert tab.float_list.count() == max(1, len(result.tensors_without_qparams))
    assert tab.netron_button.isEnabled()
    before = out.read_bytes()

    # a folder that cannot be written (a file stands where the folder should be; root ignores modes)
    blocker_file = tmp_path / "not_a_folder"
    blocker_file.write_text("x")
    tab.path_edit.setText(str(blocker_file / "model.circle"))
    qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: tab.message.level == "error", timeout=LONG)
    _wait_idle(qtbot, window)
    assert "not_a_folder" in tab.message.text()
    assert tab.export_button.isEnabled()
    assert out.read_bytes() == before  # the earlier file is untouched
    assert tab.verify_labels["path"].text() == str(result.path)  # and so is its result
    assert window.session.state == "calibrated"

    # Open in Netron serves the exported file on 127.0.0.1
    qtbot.mouseClick(tab.netron_button, Qt.LeftButton)
    assert window.tabs.currentWidget() is window.netron_tab
    url = window.netron_tab.url
    import urllib.request

    with urllib.request.urlopen(url + "data/tiny.circle", timeout=10) as response:
        assert response.status == 200 and response.read() == before


# -- settings, session files, entry point ---------------------------------------------------


def test_apply_settings_reprepares_with_the_panel_config(calibrated, qtbot):
    window = calibrated
    panel = window.findChild(QWidget, "modelPanel")
    assert not panel.apply_button.isEnabled()
    panel.activation_combo.setCurrentText("int16")
    panel.observer_combo.setCurrentText("percentile")
    panel.keep_float_edit.setPlainText("encoder.layers.0.mlp*")
    assert panel.apply_button.isEnabled()
    assert "drops the calibration" in panel.dirty_label.text()
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    config = window.session.config
    assert config.activation.dtype == "int16" and config.observer == "percentile"
    assert "encoder.layers.0.mlp*" in config.overrides
    assert window.session.state == "prepared"
    assert window.ranges_tab.records == [] and window.errors_tab.result is None
    assert set(window.calibration_tab.entries_by_status().values()) == {"ok"}
    assert not panel.apply_button.isEnabled()


def test_save_and_open_session_with_recent_list(calibrated, qtbot, tmp_path):
    window = calibrated
    folder = tmp_path / "saved"
    window.save_session(str(folder))
    _wait_idle(qtbot, window)
    assert folder.is_dir() and window.recent_sessions()[0] == str(folder)
    actions = [a.text() for a in window.recent_menu.actions()]
    assert any(str(folder) in text for text in actions)
    names = [r.name for r in window.ranges_tab.records]
    window.calibration_tab.clear()
    _wait_idle(qtbot, window)
    window.open_session(str(folder))
    _wait_idle(qtbot, window)
    assert window.session.state == "calibrated"
    assert len(window.calibration_tab.entries_by_status()) == 3
    qtbot.waitUntil(lambda: [r.name for r in window.ranges_tab.records] == names, timeout=LONG)
    _wait_idle(qtbot, window)


def test_tabs_follow_the_session_whoever_changes_it(make_window, sample_images, qtbot, tmp_path):
    """A change made to the Session by any caller reaches the tabs through its events, and a
    replaced session's events reach them no more."""
    window = make_window(sample_images[:2])
    session = window.session
    # Straight on the worker, not through the Calibration tab, as any caller would.
    window.submit("add images", lambda: session.add_images(sample_images[2:3]), takes_progress=False)
    qtbot.waitUntil(lambda: len(window.calibration_tab.entries_by_status()) == 3, timeout=LONG)
    assert "images: 3" in window.status_images.text()
    assert window.export_tab.message.text() == window.export_tab.NOT_CALIBRATED
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        window.submit("calibrate", lambda progress, cancel: session.calibrate(progress=progress, cancel=cancel))
    _wait_idle(qtbot, window)
    assert set(window.calibration_tab.entries_by_status().values()) == {"used"}
    assert "Ready to export: calibrated on 3/3 images" in window.export_tab.message.text()
    assert window.model_panel.summary["calibration"].text().startswith("3/3 images")

    window.save_session(str(tmp_path / "saved"))
    _wait_idle(qtbot, window)
    window.open_session(str(tmp_path / "saved"))
    _wait_idle(qtbot, window)
    assert window.session is not session
    # The replaced session, changed on this (the GUI) thread, where a subscriber would run at once.
    session.clear_images()
    assert len(window.calibration_tab.entries_by_status()) == 3


def test_open_session_failure_keeps_the_current_session(calibrated, qtbot, tmp_path):
    window = calibrated
    before = window.session
    window.open_session(str(tmp_path / "no_such_session"))
    _wait_idle(qtbot, window)
    assert window.session is before
    assert "no_such_session" in window.statusBar().currentMessage()


def test_main_opens_tiny_with_the_bundled_samples(qtbot, tmp_path, sample_images):
    from PySide6.QtCore import QSettings, QTimer

    from app import main as app_main

    QSettings.setPath(QSettings.NativeFormat, QSettings.UserScope, str(tmp_path))
    QSettings.setPath(QSettings.IniFormat, QSettings.UserScope, str(tmp_path))
    seen: dict[str, object] = {}

    def probe():
        windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, QtMainWindow) and w.isVisible()]
        if not windows:
            QTimer.singleShot(100, probe)
            return
        window = windows[0]
        if window.session is None or window.runner.busy:
            QTimer.singleShot(100, probe)
            return
        seen["spec"] = window.session.model_spec
        seen["images"] = sorted(Path(p).name for p in window.calibration_tab.entries_by_status())
        window.close()

    QTimer.singleShot(0, probe)
    QTimer.singleShot(120_000, QApplication.quit)  # never hang the suite
    assert app_main.main(["ptq-studio"]) == 0
    assert seen["spec"] == "tiny"
    assert seen["images"] == sorted(p.name for p in sample_images)


def test_bad_checkpoint_folder_keeps_the_loaded_model(make_window, sample_images, qtbot, tmp_path):
    window = make_window(sample_images[:2])
    before = window.session
    bad = tmp_path / "not_a_checkpoint"
    bad.mkdir()
    (bad / "README.txt").write_text("no weights here")
    window.model_panel.set_model_spec(str(bad))
    qtbot.mouseClick(window.model_panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert window.session is before
    assert window.model_panel.model_spec() == "tiny"
    assert "not_a_checkpoint" in window.model_panel.dirty_label.text()
    assert "still using tiny" in window.model_panel.dirty_label.text()
    assert len(window.calibration_tab.entries_by_status()) == 2
