"""Provenance (Ranges), A/B and three-way check, driven as a user drives them (real core, tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton

from app.qt_main_window import QtMainWindow

LONG = 120_000  # ms; 2 shared cores


def _wait_idle(qtbot, window, timeout=LONG):
    qtbot.waitUntil(lambda: window.session is not None and not window.runner.busy, timeout=timeout)


@pytest.fixture
def calibrated(qtbot, qsettings, sample_images):
    """A window on the tiny model, 70 soft tokens, calibrated on three sample images."""
    window = QtMainWindow(model_spec="tiny", images=list(sample_images[:3]), max_soft_tokens=70, settings=qsettings)
    qtbot.addWidget(window)
    window.resize(1280, 800)
    window.show()
    _wait_idle(qtbot, window)
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(window.findChild(QPushButton, "calibrateButton"), Qt.LeftButton)
    _wait_idle(qtbot, window)
    return window


def _ranking_rows(tab) -> list[tuple]:
    t = tab.ranking.table
    return [
        (t.item(r, 0).text(), t.item(r, 1).data(Qt.DisplayRole), t.item(r, 2).data(Qt.DisplayRole), t.item(r, 3).data(Qt.DisplayRole))
        for r in range(t.rowCount())
    ]


def _wait_location(qtbot, tab, name: str, which: str):
    qtbot.waitUntil(
        lambda: tab.source_panel.location is not None and tab.source_panel.location.observer == name and tab.source_panel.location.which == which, timeout=LONG
    )


def test_source_image_ranking_and_exclude_recalibrate(calibrated, qtbot):
    from core.analysis.provenance import locate_extreme, rank_images

    window = calibrated
    session = window.session
    tab = window.ranges_tab
    window.tabs.setCurrentWidget(tab)
    qtbot.waitUntil(lambda: len(tab.ranking.ranks) > 0, timeout=LONG)
    _wait_idle(qtbot, window)

    # the ranking table is the core's ranking, in its order
    expected = rank_images(session)
    assert _ranking_rows(tab) == [(r.image_id, r.extremes, r.min_count, r.max_count) for r in expected]

    # an encoder activation whose max and min were set by an image
    def located(r):
        return r.kind == "activation" and not r.per_channel and "layers.1.mlp" in r.name and r.max_source and r.min_source

    row = next(i for i, r in enumerate(tab.records) if located(r))
    name = tab.records[row].name
    tab.select_observer(row)
    _wait_location(qtbot, tab, name, "max")
    _wait_idle(qtbot, window)
    loc = locate_extreme(session, name, which="max")
    assert loc.boxes and tab.source_panel.shown_boxes() == [tuple(float(v) for v in box) for box in loc.boxes]
    assert np.array_equal(tab.source_panel.source_image.image, loc.image)
    assert loc.image_id in tab.source_panel.caption.text()
    assert tab.max_caption.text() == loc.image_id

    qtbot.mouseClick(tab.source_panel.min_radio, Qt.LeftButton)
    _wait_location(qtbot, tab, name, "min")
    _wait_idle(qtbot, window)
    loc_min = locate_extreme(session, name, which="min")
    assert tab.source_panel.shown_boxes() == [tuple(float(v) for v in box) for box in loc_min.boxes]
    assert np.array_equal(tab.source_panel.source_image.image, loc_min.image)

    # exclude the image that set this min, recalibrate: it is excluded everywhere and the ranges change
    before = {r.name: (float(np.min(r.min)), float(np.max(r.max))) for r in tab.records}
    excluded_id, excluded_path = loc_min.image_id, str(loc_min.path)
    assert tab.source_panel.exclude_button.isEnabled()
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(tab.source_panel.exclude_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert next(e.status for e in session.images if e.path == excluded_path) == "excluded"
    assert window.calibration_tab.entries_by_status()[excluded_path] == "excluded"
    row_item = next(
        window.calibration_tab.model.item(r) for r in range(window.calibration_tab.model.rowCount())
        if window.calibration_tab.model.item(r).data(Qt.UserRole + 1) == excluded_path
    )
    assert "status: excluded" in row_item.toolTip()
    assert "1 excluded" in window.calibration_tab.count_label.text()
    qtbot.waitUntil(lambda: tab.records and float(np.min(tab.records[row].min)) != before[name][0], timeout=LONG)
    _wait_idle(qtbot, window)
    fresh = session.observer_table()
    after = {r.name: (float(np.min(r.min)), float(np.max(r.max))) for r in tab.records}
    assert after == {r.name: (float(np.min(r.min)), float(np.max(r.max))) for r in fresh}
    assert after[name][0] > before[name][0]  # the excluded image held this observer's minimum
    assert all(excluded_id not in (r.min_source, r.max_source) for r in fresh)
    assert tab.records[tab.state.detail_row].name == name  # the selection survives the refresh
    assert "Excluded" in tab.message.text()
    # the ranking follows the new statistics
    qtbot.waitUntil(lambda: _ranking_rows(tab) == [(r.image_id, r.extremes, r.min_count, r.max_count) for r in rank_images(session)], timeout=LONG)
    assert excluded_id not in [r[0] for r in _ranking_rows(tab)]
    assert not tab.ranking.include_button.isHidden() and excluded_path.split("/")[-1] in tab.ranking.excluded_label.text()
    # and back: include it again and recalibrate on all three
    tab.table_tabs.setCurrentIndex(1)
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(tab.ranking.include_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert set(window.calibration_tab.entries_by_status().values()) == {"used"}
    qtbot.waitUntil(lambda: tab.ranking.include_button.isHidden(), timeout=LONG)
    assert {(r.name, float(np.min(r.min)), float(np.max(r.max))) for r in session.observer_table()} == {
        (n, lo, hi) for n, (lo, hi) in before.items()
    }


def test_ab_int16_activations_table_chart_and_exports(calibrated, qtbot, tmp_path, monkeypatch):
    import yaml

    from core.analysis.abtest import ABComparison
    from core.export.config_export import to_one_quant_config, to_tico_ptq_yaml

    window = calibrated
    session = window.session
    tab = window.ab_tab
    assert [window.tabs.tabText(i) for i in range(window.tabs.count())][2:5] == ["Errors", "Fix", "A/B"]
    window.tabs.setCurrentWidget(tab)
    tab.activation_combo.setCurrentText("int16")
    tab.weight_combo.setCurrentText("uint8")
    tab.observer_combo.setCurrentText("minmax")
    tab.overrides_edit.setPlainText("")
    with qtbot.waitSignal(tab.sigCompared, timeout=LONG) as blocker:
        qtbot.mouseClick(tab.compare_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert blocker.args[0] is tab.result
    config_b = tab.config_b()
    assert config_b.activation.dtype == "int16" and config_b.weight.dtype == "uint8"

    ab = ABComparison(session, config_b)
    ab.calibrate_b()
    expected = ab.compare()  # the core, run again from scratch
    t = tab.table
    assert t.rowCount() == len(expected.modules) > 0
    for row, m in enumerate(expected.modules):  # the table is sorted by forward order (#)
        assert t.item(row, 1).text() == m.name
        assert t.item(row, 2).text() == m.winner
        assert t.item(row, 3).text() == f"{m.delta_sqnr_db:+.2f}"
        assert t.item(row, 4).text() == f"{m.a.sqnr_db:.2f}"
        assert t.item(row, 5).text() == f"{m.b.sqnr_db:.2f}"
    assert {m.winner for m in expected.modules} & {"B"}, "16-bit activations should win somewhere"
    summary = tab.summary_label.text()
    assert f"A {expected.end_to_end_a.sqnr_db:.2f} dB" in summary
    assert f"B {expected.end_to_end_b.sqnr_db:.2f} dB" in summary
    assert expected.end_to_end_winner in summary
    # the chart holds both configs' per-module SQNR
    _xa, ya = tab.curve_a.getData()
    _xb, yb = tab.curve_b.getData()
    assert np.allclose(ya, [m.a.sqnr_db for m in expected.modules], equal_nan=True)
    assert np.allclose(yb, [m.b.sqnr_db for m in expected.modules], equal_nan=True)

    # exports: the winning overrides at the chosen margin, through the save dialogs
    tab.margin_spin.setValue(0.5)
    overrides = expected.winning_overrides(margin_db=0.5)
    assert overrides and tab.export_yaml_button.isEnabled() and tab.export_json_button.isEnabled()
    yaml_path, json_path = tmp_path / "b_wins.yaml", tmp_path / "b_wins"
    from app import qt_ab_tab

    monkeypatch.setattr(qt_ab_tab.QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(yaml_path), "")))
    qtbot.mouseClick(tab.export_yaml_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    monkeypatch.setattr(qt_ab_tab.QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(json_path), "")))
    qtbot.mouseClick(tab.export_json_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    written_json = json_path.with_suffix(".json")  # the suffix is added when missing
    assert tab.message.level == "ok" and str(written_json) in tab.message.text()
    doc = yaml.safe_load(yaml_path.read_text())
    assert doc == yaml.safe_load(to_tico_ptq_yaml(overrides, base=expected.config_a, modules=expected.module_names))
    assert doc["overrides"], "the YAML lists the modules B wins"
    assert json.loads(written_json.read_text()) == to_one_quant_config(
        overrides, base=expected.config_a, modules=expected.module_names
    )
    assert window.last_folder("abexport") == str(tmp_path)

    # Apply merged config: A plus B's winning overrides becomes the session's config, calibrated
    merged = expected.merged_config(margin_db=0.5)
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(tab.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert session.config == merged and session.state == "calibrated"
    assert window.build_config(window.model_panel.settings()) == merged  # the panel keeps the overrides
    assert window.model_panel.summary["overrides"].text() == f"{len(overrides)} per-module override(s)"
    assert tab.result is None  # A changed: the old comparison is gone


def test_threeway_table_equals_the_cores_rows(calibrated, qtbot, tmp_path):
    from core.analysis.threeway import three_way_session

    window = calibrated
    tab = window.export_tab
    window.tabs.setCurrentWidget(tab)
    assert not tab.threeway_button.isEnabled()  # nothing exported yet
    tab.path_edit.setText(str(tmp_path / "tiny.circle"))
    with qtbot.waitSignal(tab.sigExported, timeout=600_000) as blocker:
        qtbot.mouseClick(tab.export_button, Qt.LeftButton)
    export = blocker.args[0]
    _wait_idle(qtbot, window)
    # tensors without qparams are listed with their module
    unquantized = list(export.unquantized)
    if unquantized:
        assert [tab.float_list.item(i).data(Qt.UserRole) for i in range(tab.float_list.count())] == unquantized
    else:
        assert tab.float_list.count() == 1 and tab.float_list.item(0).text() == "none ✓"

    qtbot.mouseClick(tab.threeway_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: tab.threeway is not None, timeout=600_000)
    _wait_idle(qtbot, window)
    expected = three_way_session(window.session, export)
    t = tab.threeway_table
    col = {name: i for i, name in enumerate(tab.THREEWAY_COLUMNS)}

    def value(r, name):
        return t.item(r, col[name]).data(Qt.UserRole + 40)

    assert t.rowCount() == len(expected.rows) > 0
    for r, row in enumerate(expected.rows):
        assert t.item(r, col["Tensor"]).text() == row.tensor
        assert t.item(r, col["Module"]).text() == row.module
        assert value(r, "FP vs fake-quant PEIR") == pytest.approx(row.fp_vs_fq.peir, nan_ok=True)
        assert value(r, "Fake-quant vs Circle PEIR") == pytest.approx(row.fq_vs_circle.peir, nan_ok=True)
        within = row.fq_vs_circle.within_one_step
        assert t.item(r, col["Within one step"]).text() == (f"{100 * within:.2f}%" if within is not None else "n/a")
        steps = row.fq_vs_circle.max_steps
        assert value(r, "Max steps") == pytest.approx(steps if steps is not None else float("nan"), nan_ok=True)
        assert value(r, "FP vs Circle PEIR") == pytest.approx(row.fp_vs_circle.peir, nan_ok=True)
        assert t.item(r, col["dtype"]).text() == row.dtype
    assert expected.note in tab.threeway_note.text()
    if not expected.intermediates_available:
        assert "not available" in tab.threeway_note.text()


def test_override_lines_read_back_as_the_config_says():
    from app.qt_ab_tab import override_line, parse_override_lines
    from core.config import PTQConfig
    from core.errors import ConfigError

    text = "encoder.layers.* = int16\n*.self_attn.probs = float  # keep\n\n*.mlp.* = int16 / uint4\npooler = - / int8"
    config = PTQConfig(overrides=parse_override_lines(text))
    assert config.spec_for("encoder.layers.0.mlp.up_proj", "activation").dtype == "int16"
    assert config.spec_for("encoder.layers.0.mlp.up_proj", "weight").dtype == "uint4"
    assert config.spec_for("encoder.layers.1.self_attn.probs", "activation") is None
    assert config.spec_for("pooler", "weight").dtype == "int8" and config.spec_for("pooler", "activation").dtype == "uint8"
    lines = [override_line(g, v) for g, v in config.to_dict()["overrides"].items()]
    assert PTQConfig(overrides=parse_override_lines("\n".join(lines))) == config
    with pytest.raises(ConfigError, match="line 2"):
        parse_override_lines("a = int16\nno equals sign here")


def test_cancel_exclude_and_recalibrate_keeps_everything(qtbot, qsettings, sample_images):
    from core.session import Session

    class SlowSession(Session):
        """The real Session, with a pause per batch so Cancel lands mid-run."""

        def batches(self, entries, batch_size=1):
            import time

            for batch in super().batches(entries, batch_size):
                time.sleep(0.4)
                yield batch

    window = QtMainWindow(
        model_spec="tiny", images=list(sample_images[:3]), max_soft_tokens=70, settings=qsettings,
        session_factory=lambda spec, cfg, mst, device: SlowSession(spec, cfg, mst, device=device),
    )
    qtbot.addWidget(window)
    window.show()
    _wait_idle(qtbot, window)
    with qtbot.waitSignal(window.errors_tab.sigEvaluated, timeout=LONG):
        qtbot.mouseClick(window.findChild(QPushButton, "calibrateButton"), Qt.LeftButton)
    tab = window.ranges_tab
    qtbot.waitUntil(lambda: len(tab.ranking.ranks) > 0, timeout=LONG)
    _wait_idle(qtbot, window)
    before = [(r.name, float(np.min(r.min)), float(np.max(r.max))) for r in window.session.observer_table()]
    statuses = window.calibration_tab.entries_by_status()
    tab.table_tabs.setCurrentIndex(1)
    tab.ranking.table.selectRow(0)
    qtbot.mouseClick(tab.ranking.exclude_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: tab.source_panel.recal_progress.bar.value() >= 1, timeout=LONG)
    qtbot.mouseClick(tab.source_panel.recal_progress.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not tab.recalibrating, timeout=LONG)
    _wait_idle(qtbot, window)
    assert "Cancelled" in tab.message.text()
    assert window.calibration_tab.entries_by_status() == statuses  # nothing excluded
    assert [(r.name, float(np.min(r.min)), float(np.max(r.max))) for r in window.session.observer_table()] == before
    assert window.session.state == "calibrated" and tab.ranking.exclude_button.isEnabled()
