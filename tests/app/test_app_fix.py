"""The Fix tab: calibrate, locate the first divergence, apply a remedy (a fake that really changes
weights, tests/remedy_fakes.py) to that layer, see the SQNR change, the ranges before/after, export."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton
from test_app_truth import LONG, _calibrate, _wait_idle

from app.fix_state import FixViewState
from app.qt_heatmap import upsample
from core.remedies import rounding
from tests import remedy_fakes


@pytest.fixture
def fakes(monkeypatch):
    remedy_fakes.install(monkeypatch)


def _export_and_verify(qtbot, window, path) -> None:
    """Export from the Export tab (the child rebuilds the remedied model from a saved copy): verified, all quantized."""
    export = window.export_tab
    window.tabs.setCurrentWidget(export)
    export.path_edit.setText(str(path))
    with qtbot.waitSignal(export.sigExported, timeout=600_000) as blocker:
        qtbot.mouseClick(window.findChild(QPushButton, "exportButton"), Qt.LeftButton)
    exported = blocker.args[0]
    _wait_idle(qtbot, window)
    assert exported.tensors_without_qparams == []
    assert exported.verify.verdict.level == "verified", exported.verify.verdict


def _check_the_before_after_views(qtbot, tab, result, located: str) -> None:
    """The heatmap pair shows the located unit on the first evaluation photo, before and after on one colour
    scale; another module (combo or a click on the chart) or photo redraws both; the divergence is in words."""
    pair = tab.heatmaps
    photos = list(result.after.images)

    def shown(module: str, photo: str) -> None:
        maps_b, maps_a = result.before_analysis.maps[photo], result.after_analysis.maps[photo]
        grids = [maps_b.heatmap(module).grid, maps_a.heatmap(module).grid]
        top = max(float(np.nanmax(g)) for g in grids)
        for side, grid in zip((pair.before, pair.after), grids):
            assert (side.heatmap.module, side.image_id) == (module, photo)
            assert side.color_bar.levels() == pytest.approx((0.0, top))  # one scale: the error shrinks visibly
            p = int(side.heatmap.layout.patch_size)
            assert np.array_equal(side.error_image(), upsample(grid, p)[: side.error_image().shape[0], : side.error_image().shape[1]], equal_nan=True)
        assert pair.module_combo.currentData() == module and pair.photo_combo.currentData() == photo

    assert tab.views.isVisible() and tab.views.currentWidget() is pair
    assert result.divergence.before == located
    shown(located, photos[0])
    assert not np.array_equal(pair.before.error_image(), pair.after.error_image(), equal_nan=True)  # the fix moved it
    other = next(m for m in result.before_analysis.maps[photos[0]].modules() if m != located and m.endswith("mlp.up_proj"))
    pair.module_combo.setCurrentIndex(pair.module_combo.findData(other))
    shown(other, photos[0])
    pair.photo_combo.setCurrentIndex(1)
    shown(other, photos[1])
    # a click on the per-module chart maps that module
    names = [m.name for m in result.comparison.modules]
    spot = next(s for s in tab.charts.points_b.points() if names[int(round(s.pos().x()))] == "pooler")
    tab.charts.points_b.sigClicked.emit(tab.charts.points_b, [spot], None)
    shown("pooler", photos[1])
    # the first divergence, before -> after, in words
    shift = result.divergence
    text = tab.divergence_line.text()
    assert located in text and f"{shift.before_local_db:.2f} dB" in text and f"{shift.after_local_db:.2f} dB" in text
    assert shift.after in text
    _, after_local = tab.local_chart.charts.curve_b.getData()
    np.testing.assert_allclose(after_local, [e.local_sqnr_db for e in result.after_analysis.divergence.entries])


def test_view_state_keeps_a_fix_until_the_statistics_change():
    view = FixViewState()
    assert view.located(SimpleNamespace(located=SimpleNamespace(name="encoder.layers.1"))) == "encoder.layers.1"
    assert view.located(SimpleNamespace(located=SimpleNamespace(name="model"))) is None  # the root is no glob
    view.fixed("result", 3)
    assert not view.statistics_changed(3) and view.result == "result"
    assert view.statistics_changed(4) and view.stale and view.result is None
    assert view.pareto_points() == []


def _fake_fix(located: str | None):
    """A FixResult's shape for the view state: two photos' maps before/after, per-module SQNR before."""

    def maps(modules):
        return SimpleNamespace(modules=lambda: list(modules), heatmap=lambda m: SimpleNamespace(module=m), sqnr_db={m: 10.0 for m in modules})

    photos = {"a.jpg": ["patch_embedder", "encoder.layers.0", "encoder.layers.0.mlp", "model"], "b.jpg": ["patch_embedder", "model"]}
    analysis = SimpleNamespace(maps={p: maps(ms) for p, ms in photos.items()})
    before = SimpleNamespace(modules=[SimpleNamespace(name=n, sqnr_db=v) for n, v in
                                      (("patch_embedder", 30.0), ("encoder.layers.0.mlp", 12.0), ("model", 20.0))])
    return SimpleNamespace(before_analysis=analysis, after_analysis=analysis, before=before,
                           divergence=SimpleNamespace(before=located) if located else None)


def test_view_state_maps_the_located_unit_else_the_worst_module_and_keeps_choices_that_have_maps():
    view = FixViewState()
    view.fixed(_fake_fix("encoder.layers.0"), 1)
    assert (view.photo, view.module) == ("a.jpg", "encoder.layers.0") and view.photos() == ["a.jpg", "b.jpg"]
    assert view.heatmap_pair().before.module == "encoder.layers.0"
    assert not view.choose(module="pooler") and view.module == "encoder.layers.0"  # no map: nothing changes
    assert view.choose(photo="b.jpg") and view.module == "model"  # b.jpg has no layer map: the worst module it has
    assert view.choose(module="patch_embedder") and view.modules() == ["patch_embedder", "model"]
    view.fixed(_fake_fix(None), 2)  # no divergence located: the module worst before the fix
    assert view.module == "encoder.layers.0.mlp"
    assert view.statistics_changed(3) and view.heatmap_pair() is None and view.photos() == []


def test_fix_the_first_divergence_see_the_change_and_export(make_window, sample_images, qtbot, fakes, tmp_path):
    window = make_window(sample_images[:2])
    session = window.session
    tab = window.fix_tab
    _calibrate(qtbot, window)  # the Errors tab's analysis locates the first divergence
    located = window.errors_tab.divergence.located.name
    qtbot.waitUntil(lambda: tab.globs["gptq"].text() == located, timeout=LONG)
    assert located in tab.message.text()

    window.tabs.setCurrentWidget(tab)
    assert tab.views.isHidden() and tab.charts.isHidden()  # no empty charts or maps before a fix
    tab.checks["gptq"].setChecked(True)
    tab.checks["smoothquant"].setChecked(True)  # smoothing recalibrates: the ranges move
    weights_before = {k: v.detach().clone() for k, v in session.model.named_parameters()}
    with qtbot.waitSignal(tab.sigFixed, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.apply_button, Qt.LeftButton)
    result = blocker.args[0]
    _wait_idle(qtbot, window)
    # that layer's linears (and only they) changed
    changed = {k for k, v in session.model.named_parameters() if not torch.equal(v, weights_before[k])}
    assert changed and all(k.startswith(located + ".") for k in changed)
    assert [r.step.kind for r in result.reports] == ["smoothquant", "gptq"]
    assert set(result.reports[0].summary["parameters"]) == changed  # smoothing's; rounding changes no float weight
    assert result.reports[1].summary["rounded"] and all(n.startswith(located + ".") for n in result.reports[1].summary["rounded"])
    # the end-to-end SQNR before -> after, as the session measured it
    assert result.sqnr_after_db != result.sqnr_before_db
    text = tab.summary_label.text()
    assert f"{result.sqnr_before_db:.2f} dB" in text and f"{result.sqnr_after_db:.2f} dB" in text
    # the A/B charts, reused: before and after per module
    _, after_y = tab.charts.curve_b.getData()
    np.testing.assert_allclose(after_y, [m.b.sqnr_db for m in result.comparison.modules])
    _check_the_before_after_views(qtbot, tab, result, located)

    # the Ranges tab shows the ranges before the fix beside the new ones
    ranges = window.ranges_tab
    column = ranges.model.columnCount() - 1
    qtbot.waitUntil(lambda: not ranges.table.isColumnHidden(column), timeout=LONG)
    assert ranges.model.headerData(column, Qt.Horizontal) == "Before fix"
    old = {r.name: r for r in result.observers_before}
    shown = [ranges.model.data(ranges.model.index(row, column)) for row in range(ranges.model.rowCount())]
    moved = [not (np.array_equal(old[r.name].min, r.min) and np.array_equal(old[r.name].max, r.max)) for r in ranges.records]
    assert any(moved) and not all(moved)
    assert [bool(text) for text in shown] == moved  # a "before" range only where the fix moved it
    assert "gptq" in tab.applied_label.text() and "smoothquant" in tab.applied_label.text()

    # the export carries the remedied model (the child rebuilds it from a saved copy)
    _export_and_verify(qtbot, window, tmp_path / "fixed.circle")


def test_a_cancelled_fix_leaves_the_session_and_the_tab_as_they_were(make_window, sample_images, qtbot, fakes, monkeypatch):
    def slow_rounding(qmodel, batches, globs, method="gptq", *, progress=None, cancel=None, **options):
        remedy_fakes.fake_rounding(qmodel, batches, globs, method)  # changes the (copied) weights...
        for i in range(600):  # ...then waits to be cancelled
            progress(i, 600, "rounding")
            cancel.raise_if_cancelled(method)
            time.sleep(0.05)
        pytest.fail("never cancelled")

    monkeypatch.setattr(rounding, "apply_weight_rounding", slow_rounding)
    window = make_window(sample_images[:1])
    session = window.session
    tab = window.fix_tab
    _calibrate(qtbot, window)
    weights = {k: v.detach().clone() for k, v in session.model.named_parameters()}
    version, qmodel = session.stats_version, session.qmodel
    tab.checks["gptq"].setChecked(True)
    tab.globs["gptq"].setText("encoder.layers.0")
    qtbot.mouseClick(tab.apply_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: "rounding" in tab.progress.bar.format(), timeout=LONG)
    qtbot.mouseClick(tab.progress.cancel_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert "Cancelled" in tab.message.text() and tab.apply_button.isEnabled()
    assert session.qmodel is qmodel and session.stats_version == version and session.remedies == []
    for k, v in session.model.named_parameters():
        assert torch.equal(v, weights[k]), k
    assert tab.view.result is None and "Applied: none" == tab.applied_label.text()


def test_a_glob_that_matches_nothing_is_said_in_one_line(make_window, sample_images, qtbot, fakes):
    window = make_window(sample_images[:1])
    tab = window.fix_tab
    _calibrate(qtbot, window)
    tab.checks["cle"].setChecked(True)
    tab.globs["cle"].setText("encoder.layerz.*")
    qtbot.mouseClick(tab.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert "encoder.layerz.*" in tab.message.text() and "closest" in tab.message.text()
    assert window.session.remedies == [] and "encoder.layerz.*" in window.statusBar().currentMessage()


def test_mixed_precision_shows_the_pareto_curve_and_a_click_applies_a_point(make_window, sample_images, qtbot, fakes):
    window = make_window(sample_images[:1])
    session = window.session
    tab = window.fix_tab
    _calibrate(qtbot, window)
    tab.mixed_check.setChecked(True)
    tab.mixed_mode.setCurrentIndex(tab.mixed_mode.findData("target_sqnr_db"))
    tab.mixed_value.setValue(25.0)
    with qtbot.waitSignal(tab.sigFixed, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert blocker.args[0].reports[0].step.params == {"target_sqnr_db": 25.0}
    spots = tab.pareto.points.points()
    assert [(s.pos().x() * 1024, s.pos().y()) for s in spots] == [(p.cost_bytes, p.sqnr_db) for p in remedy_fakes.POINTS[:2]]
    assert session.config.spec_for("encoder.layers.0.mlp", "activation").dtype == "int16"
    assert session.config.spec_for("encoder.layers.0.self_attn", "activation").dtype != "int16"
    # the window keeps the new dtypes for the configs its panel builds later
    assert window.extra_overrides.keys() == {"encoder.layers.0.mlp"}
    assert window.model_panel.summary["overrides"].text() == "1 per-module override(s)"

    # a click on the dearer point applies its dtypes, without a new search
    with qtbot.waitSignal(tab.sigFixed, timeout=LONG) as blocker:
        tab.pareto.sigPointClicked.emit(spots[1].data())
    _wait_idle(qtbot, window)
    step = blocker.args[0].reports[0].step
    assert step.kind == "mixed" and step.params["overrides"] == remedy_fakes.POINTS[1].overrides
    assert session.config.spec_for("encoder.layers.0.self_attn", "activation").dtype == "int16"
    assert [r.step.kind for r in session.remedies] == ["mixed", "mixed"]


def test_real_gptq_on_the_first_divergence_improves_it_and_exports(make_window, sample_images, qtbot, tmp_path):
    """Issue 14's flow with the real algorithm: 4-bit weights, calibrate, the first divergence is
    located and pre-filled, GPTQ on it, the end-to-end SQNR rises (GPTQ's own bar: >= 3 dB over
    min-max rounding), the float model is untouched, and the export verifies."""
    window = make_window(sample_images[:2])
    panel = window.model_panel
    panel.weight_combo.setCurrentText("uint4")
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    session = window.session
    assert session.config.weight.dtype == "uint4"
    tab = window.fix_tab
    _calibrate(qtbot, window)
    located = window.errors_tab.divergence.located.name
    qtbot.waitUntil(lambda: tab.globs["gptq"].text() == located, timeout=LONG)
    window.tabs.setCurrentWidget(tab)
    tab.checks["gptq"].setChecked(True)
    weights_before = {k: v.detach().clone() for k, v in session.model.named_parameters()}
    with qtbot.waitSignal(tab.sigFixed, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.apply_button, Qt.LeftButton)
    result = blocker.args[0]
    _wait_idle(qtbot, window)
    assert [r.step.kind for r in result.reports] == ["gptq"] and result.reports[0].summary["rounded"]
    assert result.sqnr_after_db >= result.sqnr_before_db + 3.0, (located, result.sqnr_before_db, result.sqnr_after_db)
    assert f"{result.sqnr_after_db:.2f} dB" in tab.summary_label.text()
    for k, v in session.model.named_parameters():  # the reference every error is measured against
        assert torch.equal(v, weights_before[k]), k

    _export_and_verify(qtbot, window, tmp_path / "gptq.circle")
