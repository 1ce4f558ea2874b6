"""Screenshots of every tab after a real calibration (for the README).

    xvfb-run -a .venv/bin/python -m app.screenshots resources/screenshots
    QT_QPA_PLATFORM=offscreen .venv/bin/python -m app.screenshots /tmp/shots
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from app.main import prepare_qt_environment
from core.config import DEFAULT_SOFT_TOKENS
from core.data.resources import sample_images


def _spin(predicate, timeout_s: float) -> bool:
    """Run the real event loop until predicate() holds or the time is up."""
    from PySide6.QtCore import QEventLoop, QTimer  # noqa: PLC0415 -- Qt loads only after prepare_qt_environment() has set its variables

    loop = QEventLoop()
    deadline = time.monotonic() + timeout_s
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: (predicate() or time.monotonic() > deadline) and loop.quit())
    timer.start()
    loop.exec()
    timer.stop()
    return bool(predicate())


def fix_shot(window, out: Path) -> Path:
    """The fix the diagnosis points at, where it matters: 4-bit weights, GPTQ on the first-divergence unit,
    shown with the per-module chart over the located unit's patch errors before and after."""
    idle = lambda: window.session is not None and not window.runner.busy  # noqa: E731
    panel = window.model_panel
    panel.weight_combo.setCurrentText("uint4")
    panel.apply_button.click()
    _spin(lambda: idle() and window.session.state != "calibrated", 600)
    window.calibration_tab.calibrate()
    _spin(lambda: idle() and window.session.state == "calibrated" and window.errors_tab.result is not None, 1800)
    fix = window.fix_tab
    window.tabs.setCurrentWidget(fix)
    fix.checks["gptq"].setChecked(True)
    if not fix.globs["gptq"].text().strip():
        fix.globs["gptq"].setText("encoder.layers.*")
    fix.run_fix()
    _spin(lambda: fix.view.result is not None and idle(), 1800)
    fix.views.setCurrentWidget(fix.heatmaps)
    _spin(lambda: False, 0.5)
    path = out / "fix.png"
    window.grab().save(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    """Calibrate the tiny model on the bundled samples, export, and save one PNG per tab."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv[0] if argv else "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    prepare_qt_environment()
    from PySide6.QtCore import QSettings  # noqa: PLC0415 -- Qt loads only after prepare_qt_environment() has set its variables
    from PySide6.QtWidgets import QApplication  # noqa: PLC0415 -- Qt loads only after prepare_qt_environment() has set its variables

    from app.qt_main_window import QtMainWindow  # noqa: PLC0415 -- Qt loads only after prepare_qt_environment() has set its variables

    _qapp = QApplication.instance() or QApplication([])  # held: Qt needs it alive while windows exist
    work = Path(tempfile.mkdtemp(prefix="ptq-shots-"))
    settings = QSettings(str(work / "settings.ini"), QSettings.IniFormat)
    window = QtMainWindow(model_spec="tiny", images=sample_images(), max_soft_tokens=DEFAULT_SOFT_TOKENS, settings=settings)
    window.resize(1440, 900)
    window.show()
    idle = lambda: window.session is not None and not window.runner.busy  # noqa: E731
    _spin(idle, 600)
    window.calibration_tab.calibrate()
    _spin(lambda: window.errors_tab.result is not None and idle(), 1800)

    calib = window.calibration_tab
    window.tabs.setCurrentWidget(calib)
    listed = [e.image_id for e in window.session.images if e.status != "rejected"]
    _spin(lambda: all(calib.thumbnail_for(i) is not None for i in listed), 30)
    calib.grid.setCurrentIndex(calib.model.index(0, 0))
    _spin(lambda: calib.preview_image.pixmap() is not None and not calib.preview_image.pixmap().isNull(), 10)
    window.grab().save(str(out / "calibration.png"))

    ranges = window.ranges_tab
    window.tabs.setCurrentWidget(ranges)
    widest = max(range(len(ranges.records)), key=lambda i: float(ranges.model.data(ranges.model.index(i, 10), ranges.proxy.sortRole()) or 0))
    ranges.select_observer(widest)
    _spin(lambda: False, 0.5)
    window.grab().save(str(out / "ranges.png"))

    # provenance: a mid-depth MLP activation, the image that set its max and the patch outlined
    prov = next((i for i, r in enumerate(ranges.records) if r.kind == "activation" and "layers.1.mlp" in r.name), 0)
    ranges.select_observer(prov)
    _spin(lambda: ranges.source_panel.location is not None and idle(), 120)
    ranges.table_tabs.setCurrentIndex(1)  # the image ranking beside the source image
    _spin(lambda: False, 0.5)
    window.grab().save(str(out / "provenance.png"))
    ranges.table_tabs.setCurrentIndex(0)

    errors = window.errors_tab
    window.tabs.setCurrentWidget(errors)
    errors.table.sortByColumn(3, errors.table.horizontalHeader().sortIndicatorOrder())
    errors.select_module(errors.proxy.data(errors.proxy.index(0, 1)))
    errors.run_sensitivity()
    _spin(lambda: errors.sensitivity_table.rowCount() > 0 and idle(), 1800)
    errors.detail_tabs.setCurrentIndex(1)  # the scatter
    window.grab().save(str(out / "errors.png"))

    # the first-divergence banner, clicked: its unit selected and its patch heatmap shown
    if errors.banner.located:
        errors.show_unit(errors.banner.located)
    errors.detail_tabs.setCurrentWidget(errors.heatmap)
    _spin(lambda: idle() and errors.heatmap.heatmap is not None, 600)
    _spin(lambda: False, 0.5)
    window.grab().save(str(out / "heatmap.png"))

    ab = window.ab_tab
    window.tabs.setCurrentWidget(ab)
    ab.activation_combo.setCurrentText("int16")
    ab.run_compare()
    _spin(lambda: ab.result is not None and idle(), 1800)
    ab.table.selectRow(0)
    _spin(lambda: False, 0.5)
    window.grab().save(str(out / "ab.png"))

    export = window.export_tab
    window.tabs.setCurrentWidget(export)
    export.path_edit.setText(str(work / "gemma4_vision_tiny.circle"))
    export.export()
    _spin(idle, 1800)  # the runner is busy from the moment export() submits the task
    window.grab().save(str(out / "export.png"))
    if export.result is not None:
        export.run_threeway()
        _spin(idle, 1800)
        export.body_splitter.setSizes([260, 520])
        _spin(lambda: False, 0.5)
        window.grab().save(str(out / "threeway.png"))

    if export.result is not None:
        window.open_in_netron(str(export.result.path))
        _spin(lambda: False, 8.0)
        window.grab().save(str(out / "netron.png"))
    fix_shot(window, out)
    window.close()
    print("\n".join(str(p) for p in sorted(out.glob("*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
