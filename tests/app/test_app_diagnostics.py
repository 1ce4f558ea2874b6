"""Errors tab diagnostics, driven as a user does: the first-divergence banner and the patch heatmap.

Every value shown is checked against what ``core.analysis.heatmaps`` / ``divergence`` return for the same session and
images (tiny model, 3 images, 70 soft tokens: small enough for CI on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtWidgets import QPushButton

from app.qt_common import fmt_float
from app.qt_heatmap import FINAL_OUTPUT, FINAL_OUTPUT_TITLE, upsample
from app.qt_main_window import QtMainWindow
from core.analysis.divergence import locate_divergence
from core.analysis.heatmaps import image_error_maps

LONG = 180_000  # ms; evaluation, locator and maps share 2 busy cores in CI


def _wait_idle(qtbot, window, timeout=LONG):
    qtbot.waitUntil(lambda: window.session is not None and not window.runner.busy, timeout=timeout)


@pytest.fixture
def calibrated(qtbot, qsettings, sample_images):
    """A window on the tiny model, calibrated on 3 images, with evaluation, locator and first map done."""
    window = QtMainWindow(model_spec="tiny", images=sample_images[:3], max_soft_tokens=70, settings=qsettings)
    qtbot.addWidget(window)
    window.resize(1360, 860)
    window.show()
    _wait_idle(qtbot, window)
    window.tabs.setCurrentWidget(window.errors_tab)
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(window.findChild(QPushButton, "calibrateButton"), Qt.LeftButton)
    _wait_idle(qtbot, window)
    return window


def _proxy_row(tab, name: str) -> int:
    return next(r for r in range(tab.proxy.rowCount()) if tab.proxy.data(tab.proxy.index(r, 1)) == name)


def _click_row(qtbot, table, proxy_row: int) -> None:
    index = table.model().index(proxy_row, 1)
    table.scrollTo(index)
    qtbot.mouseClick(table.viewport(), Qt.LeftButton, pos=table.visualRect(index).center())


def test_heatmap_shows_the_cores_maps(calibrated, qtbot):
    window = calibrated
    tab = window.errors_tab
    hm = tab.heatmap
    session = window.session
    assert tab.detail_tabs.currentWidget() is hm
    # one entry per evaluated image; the first one is mapped already (in the worker, then cached)
    ids = [hm.image_combo.itemText(i) for i in range(hm.image_combo.count())]
    assert ids == list(tab.result.images) and len(ids) == 3
    first = ids[0]
    assert list(tab.maps_cache) == [first]
    expected = image_error_maps(session, window.calibration_tab.path_for(first))
    assert expected.image_id == first

    # final output by default, drawn over the photo at the photo's pixel size
    assert hm.module_combo.currentText() == FINAL_OUTPUT_TITLE and hm.current_module() == FINAL_OUTPUT
    core_final = expected.heatmap(FINAL_OUTPUT)
    photo = hm.photo_item.image
    assert photo.shape == core_final.image.shape and np.array_equal(photo, core_final.image)
    h, w = photo.shape[:2]
    assert (h, w) == core_final.layout.image_size
    overlay = hm.error_image()
    assert overlay.shape == (h, w)
    assert hm.error_item.width() == w and hm.error_item.height() == h
    np.testing.assert_allclose(overlay, upsample(core_final.grid, core_final.layout.patch_size), equal_nan=True)
    np.testing.assert_allclose(hm.heatmap.grid, core_final.grid, equal_nan=True)
    # the colour bar spans 0 .. the largest patch error; the peak patch (block, for soft tokens) is outlined
    assert hm.color_bar.levels() == pytest.approx((0.0, float(np.nanmax(core_final.grid))))
    assert hm.error_item.getLevels() == pytest.approx((0.0, float(np.nanmax(core_final.grid))))
    left, top, right, bottom = core_final.peak_box()
    rect = hm.peak_rect.rect()
    assert hm.peak_rect.isVisible()
    assert (rect.left(), rect.top(), rect.right(), rect.bottom()) == (left, top, right, bottom)
    mx, my = hm.peak_marker.getData()
    assert (mx[0], my[0]) == ((left + right) / 2, (top + bottom) / 2)

    # the module chooser lists exactly the modules with a map, the final output first
    choices = [hm.module_combo.itemData(i) for i in range(hm.module_combo.count())]
    assert choices[0] == FINAL_OUTPUT and sorted(choices) == sorted(expected.modules())
    # opacity slider -> overlay opacity
    hm.opacity_slider.setValue(25)
    assert hm.error_item.opacity() == pytest.approx(0.25) and hm.opacity_label.text() == "25%"
    hm.opacity_slider.setValue(100)
    assert hm.error_item.opacity() == pytest.approx(1.0)

    # choosing a module switches the map to that module's values
    for module in ("patch_embedder", "encoder.layers.1.mlp.down_proj"):
        hm.module_combo.setCurrentIndex(hm.module_combo.findData(module))
        core_map = expected.heatmap(module)
        assert hm.heatmap.module == module
        np.testing.assert_allclose(hm.heatmap.grid, core_map.grid, equal_nan=True)
        np.testing.assert_allclose(hm.error_image(), upsample(core_map.grid, core_map.layout.patch_size), equal_nan=True)
        assert hm.color_bar.levels()[1] == pytest.approx(float(np.nanmax(core_map.grid)))
        assert module in hm.title.text()
    # the patch- and token-level maps of one image differ (they are not the same picture)
    assert not np.allclose(expected.heatmap("patch_embedder").grid, core_final.grid, equal_nan=True)

    # selecting a module in the table moves the heatmap to it
    window.tabs.setCurrentWidget(tab)
    target = "encoder.layers.0.mlp"
    _click_row(qtbot, tab.table, _proxy_row(tab, target))
    assert tab.selected_module() == target
    assert hm.current_module() == target
    np.testing.assert_allclose(hm.heatmap.grid, expected.heatmap(target).grid, equal_nan=True)

    # hovering a patch says where it is and its error
    shown = expected.heatmap(target)
    px, py = shown.peak_xy
    p = shown.layout.patch_size

    def hover_peak() -> bool:
        # Mapped again on every try: the layout may still be settling (the view re-fits its range
        # when it is resized), and a point mapped before that lands on a neighbouring patch.
        scene_point = hm.vb.mapViewToScene(QPointF((px + 0.5) * p, (py + 0.5) * p))
        view_point = hm.view.mapFromScene(scene_point)
        qtbot.mouseMove(hm.view.viewport(), QPoint(int(view_point.x()), int(view_point.y())))
        return f"patch x {px}, y {py}" in hm.hover_label.text()

    qtbot.waitUntil(hover_peak, timeout=5000)
    assert hm.hover_label.text() == f"patch x {px}, y {py} · relative error {fmt_float(shown.grid[py, px])}"

    # another image: computed once in the worker, then served from the cache
    second = ids[1]
    hm.image_combo.setCurrentIndex(1)
    qtbot.waitUntil(lambda: second in tab.maps_cache, timeout=LONG)
    _wait_idle(qtbot, window)
    assert hm.image_id == second and hm.current_module() == target  # the module choice is kept
    other = image_error_maps(window.session, window.calibration_tab.path_for(second))
    np.testing.assert_allclose(hm.heatmap.grid, other.heatmap(target).grid, equal_nan=True)
    assert hm.photo_item.image.shape == other.image.shape
    cached = tab.maps_cache[first]
    hm.image_combo.setCurrentIndex(0)
    assert not window.runner.busy and tab.maps_cache[first] is cached
    assert hm.image_id == first


def test_first_divergence_banner_matches_the_core_and_selects_the_unit(calibrated, qtbot):
    window = calibrated
    tab = window.errors_tab
    banner = tab.banner
    layout = tab.layout()
    assert layout.itemAt(0).widget() is banner  # the first thing in the tab
    expected = locate_divergence(window.session, unit="layer")
    assert banner.text_label.text() == expected.summary_line()
    assert banner.located == expected.located.name
    assert [e.name for e in tab.divergence.entries] == [e.name for e in expected.entries]
    # the per-unit chart draws the core's output and local SQNR
    xs, ys = tab.divergence_plot.output_curve.getData()
    assert list(xs) == list(range(len(expected.entries)))
    finite = [e.output_sqnr_db if np.isfinite(e.output_sqnr_db) else np.nan for e in expected.entries]
    np.testing.assert_allclose(ys, finite, equal_nan=True)
    assert tab.divergence_plot.marker.value() == [e.name for e in expected.entries].index(expected.located.name)

    # clicking the banner selects the unit in the table and shows its heatmap
    tab.detail_tabs.setCurrentIndex(1)  # the scatter
    tab.select_module(tab.model.modules[-1].name)
    qtbot.mouseClick(banner.text_label, Qt.LeftButton)
    located = expected.located.name
    assert tab.selected_module() == located
    row = tab.proxy.mapToSource(tab.table.selectionModel().currentIndex()).row()
    assert tab.model.modules[row].name == located
    assert tab.detail_tabs.currentWidget() is tab.heatmap
    assert tab.heatmap.current_module() == located
    maps = image_error_maps(window.session, window.calibration_tab.path_for(tab.heatmap.image_id))
    np.testing.assert_allclose(tab.heatmap.heatmap.grid, maps.heatmap(located).grid, equal_nan=True)

    # per module, by the button: the banner follows the core again
    banner.unit_combo.setCurrentIndex(banner.unit_combo.findData("module"))
    qtbot.mouseClick(banner.locate_button, Qt.LeftButton)
    assert banner.busy and banner.locate_button.text() == "Cancel"
    qtbot.waitUntil(lambda: not banner.busy, timeout=LONG)
    _wait_idle(qtbot, window)
    per_module = locate_divergence(window.session, unit="module")
    assert tab.divergence.unit == "module"
    assert banner.text_label.text() == per_module.summary_line()
    assert len(tab.divergence_plot.entries) == len(per_module.entries)
    qtbot.mouseClick(banner.show_button, Qt.LeftButton)
    assert tab.selected_module() == per_module.located.name


def test_the_tabs_follow_the_sessions_events_themselves(calibrated, qtbot):
    window = calibrated
    session = window.session
    errors, ranges = window.errors_tab, window.ranges_tab
    assert errors.state.stats_version == ranges.state.stats_version == session.stats_version > 0
    # a new config set on the session itself, not through the window: both tabs forget what they showed
    session.set_config(session.config)
    assert errors.result is None and ranges.records == [] and errors.maps_cache == {}
    assert "evaluate to locate it" in errors.banner.text_label.text()
    # a calibration nobody announces by hand: the Errors tab evaluates, the Ranges tab reads the statistics
    with qtbot.waitSignal(errors.sigEvaluated, timeout=LONG):
        window.submit("calibrate", lambda progress, cancel: session.calibrate(progress=progress, cancel=cancel))
    _wait_idle(qtbot, window)
    assert errors.state.stats_version == ranges.state.stats_version == session.stats_version
    assert [r.name for r in ranges.records] == [r.name for r in session.observer_table()]
    assert errors.result.images == [e.image_id for e in session.usable_images()]

def test_tab_state_is_plain_data_filled_from_the_session():
    from types import SimpleNamespace

    from app.tab_state import ErrorsState, ImageSnapshot, RangesState

    entries = [
        SimpleNamespace(path="/a/one.png", image_id="one.png", status="used"),
        SimpleNamespace(path="/a/two.png", image_id="two.png", status="excluded"),
        SimpleNamespace(path="/a/bad.png", image_id="", status="rejected"),
    ]
    session = SimpleNamespace(images=entries)
    snap = ImageSnapshot.of(session)
    entries[0].status = "ok"  # a later change in the session does not reach the snapshot
    assert snap.path_for("one.png") == "/a/one.png" and snap.path_for("bad.png") is None
    assert snap.status_of("/a/one.png") == "used" and snap.status_of("/nowhere.png") == ""
    assert snap.usable_count() == 1 and snap.excluded() == ["/a/two.png"]
    assert ImageSnapshot.of(None).path_by_id == {}

    state = ErrorsState()
    result = SimpleNamespace(images=["one.png"])
    state.show(result, 3)
    state.per_image["one.png"] = object()
    assert (state.result, state.images, state.stats_version) == (result, ["one.png"], 3)
    state.show(result, 4)
    assert state.per_image == {} and state.stats_version == 4
    generation = state.generation
    state.maps_cache["one.png"] = (None, {})
    state.forget()
    assert state.result is None and state.maps_cache == {} and state.generation > generation

    ranges = RangesState(records=["r0", "r1"], detail_row=1)
    ranges.locations[("r1", "max")] = object()
    assert ranges.selected_record() == "r1"
    ranges.new_statistics()
    assert ranges.locations == {} and RangesState().selected_record() is None
