"""A/B tab: calibrate a second config (B) beside the session's (A) and compare them per module."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import QtMessageLine, QtTaskProgress, error_text, fmt_float, results_table
from core.errors import ConfigError, PTQStudioError

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

DTYPES = ["uint8", "int8", "int16", "uint4", "int4"]
OBSERVERS = ["minmax", "ema", "percentile"]
A_COLOR = "#1f77b4"
B_COLOR = "#ff7f0e"
WIN_COLORS = {"A": QColor(31, 119, 180, 60), "B": QColor(255, 127, 14, 70)}
SORT_ROLE = Qt.UserRole + 30
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def parse_override_lines(text: str) -> dict[str, object]:
    """Override lines as PTQConfig.overrides values; blank lines and # comments are ignored.

    ``glob = int16`` sets the activations, ``glob = float`` keeps the module float and
    ``glob = int16 / uint4`` sets activations / weights (``-`` leaves one side as configured).
    """
    out: dict[str, object] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        glob, sep, value = line.partition("=")
        if not sep:
            glob, sep, value = line.partition(":")
        glob, value = glob.strip(), value.strip()
        if not sep or not glob or not value:
            raise ConfigError(f"override line {number} {raw.strip()!r}: write 'glob = dtype' or 'glob = float'")
        if "/" in value:
            act, _, wgt = (v.strip() for v in value.partition("/"))
            spec = {k: v for k, v in (("activation", act), ("weight", wgt)) if v and v != "-"}
            if not spec:
                raise ConfigError(f"override line {number} {raw.strip()!r}: give an activation or a weight dtype")
            out[glob] = spec
        else:
            out[glob] = value
    return out


def override_line(glob: str, value) -> str | None:
    """The line parse_override_lines reads back as this override (None if dtypes cannot say it)."""
    if isinstance(value, str):
        return f"{glob} = {value}"
    if not isinstance(value, dict):
        return None
    act, wgt = value.get("activation"), value.get("weight")
    if act and not wgt and set(act) <= {"dtype", "scheme", "per_channel"}:
        return f"{glob} = {act['dtype']}"
    if act or wgt:
        return f"{glob} = {act['dtype'] if act else '-'} / {wgt['dtype'] if wgt else '-'}"
    return None


_SHORT = {"patch_embedder": "embed", "encoder": "enc", "pooler": "pool", "": "model"}


def module_group(name: str) -> str:
    """A short label for the part of the model a module belongs to (L3, embed, pool, …)."""
    m = _LAYER.search(name)
    if m:
        return f"L{m.group(1)}"
    head = name.split(".")[0]
    return _SHORT.get(head, head)


class _CategoryAxis(pg.AxisItem):
    """Bottom axis with a label at the first module of each layer (fixed ticks)."""

    def set_names(self, names: list[str]) -> None:
        ticks: list[tuple[float, str]] = []
        previous = None
        gap = max(1, len(names) // 30)  # labels closer than this would print over each other
        for i, name in enumerate(names):
            group = module_group(name)
            if group != previous:
                if ticks and i - ticks[-1][0] <= gap:
                    if not ticks[-1][1].startswith("L"):  # a layer's label beats its container's
                        ticks[-1] = (float(i), group)
                else:
                    ticks.append((float(i), group))
                previous = group
        self.setTicks([ticks, []])


class QtABTab(QWidget):
    """Is B better than A, module by module, and by how much end to end."""

    sigCompared = Signal(object)  # ABResult

    COLUMNS = ("#", "Module", "Winner", "Δ SQNR dB (B − A)", "A SQNR dB", "B SQNR dB", "Kind", "A PEIR", "B PEIR",
               "Own config A → B")

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self._task = None
        self.result = None
        self.names: list[str] = []

        # config B
        self.activation_combo = QComboBox()
        self.activation_combo.setObjectName("abActivationDtype")
        self.activation_combo.addItems(DTYPES)
        self.activation_combo.setCurrentText("int16")
        self.weight_combo = QComboBox()
        self.weight_combo.setObjectName("abWeightDtype")
        self.weight_combo.addItems(DTYPES)
        self.observer_combo = QComboBox()
        self.observer_combo.setObjectName("abObserverKind")
        self.observer_combo.addItems(OBSERVERS)
        self.overrides_edit = QPlainTextEdit()
        self.overrides_edit.setObjectName("abOverrides")
        self.overrides_edit.setPlaceholderText(
            "one override per line, e.g.\nencoder.layers.* = int16\n*.self_attn.o_proj = float\n*.mlp.* = int16 / uint4   (act / weight)"
        )
        self.overrides_edit.setMaximumHeight(110)
        self.config_a_label = QLabel("A: the session's config (calibrate it first)")
        self.config_a_label.setWordWrap(True)
        self.config_a_label.setStyleSheet("color: palette(dark);")
        self.compare_button = QPushButton("Calibrate B and compare")
        self.compare_button.setObjectName("abCompareButton")
        self.compare_button.setStyleSheet("QPushButton#abCompareButton { font-weight: 600; padding: 4px 14px; }")
        self.compare_button.setToolTip("Calibrate config B on the session's images, then compare A and B on them")
        self.progress = QtTaskProgress(cancel_name="abCancelButton")

        config_box = QGroupBox("Config B")
        form = QFormLayout(config_box)
        form.addRow(self.config_a_label)
        form.addRow("Activations:", self.activation_combo)
        form.addRow("Weights:", self.weight_combo)
        form.addRow("Observer:", self.observer_combo)
        overrides_title = QLabel("Overrides, one per line: glob = dtype | float | act / weight")
        overrides_title.setWordWrap(True)
        form.addRow(overrides_title)
        form.addRow(self.overrides_edit)
        form.addRow(self.compare_button)
        form.addRow(self.progress)

        # outputs
        self.margin_spin = QDoubleSpinBox()
        self.margin_spin.setObjectName("abMarginDb")
        self.margin_spin.setRange(0.0, 30.0)
        self.margin_spin.setSingleStep(0.5)
        self.margin_spin.setValue(0.5)
        self.margin_spin.setSuffix(" dB")
        self.margin_spin.setToolTip("B's setting is kept for a module only when it beats A by at least this much")
        self.margin_spin.valueChanged.connect(lambda _v: self._update_winning())
        self.winning_label = QLabel("—")
        self.winning_label.setWordWrap(True)
        self.winning_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.export_yaml_button = QPushButton("Export TICO YAML…")
        self.export_yaml_button.setObjectName("abExportYamlButton")
        self.export_json_button = QPushButton("Export ONE JSON…")
        self.export_json_button.setObjectName("abExportJsonButton")
        self.apply_button = QPushButton("Apply merged config")
        self.apply_button.setObjectName("abApplyMergedButton")
        self.apply_button.setToolTip("Use A plus B's winning overrides as the session's config and calibrate it")
        for b in (self.export_yaml_button, self.export_json_button, self.apply_button):
            b.setEnabled(False)
        win_box = QGroupBox("Winning overrides")
        wl = QFormLayout(win_box)
        wl.addRow("Margin:", self.margin_spin)
        wl.addRow(self.winning_label)
        wl.addRow(self.export_yaml_button)
        wl.addRow(self.export_json_button)
        wl.addRow(self.apply_button)

        left = QWidget()
        left.setMaximumWidth(340)
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(config_box)
        ll.addWidget(win_box)
        ll.addStretch(1)

        self.summary_label = QLabel()  # filled by show_result; the empty state speaks before that
        self.summary_label.setObjectName("abSummary")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary_label.setStyleSheet("font-size: 13px;")

        # chart: both configs' SQNR per module, and B - A below, x linked; built once
        self.axis = _CategoryAxis(orientation="bottom")
        self.plot = pg.PlotWidget(axisItems={"bottom": self.axis})
        self.plot.setObjectName("abPlot")
        self.plot.setBackground("w")
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.plot.setLabel("left", "SQNR (dB)")
        self.plot.addLegend(offset=(-10, 5))
        self.curve_a = self.plot.plot([], [], pen=pg.mkPen(A_COLOR, width=1.5), name="A")
        self.curve_b = self.plot.plot([], [], pen=pg.mkPen(B_COLOR, width=1.5), name="B")
        tip = self._tip
        self.points_a = pg.ScatterPlotItem(size=6, pen=None, brush=pg.mkBrush(A_COLOR), hoverable=True, tip=tip)
        self.points_b = pg.ScatterPlotItem(size=6, pen=None, brush=pg.mkBrush(B_COLOR), hoverable=True, tip=tip)
        self.plot.addItem(self.points_a)
        self.plot.addItem(self.points_b)
        self._cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#444", width=1, style=Qt.DashLine))
        self._cursor.setVisible(False)
        self.plot.addItem(self._cursor)
        self.points_a.sigClicked.connect(self._on_point_clicked)
        self.points_b.sigClicked.connect(self._on_point_clicked)

        self.delta_axis = _CategoryAxis(orientation="bottom")
        self.delta_plot = pg.PlotWidget(axisItems={"bottom": self.delta_axis})
        self.delta_plot.setObjectName("abDeltaPlot")
        self.delta_plot.setBackground("w")
        self.delta_plot.showGrid(x=True, y=True, alpha=0.2)
        self.delta_plot.setLabel("left", "Δ dB (B − A)")
        self.delta_plot.setXLink(self.plot)
        self.delta_bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=B_COLOR)
        self.delta_plot.addItem(self.delta_bars)
        self.delta_plot.addItem(pg.InfiniteLine(pos=0, angle=0, movable=False, pen=pg.mkPen("#888")))
        self.delta_plot.setMaximumHeight(170)

        self.table = results_table(self.COLUMNS, "abTable")
        self.table.currentCellChanged.connect(self._on_current_cell)
        self.message = QtMessageLine()
        self.message.show_message("A is the session's config; B is calibrated on the same images without touching A.")

        charts = QWidget()
        cl = QVBoxLayout(charts)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(self.plot, 1)
        cl.addWidget(self.delta_plot)
        right = QSplitter(Qt.Vertical)
        right.addWidget(charts)
        right.addWidget(self.table)
        right.setSizes([380, 320])
        body = QSplitter(Qt.Horizontal)
        body.addWidget(left)
        results = QWidget()
        ol = QVBoxLayout(results)
        ol.setContentsMargins(0, 0, 0, 0)
        ol.addWidget(self.summary_label)
        ol.addWidget(right, 1)
        # Until a comparison exists the charts would be empty 0-1 axes; say what the tab does instead.
        self.empty_label = QLabel()
        self.empty_label.setObjectName("abEmptyState")
        self.empty_label.setWordWrap(True)
        self.empty_label.setAlignment(Qt.AlignCenter)
        self.empty_label.setMargin(24)
        self.empty_label.setStyleSheet("font-size: 13px; color: palette(dark);")
        self.outputs = QStackedWidget()
        self.outputs.addWidget(self.empty_label)
        self.outputs.addWidget(results)
        self._show_empty(stale=False)
        body.addWidget(self.outputs)
        body.setStretchFactor(0, 0)
        body.setStretchFactor(1, 1)
        body.setSizes([300, 900])
        layout = QVBoxLayout(self)
        layout.addWidget(body, 1)
        layout.addWidget(self.message)

        self.compare_button.clicked.connect(self.run_compare)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.export_yaml_button.clicked.connect(self.choose_yaml_path)
        self.export_json_button.clicked.connect(self.choose_json_path)
        self.apply_button.clicked.connect(self.apply_merged)

    # -- config B ---------------------------------------------------------------------------
    def show_config_a(self, config) -> None:
        """Describe A and start B from it (activations to int16, the usual first experiment)."""
        if config is None:
            return
        act, wgt = config.activation.dtype, config.weight.dtype
        self.config_a_label.setText(f"A (session): activations {act}, weights {wgt}, observer {config.observer}"
                                    + (f", {len(config.overrides)} override(s)" if config.overrides else ""))
        self.weight_combo.setCurrentText(wgt)
        self.observer_combo.setCurrentText(config.observer)
        self.activation_combo.setCurrentText("int16" if act != "int16" else "uint8")
        lines = [override_line(glob, value) for glob, value in config.to_dict().get("overrides", {}).items()]
        self.overrides_edit.setPlainText("\n".join(line for line in lines if line))

    def config_b(self):
        """PTQConfig B from the form: A's config with B's dtypes, observer and overrides."""
        from dataclasses import replace  # noqa: PLC0415

        from core.config import PTQConfig  # noqa: PLC0415

        base = getattr(self._host.session, "config", None) or PTQConfig()
        return replace(
            base,
            activation=replace(base.activation, dtype=self.activation_combo.currentText()),
            weight=replace(base.weight, dtype=self.weight_combo.currentText()),
            observer=self.observer_combo.currentText(),
            overrides=parse_override_lines(self.overrides_edit.toPlainText()),
        )

    # -- calibrate B and compare ------------------------------------------------------------
    def run_compare(self) -> None:
        """Calibrate B and compare it with A, in the worker."""
        session = self._host.session
        if session is None or self._task is not None:
            return
        if getattr(session, "state", "") != "calibrated":
            self.message.show_message("Calibrate A first (Calibration tab), then compare.", "error")
            return
        try:
            config_b = self.config_b()
        except PTQStudioError as exc:
            self.message.show_message(error_text(exc), "error")
            return
        self.compare_button.setEnabled(False)
        self.progress.begin(0, "images", "calibrating B…")
        self.message.show_message("Calibrating B on the session's images…")

        def work(progress, cancel):
            from core.analysis.abtest import ABComparison  # noqa: PLC0415 -- torch stays off the window's startup path

            def phase(name):
                return lambda done, total, message="": progress(done, total, f"{name}{' · ' + message if message else ''}")

            ab = ABComparison(session, config_b)
            try:
                ab.calibrate_b(progress=phase("calibrating B"), cancel=cancel)
                return ab.compare(progress=phase("comparing A and B"), cancel=cancel)
            finally:
                ab.release()  # B's weights are a second copy of the model's

        self._task = self._host.submit(
            "A/B compare", work, on_done=self._on_compared, on_error=self._on_error, on_progress=self.progress.update_progress
        )

    def cancel(self) -> None:
        """Stop B's calibration or the comparison; A is never touched."""
        self.progress.cancel_task(self._task)

    def _on_compared(self, result) -> None:
        self._task = None
        self.compare_button.setEnabled(True)
        self.progress.end(f"compared on {len(result.images)} image(s)")
        self.show_result(result)
        self.message.show_message(f"Compared A and B on {len(result.images)} image(s).", "ok")
        self.sigCompared.emit(result)

    def _on_error(self, exc: BaseException) -> None:
        self._task = None
        self.compare_button.setEnabled(True)
        from core.errors import CancelledError  # noqa: PLC0415

        if isinstance(exc, CancelledError):
            self.progress.end("cancelled")
            self.message.show_message("Cancelled; A is unchanged and the earlier comparison (if any) is kept.")
            return
        self.progress.end("failed")
        self.message.show_message(error_text(exc), "error")
        self._host.show_error(exc)

    def clear(self) -> None:
        """Forget the comparison (A changed)."""
        had_result = self.result is not None
        self.result = None
        self.names = []
        self.table.setRowCount(0)
        for item in (self.curve_a, self.curve_b, self.points_a, self.points_b):
            item.setData([], [])
        self.delta_bars.setOpts(x=[], height=[], brushes=None)
        self._cursor.setVisible(False)
        self._show_empty(stale=had_result)
        self.winning_label.setText("—")
        for b in (self.export_yaml_button, self.export_json_button, self.apply_button):
            b.setEnabled(False)

    def _show_empty(self, stale: bool) -> None:
        # "compare again" only when there was a comparison to drop; a first visit gets the how-to.
        first = (
            "<b>A changed since the last comparison</b>, so it was cleared: press "
            "“Calibrate B and compare” again.<br><br>" if stale else ""
        )
        self.empty_label.setText(
            f"{first}<b>Compare two quantization configs, module by module.</b><br>"
            "A is the session's config (calibrate it on the Calibration tab). Set up B on the left "
            "(activations, weights, observer, per-module overrides) and press “Calibrate B and compare”: "
            "B is calibrated on the same images, without touching A, and the SQNR of both is charted "
            "per module and end to end. The overrides where B wins can then be exported or applied."
        )
        self.outputs.setCurrentWidget(self.empty_label)

    # -- showing a result -------------------------------------------------------------------
    @staticmethod
    def _finite(values) -> np.ndarray:
        arr = np.asarray(values, dtype=float)
        return np.where(np.isfinite(arr), arr, np.nan)

    def _tip(self, x, y, data) -> str:
        return f"{data}\nSQNR {y:.2f} dB"

    def show_result(self, result) -> None:
        """Fill the chart, the table and the summary from an ABResult."""
        self.result = result
        self.outputs.setCurrentIndex(1)
        modules = list(result.modules)
        self.names = [m.name for m in modules]
        n = len(modules)
        x = np.arange(n, dtype=float)
        a = self._finite([m.a.sqnr_db for m in modules])
        b = self._finite([m.b.sqnr_db for m in modules])
        delta = self._finite([m.delta_sqnr_db for m in modules])
        self.curve_a.setData(x, a, connect="finite")
        self.curve_b.setData(x, b, connect="finite")
        ok_a, ok_b = np.isfinite(a), np.isfinite(b)
        self.points_a.setData(x[ok_a], a[ok_a], data=[self.names[i] + " (A)" for i in np.flatnonzero(ok_a)])
        self.points_b.setData(x[ok_b], b[ok_b], data=[self.names[i] + " (B)" for i in np.flatnonzero(ok_b)])
        brushes = [pg.mkBrush(B_COLOR if str(m.winner) == "B" else A_COLOR if str(m.winner) == "A" else "#999") for m in modules]
        self.delta_bars.setOpts(x=x, height=np.nan_to_num(delta), width=0.7, brushes=brushes)
        self.axis.set_names(self.names)
        self.delta_axis.set_names(self.names)
        self.plot.enableAutoRange()
        self.delta_plot.enableAutoRange()

        table = self.table
        table.setSortingEnabled(False)
        table.setRowCount(n)
        for row, m in enumerate(modules):
            winner = str(m.winner)
            cells = [
                (str(row), row),
                (m.name, m.name),
                (winner, winner),
                (f"{float(m.delta_sqnr_db):+.2f}", float(m.delta_sqnr_db)),
                (f"{float(m.a.sqnr_db):.2f}", float(m.a.sqnr_db)),
                (f"{float(m.b.sqnr_db):.2f}", float(m.b.sqnr_db)),
                (str(m.kind), str(m.kind)),
                (fmt_float(m.a.peir), float(m.a.peir)),
                (fmt_float(m.b.peir), float(m.b.peir)),
                (f"{m.spec_a} → {m.spec_b}" if getattr(m, "config_differs", False) else "same", str(m.spec_b)),
            ]
            for col, (text, key) in enumerate(cells):
                item = _SortItem(text)
                item.setData(SORT_ROLE, key)
                if col in (0, 3, 4, 5, 7, 8):
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                if col == 2:
                    item.setTextAlignment(Qt.AlignCenter)
                if col == 2 and winner in WIN_COLORS:
                    item.setBackground(WIN_COLORS[winner])
                if col == 1:
                    item.setToolTip(m.name)
                table.setItem(row, col, item)
        table.setSortingEnabled(True)
        table.sortItems(0, Qt.AscendingOrder)
        table.resizeColumnsToContents()

        ea, eb = result.end_to_end_a, result.end_to_end_b
        d = float(result.end_to_end_delta_db)
        wins = sum(str(m.winner) == "B" for m in modules)
        losses = sum(str(m.winner) == "A" for m in modules)
        winner = result.end_to_end_winner
        verdict = "a tie end to end" if winner == "tie" else f"<b>{winner}</b> is better end to end"
        notes = "".join(
            f"<br><span style='color:#b26a00'>{g} differs and cannot be a per-module override; A's is kept when merging.</span>"
            for g in getattr(result, "global_differences", [])
        )
        self.summary_label.setText(
            f"<b>End to end</b> on {len(result.images)} image(s): "
            f"<span style='color:{A_COLOR}'><b>A {float(ea.sqnr_db):.2f} dB</b></span> · "
            f"<span style='color:{B_COLOR}'><b>B {float(eb.sqnr_db):.2f} dB</b></span> · Δ {d:+.2f} dB "
            f"(PEIR A {fmt_float(ea.peir)}, B {fmt_float(eb.peir)}): {verdict}; "
            f"per module B wins {wins}, A wins {losses}, {n - wins - losses} ties.{notes}"
        )
        from core.analysis.abtest import describe_config  # noqa: PLC0415

        self.summary_label.setToolTip(f"A: {describe_config(result.config_a)}\nB: {describe_config(result.config_b)}")
        self._update_winning()

    def winning_overrides(self) -> dict:
        """B's winning overrides at the chosen margin (empty before a comparison)."""
        if self.result is None:
            return {}
        return dict(self.result.winning_overrides(margin_db=float(self.margin_spin.value())))

    def _update_winning(self) -> None:
        if self.result is None:
            return
        overrides = self.winning_overrides()
        if overrides:
            shown = [f"{g} = {_override_text(v)}" for g, v in list(overrides.items())[:8]]
            more = f"\n… and {len(overrides) - 8} more" if len(overrides) > 8 else ""
            self.winning_label.setText(f"{len(overrides)} override(s) where B wins by ≥ {self.margin_spin.value():g} dB:\n"
                                       + "\n".join(shown) + more)
        else:
            self.winning_label.setText(f"B wins nowhere by ≥ {self.margin_spin.value():g} dB: nothing to export.")
        for b in (self.export_yaml_button, self.export_json_button, self.apply_button):
            b.setEnabled(bool(overrides) and self._task is None)

    def _on_current_cell(self, row: int, _col: int, _prow: int, _pcol: int) -> None:
        item = self.table.item(row, 0) if row >= 0 else None
        if item is None:
            return
        index = int(item.data(SORT_ROLE))
        self._cursor.setValue(index)
        self._cursor.setVisible(True)

    def _on_point_clicked(self, _item, points, *_args) -> None:
        if not len(points):
            return
        index = int(round(points[0].pos().x()))
        for row in range(self.table.rowCount()):
            if int(self.table.item(row, 0).data(SORT_ROLE)) == index:
                self.table.selectRow(row)
                self.table.scrollToItem(self.table.item(row, 0))
                break

    # -- exports ------------------------------------------------------------------------------
    def _choose(self, title: str, suffix: str, filter_text: str) -> str | None:
        start = str(Path(self._host.last_folder("abexport")) / f"ptq_overrides{suffix}")
        path, _ = QFileDialog.getSaveFileName(self, title, start, filter_text)
        if not path:
            return None
        if not path.endswith(suffix):
            path += suffix
        self._host.remember_folder("abexport", str(Path(path).parent))
        return path

    def choose_yaml_path(self) -> None:
        """Ask where to save the TICO PTQ YAML and write it."""
        path = self._choose("Export TICO PTQ YAML", ".yaml", "YAML files (*.yaml *.yml)")
        if path:
            self.export_yaml(path)

    def choose_json_path(self) -> None:
        """Ask where to save the ONE quantization JSON and write it."""
        path = self._choose("Export ONE quantization JSON", ".json", "JSON files (*.json)")
        if path:
            self.export_json(path)

    def export_yaml(self, path: str) -> None:
        """Write B's winning overrides as a TICO PTQ YAML (in the worker, atomically)."""
        overrides = self.winning_overrides()

        result = self.result

        def work():
            from core.export.config_export import write_tico_ptq_yaml  # noqa: PLC0415

            write_tico_ptq_yaml(path, overrides, base=result.config_a, modules=result.module_names)
            return path

        self._host.submit("export YAML", work, takes_progress=False, on_done=self._on_written, on_error=self._on_write_error)

    def export_json(self, path: str) -> None:
        """Write B's winning overrides as a ONE quantization JSON (in the worker, atomically)."""
        overrides = self.winning_overrides()

        result = self.result
        # ONE finds layers by Circle tensor name: take them from this session's last export.
        exported = getattr(getattr(self._host, "export_tab", None), "result", None)
        tensor_modules = dict(getattr(exported, "tensor_modules", None) or {})

        def work():
            from core.export.config_export import one_name_map, write_one_quant_config  # noqa: PLC0415

            name_map = one_name_map(tensor_modules, result.module_names) if tensor_modules else None
            write_one_quant_config(path, overrides, name_map, base=result.config_a, modules=result.module_names)
            return path

        self._host.submit("export JSON", work, takes_progress=False, on_done=self._on_written, on_error=self._on_write_error)

    def _on_written(self, path) -> None:
        self.message.show_message(f"Wrote {path}.", "ok")
        self._host.statusBar().showMessage(f"Wrote {path}", 8000)

    def _on_write_error(self, exc: BaseException) -> None:
        self.message.show_message(error_text(exc), "error")
        self._host.show_error(exc)

    def apply_merged(self) -> None:
        """Make A plus B's winning overrides the session's config and calibrate it."""
        if self.result is None:
            return
        merged = self.result.merged_config(margin_db=float(self.margin_spin.value()))
        self.message.show_message("Applying the merged config and calibrating…")
        self._host.apply_config_and_calibrate(merged)


class _SortItem(QTableWidgetItem):
    """Sorts by the value in SORT_ROLE (numbers as numbers)."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.data(SORT_ROLE), other.data(SORT_ROLE)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            a = -math.inf if math.isnan(a) else a
            b = -math.inf if math.isnan(b) else b
            return a < b
        return str(a) < str(b)


def _override_text(value) -> str:
    if isinstance(value, str):
        return value
    to_json = getattr(value, "to_json", None)
    if to_json is not None:
        value = to_json()
    if isinstance(value, dict):
        act = value.get("activation", {})
        wgt = value.get("weight", {})
        parts = []
        if act:
            parts.append(f"act {act.get('dtype', act) if isinstance(act, dict) else act}")
        if wgt:
            parts.append(f"weight {wgt.get('dtype', wgt) if isinstance(wgt, dict) else wgt}")
        return ", ".join(parts) or str(value)
    dtype = getattr(value, "dtype", None)
    return str(dtype) if dtype is not None else str(value)

