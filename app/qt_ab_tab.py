"""A/B tab: calibrate a second config (B) beside the session's (A) and compare them per module."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

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

from app.ab_state import ABViewState
from app.qt_ab_charts import A_COLOR, B_COLOR, QtABCharts
from app.qt_common import (
    QtMessageLine,
    QtSessionTab,
    QtTaskProgress,
    end_task_with_error,
    error_text,
    fmt_float,
    results_table,
)
from core.analysis.ab_overrides import describe_config, override_text
from core.config import OBSERVERS, PTQConfig, build_config, override_line, parse_override_lines
from core.errors import PTQStudioError
from core.export.config_export import one_name_map, write_one_quant_config, write_tico_ptq_yaml
from core.quant.dtypes import DTYPES

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

WIN_COLORS = {"A": QColor(31, 119, 180, 60), "B": QColor(255, 127, 14, 70)}
SORT_ROLE = Qt.UserRole + 30


class QtABTab(QtSessionTab):
    """Is B better than A, module by module, and by how much end to end."""

    sigCompared = Signal(object)  # ABResult

    COLUMNS = ("#", "Module", "Winner", "Δ SQNR dB (B − A)", "A SQNR dB", "B SQNR dB", "Kind", "A PEIR", "B PEIR",
               "Own config A → B")

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__(host)
        self.view = ABViewState()
        self.names: list[str] = []

        # config B
        self.activation_combo = QComboBox()
        self.activation_combo.setObjectName("abActivationDtype")
        self.activation_combo.addItems(tuple(DTYPES))
        self.activation_combo.setCurrentText("int16")
        self.weight_combo = QComboBox()
        self.weight_combo.setObjectName("abWeightDtype")
        self.weight_combo.addItems(tuple(DTYPES))
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
        self.margin_spin.setValue(self.view.margin_db)
        self.margin_spin.setSuffix(" dB")
        self.margin_spin.setToolTip("B's setting is kept for a module only when it beats A by at least this much")
        self.margin_spin.valueChanged.connect(self._on_margin_changed)
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

        self.summary_label = QLabel()  # filled by _show_result; the empty state speaks before that
        self.summary_label.setObjectName("abSummary")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary_label.setStyleSheet("font-size: 13px;")

        self.charts = QtABCharts()
        # The charts' parts by name: the tests and the screenshots read them.
        self.plot, self.delta_plot = self.charts.plot, self.charts.delta_plot
        self.curve_a, self.curve_b = self.charts.curve_a, self.charts.curve_b
        self.charts.sigModuleClicked.connect(self._on_module_clicked)

        self.table = results_table(self.COLUMNS, "abTable")
        self.table.currentCellChanged.connect(self._on_current_cell)
        self.message = QtMessageLine()
        self.message.show_message("A is the session's config; B is calibrated on the same images without touching A.")

        right = QSplitter(Qt.Vertical)
        right.addWidget(self.charts)
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
        self._show_empty()
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

    # -- the session ---------------------------------------------------------------------------
    def set_session(self, session) -> None:
        """Follow this session (the main window's one call when it replaces the session): A is its
        config; any comparison of the previous session is dropped."""
        if session is self._session:
            return
        self._session = session
        self._subscriptions.replace(
            session.events if session is not None else None,
            {"calibrated": self._on_calibrated, "config_changed": self._on_config_changed, "exported": self._on_exported},
        )
        self.view.a_changed(None)
        self.view.tensor_modules = {}  # the previous session's export named other tensors
        if session is not None:
            self.view.stats_version = session.stats_version
            self.show_config_a(session.config)
        self._show_view()

    def _on_calibrated(self, stats_version: int) -> None:
        # A cancelled recalibration restores the compared statistics (same version): keep the view.
        if self.view.a_changed(stats_version):
            self._show_view()

    def _on_config_changed(self, config) -> None:
        self.view.a_changed(0)  # a new config has no statistics yet (version 0)
        self._show_view()
        self.show_config_a(config)

    def _on_exported(self, export) -> None:
        self.view.tensor_modules = dict(getattr(export, "tensor_modules", None) or {})

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

    def config_b(self) -> PTQConfig:
        """PTQConfig B from the form: A's config with B's dtypes, observer and overrides."""
        return build_config(
            getattr(self._session, "config", None),
            activation=self.activation_combo.currentText(),
            weight=self.weight_combo.currentText(),
            observer=self.observer_combo.currentText(),
            overrides=parse_override_lines(self.overrides_edit.toPlainText()),
        )

    # -- calibrate B and compare ------------------------------------------------------------
    @property
    def result(self):
        """The comparison shown (an ABResult), or None."""
        return self.view.result

    def run_compare(self) -> None:
        """Calibrate B and compare it with A, in the worker."""
        session = self._session
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
                # The worker runs one task at a time: this is the version A was compared with.
                return ab.compare(progress=phase("comparing A and B"), cancel=cancel), session.stats_version
            finally:
                ab.release()  # B's weights are a second copy of the model's

        self._task = self._host.submit(
            "A/B compare", work, on_done=self._on_compared, on_error=self._on_error, on_progress=self.progress.update_progress
        )

    def cancel(self) -> None:
        """Stop B's calibration or the comparison; A is never touched."""
        self.progress.cancel_task(self._task)

    def _on_compared(self, payload) -> None:
        result, stats_version = payload
        self._task = None
        self.compare_button.setEnabled(True)
        self.progress.end(f"compared on {len(result.images)} image(s)")
        self.view.compared(result, stats_version)
        self._show_view()
        self.message.show_message(f"Compared A and B on {len(result.images)} image(s).", "ok")
        self.sigCompared.emit(result)

    def _on_error(self, exc: BaseException) -> None:
        self._task = None
        self.compare_button.setEnabled(True)
        end_task_with_error(
            exc, self.progress, self.message, self._host, "Cancelled; A is unchanged and the earlier comparison (if any) is kept."
        )

    # -- showing the view state -------------------------------------------------------------
    def _show_view(self) -> None:
        """Show what self.view holds: the comparison, or the how-to (saying when A changed)."""
        if self.view.result is not None:
            self._show_result(self.view.result)
            return
        self.names = []
        self.table.setRowCount(0)
        self.charts.clear()
        self._show_empty()
        self.winning_label.setText("—")
        for b in (self.export_yaml_button, self.export_json_button, self.apply_button):
            b.setEnabled(False)

    def _show_empty(self) -> None:
        first = (
            "<b>A changed since the last comparison</b>, so it was cleared: press "
            "“Calibrate B and compare” again.<br><br>" if self.view.stale else ""
        )
        self.empty_label.setText(
            f"{first}<b>Compare two quantization configs, module by module.</b><br>"
            "A is the session's config (calibrate it on the Calibration tab). Set up B on the left "
            "(activations, weights, observer, per-module overrides) and press “Calibrate B and compare”: "
            "B is calibrated on the same images, without touching A, and the SQNR of both is charted "
            "per module and end to end. The overrides where B wins can then be exported or applied."
        )
        self.outputs.setCurrentWidget(self.empty_label)

    def _show_result(self, result) -> None:
        """Fill the chart, the table and the summary from an ABResult."""
        self.outputs.setCurrentIndex(1)
        modules = list(result.modules)
        self.names = [m.name for m in modules]
        n = len(modules)
        self.charts.show_modules(modules)

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
        self.summary_label.setToolTip(f"A: {describe_config(result.config_a)}\nB: {describe_config(result.config_b)}")
        self._update_winning()

    def winning_overrides(self) -> dict:
        """B's winning overrides at the chosen margin (empty before a comparison)."""
        if self.result is None:
            return {}
        return dict(self.result.winning_overrides(margin_db=self.view.margin_db))

    def _on_margin_changed(self, value: float) -> None:
        self.view.margin_db = float(value)
        self._update_winning()

    def _update_winning(self) -> None:
        if self.result is None:
            return
        overrides = self.winning_overrides()
        if overrides:
            shown = [f"{g} = {override_text(v)}" for g, v in list(overrides.items())[:8]]
            more = f"\n… and {len(overrides) - 8} more" if len(overrides) > 8 else ""
            self.winning_label.setText(f"{len(overrides)} override(s) where B wins by ≥ {self.view.margin_db:g} dB:\n"
                                       + "\n".join(shown) + more)
        else:
            self.winning_label.setText(f"B wins nowhere by ≥ {self.view.margin_db:g} dB: nothing to export.")
        for b in (self.export_yaml_button, self.export_json_button, self.apply_button):
            b.setEnabled(bool(overrides) and self._task is None)

    def _on_current_cell(self, row: int, _col: int, _prow: int, _pcol: int) -> None:
        item = self.table.item(row, 0) if row >= 0 else None
        if item is not None:
            self.charts.mark(int(item.data(SORT_ROLE)))

    def _on_module_clicked(self, index: int) -> None:
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
            write_tico_ptq_yaml(path, overrides, base=result.config_a, modules=result.module_names)
            return path

        self._host.submit("export YAML", work, takes_progress=False, on_done=self._on_written, on_error=self._on_write_error)

    def export_json(self, path: str) -> None:
        """Write B's winning overrides as a ONE quantization JSON (in the worker, atomically)."""
        overrides = self.winning_overrides()

        result = self.result
        # ONE finds layers by Circle tensor name: take them from this session's last export.
        tensor_modules = dict(self.view.tensor_modules)

        def work():
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
        merged = self.result.merged_config(margin_db=self.view.margin_db)
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

