"""Errors tab: first divergence, per-module FP-vs-quant error, depth chart, patch heatmap, scatter,
keep-float, sensitivity."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelectionModel,
    QModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import QtMessageLine, QtTaskProgress, error_text, fmt_float, plural
from app.qt_heatmap import QtPatchHeatmap

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

SORT_ROLE = Qt.UserRole + 20
WORST_N = 5
MAX_SCATTER_POINTS = 20000


def _sqnr_color(sqnr: float) -> QColor | None:
    # Rough bands an engineer reads at a glance: < 15 dB hurts, < 25 dB is worth a look.
    if not np.isfinite(sqnr):
        return None
    if sqnr < 15:
        return QColor(229, 57, 53, 70)
    if sqnr < 25:
        return QColor(255, 193, 7, 60)
    return None


class ModuleErrorModel(QAbstractTableModel):
    """Rows are ModuleErrors in forward order; the last column is a keep-in-float check."""

    sigKeepFloatChanged = Signal()
    COLUMNS = [
        ("#", "index"),
        ("Module", "name"),
        ("Kind", "kind"),
        ("SQNR dB", "sqnr_db"),
        ("PEIR", "peir"),
        ("MSE", "mse"),
        ("Max |err|", "max_abs"),
        ("Cosine", "cosine"),
        ("Clipped", "clipped_fraction"),
        ("Keep float", "keep"),
    ]
    KEEP_COL = len(COLUMNS) - 1

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.modules: list = []
        self.keep_float: set[str] = set()
        self._display: list[list[str]] = []
        self._sort: list[list] = []
        self._brush: list = []

    WIDTHS = (5, 34, 10, 9, 9, 10, 10, 8, 8, 9)

    @classmethod
    def prepare(cls, modules: list) -> tuple[list, list]:
        """Cell texts and sort keys; plain Python, so the worker thread can compute them."""
        display = [[cls._text(row, m, attr) for _t, attr in cls.COLUMNS] for row, m in enumerate(modules)]
        keys = [[cls._key(row, m, attr) for _t, attr in cls.COLUMNS] for row, m in enumerate(modules)]
        return display, keys

    def set_modules(self, modules: list, keep_float, prepared: tuple[list, list] | None = None) -> None:
        """Replace every row; keep_float is the set of module names checked."""
        self.beginResetModel()
        self.modules = list(modules)
        self.keep_float = set(keep_float or ())
        # Computed once (by the worker when it can): data() is called thousands of times.
        self._display, self._sort = prepared if prepared is not None else self.prepare(self.modules)
        self._brush = []
        for m in self.modules:
            color = _sqnr_color(float(m.sqnr_db))
            self._brush.append(QBrush(color) if color is not None else None)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802 - Qt override
        return 0 if parent.isValid() else len(self.modules)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802 - Qt override
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section, orientation, role=Qt.DisplayRole):  # noqa: N802 - Qt override
        if orientation == Qt.Horizontal and role == Qt.DisplayRole:
            return self.COLUMNS[section][0]
        if orientation == Qt.Horizontal and role == Qt.ToolTipRole:
            return {
                3: "signal-to-quantization-noise ratio; higher is better",
                4: "peak error to interval ratio: max |FP - Q| / (max FP - min FP); lower is better",
                9: "keep this module in float (its observers are switched off), then Re-evaluate",
            }.get(section)
        return None

    def flags(self, index):
        base = super().flags(index)
        if index.isValid() and index.column() == self.KEEP_COL:
            return base | Qt.ItemIsUserCheckable
        return base

    @staticmethod
    def _text(row: int, mod, attr: str) -> str:
        if attr == "keep":
            return ""
        value = row if attr == "index" else getattr(mod, attr, None)
        if value is None:
            return ""
        if attr == "clipped_fraction":
            return f"{100 * float(value):.2f}%"
        if attr == "sqnr_db":
            return f"{float(value):.2f}"
        if isinstance(value, (float, np.floating)):
            return fmt_float(value)
        return str(value)

    @staticmethod
    def _key(row: int, mod, attr: str):
        if attr == "keep":
            return 0
        value = row if attr == "index" else getattr(mod, attr, None)
        if attr in ("name", "kind"):
            return str(value)
        return float(value) if value is not None else float("nan")

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        row, col = index.row(), index.column()
        if col == self.KEEP_COL:
            checked = self.modules[row].name in self.keep_float
            if role == Qt.CheckStateRole:
                return Qt.Checked if checked else Qt.Unchecked
            if role == SORT_ROLE:
                return int(checked)
            return None
        if role == Qt.DisplayRole:
            return self._display[row][col]
        if role == SORT_ROLE:
            return self._sort[row][col]
        if role == Qt.BackgroundRole and col in (1, 3):
            return self._brush[row]
        if role == Qt.TextAlignmentRole and col not in (1, 2):
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None

    def setData(self, index, value, role=Qt.EditRole):  # noqa: N802 - Qt override
        if index.isValid() and index.column() == self.KEEP_COL and role == Qt.CheckStateRole:
            name = self.modules[index.row()].name
            checked = value in (Qt.Checked, Qt.Checked.value, 2, True)
            if checked:
                self.keep_float.add(name)
            else:
                self.keep_float.discard(name)
            self.dataChanged.emit(index, index, [Qt.CheckStateRole])
            self.sigKeepFloatChanged.emit()
            return True
        return False

    def set_keep(self, name: str, keep: bool) -> None:
        """Check or uncheck a module by name (view-to-model path used by tests and shortcuts)."""
        for row, mod in enumerate(self.modules):
            if mod.name == name:
                self.setData(self.index(row, self.KEEP_COL), Qt.Checked if keep else Qt.Unchecked, Qt.CheckStateRole)
                return
        raise KeyError(name)


def _short_unit(name: str, unit: str) -> str:
    """A tick label for a unit: a layer without "encoder.", a module by its last part."""
    if unit == "module":
        return name.rsplit(".", 1)[-1]
    return name[len("encoder."):] if name.startswith("encoder.") else name


class QtClickableLabel(QLabel):
    """A label that says when it is clicked (the banner's text is its own button)."""

    sigClicked = Signal()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.LeftButton:
            self.sigClicked.emit()
        super().mouseReleaseEvent(event)


class QtDivergenceBanner(QFrame):
    """The first thing in the tab: the first unit where the quantized model parts from the float one."""

    sigShow = Signal(str)  # the located unit's name
    sigLocate = Signal(str)  # "layer" or "module"
    sigCancel = Signal()

    _STYLE = (
        "QFrame#divergenceBanner { background: %s; border: 1px solid %s; border-left: 5px solid %s;"
        " border-radius: 3px; }"
    )
    _COLORS = {
        "idle": ("#f4f5f7", "#d0d4da", "#9aa1ab"),
        "found": ("#fff4e5", "#f0c36d", "#d9480f"),
        "error": ("#fdecea", "#f5b7b1", "#b00020"),
    }

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("divergenceBanner")
        self.result = None
        self.located: str | None = None
        self.busy = False
        self.text_label = QtClickableLabel("First divergence: evaluate to locate it")
        self.text_label.setObjectName("divergenceText")
        self.text_label.setWordWrap(True)
        self.text_label.setStyleSheet("font-size: 13px; font-weight: 600; background: transparent; border: none;")
        self.show_button = QPushButton("Show")
        self.show_button.setObjectName("divergenceShowButton")
        self.show_button.setToolTip("Select this unit in the table and show its patch heatmap")
        self.show_button.setEnabled(False)
        self.unit_combo = QComboBox()
        self.unit_combo.setObjectName("divergenceUnit")
        self.unit_combo.addItem("per layer", "layer")
        self.unit_combo.addItem("per module", "module")
        self.unit_combo.setToolTip("Compare whole encoder layers, or every module")
        self.locate_button = QPushButton("Locate divergence")
        self.locate_button.setObjectName("locateDivergenceButton")
        self.locate_button.setToolTip(
            "Feed each unit the float model's input and measure the error it adds on its own (local SQNR)"
        )
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 5, 6, 5)
        layout.addWidget(self.text_label, 1)
        layout.addWidget(self.show_button)
        layout.addWidget(self.unit_combo)
        layout.addWidget(self.locate_button)
        self._set_look("idle")
        self.text_label.sigClicked.connect(self._on_clicked)
        self.show_button.clicked.connect(self._on_clicked)
        self.locate_button.clicked.connect(self._on_locate_button)

    def unit(self) -> str:
        """The unit the next locate uses: "layer" or "module"."""
        return str(self.unit_combo.currentData())

    def _set_look(self, state: str) -> None:
        self.setStyleSheet(self._STYLE % self._COLORS[state])
        self.text_label.setCursor(Qt.PointingHandCursor if state == "found" else Qt.ArrowCursor)

    def set_result(self, result) -> None:
        """Show a core DivergenceResult's summary line."""
        self.result = result
        self.located = result.located.name if result.located is not None else None
        text = result.summary_line()
        self.text_label.setText(text)
        self.text_label.setToolTip(text + ("\nClick to select it in the table and show its heatmap." if self.located else ""))
        self.show_button.setEnabled(self.located is not None)
        self._set_look("found" if self.located else "idle")

    def set_busy(self, unit: str) -> None:
        """Say that the locator runs; its button cancels it meanwhile."""
        self.busy = True
        self.locate_button.setText("Cancel")
        self.show_button.setEnabled(False)
        self.text_label.setText(f"First divergence: locating (per {unit})…")
        self._set_look("idle")

    def set_progress(self, done: int, total: int, message: str = "") -> None:
        """The locator's progress, in the banner's own words."""
        if self.busy:
            count = f" {done}/{total}" if total else ""
            self.text_label.setText(f"First divergence: locating{count}… {message}".rstrip())

    def set_done(self) -> None:
        """The locator finished (well or not)."""
        self.busy = False
        self.locate_button.setText("Locate divergence")

    def set_waiting(self, text: str) -> None:
        """Say what the banner waits for (an evaluation runs; the locator follows it)."""
        self.result = None
        self.located = None
        self.text_label.setText(f"First divergence: {text}")
        self.text_label.setToolTip("")
        self.show_button.setEnabled(False)
        self._set_look("idle")

    def set_error(self, text: str) -> None:
        """Say why the locator failed."""
        self.result = None
        self.located = None
        self.text_label.setText(f"First divergence: {text}")
        self.show_button.setEnabled(False)
        self._set_look("error")

    def clear(self) -> None:
        """Back to "not located"."""
        self.result = None
        self.located = None
        self.text_label.setText("First divergence: evaluate to locate it")
        self.text_label.setToolTip("")
        self.show_button.setEnabled(False)
        self.set_done()
        self._set_look("idle")

    def _on_locate_button(self) -> None:
        if self.busy:
            self.sigCancel.emit()
        else:
            self.sigLocate.emit(self.unit())

    def _on_clicked(self) -> None:
        if self.located:
            self.sigShow.emit(self.located)


class QtDivergenceChart(pg.PlotWidget):
    """Input, output and local SQNR of every unit; the located unit marked."""

    LEGEND_HTML = (
        "Per unit SQNR: <span style='color:#808080'>- - input</span> · "
        "<span style='color:#1f77b4'>● output</span> · "
        "<span style='color:#e6550d'>■ local (the unit alone on float input)</span> · "
        "<span style='color:#d9480f'>| first divergence</span>"
    )

    sigUnitClicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("divergencePlot")
        self.setBackground("w")
        self.showGrid(x=False, y=True, alpha=0.25)
        self.setLabel("left", "SQNR dB")
        self.entries: list = []
        # The legend lives in the title above (LEGEND_HTML): inside the plot it hides the curves.
        self.input_curve = self.plot([], [], pen=pg.mkPen("#9e9e9e", width=1.5, style=Qt.DashLine))
        self.output_curve = self.plot(
            [], [], pen=pg.mkPen("#1f77b4", width=1.5), symbol="o", symbolSize=6, symbolBrush="#1f77b4", symbolPen=None
        )
        self.local_curve = self.plot(
            [], [], pen=pg.mkPen("#e6550d", width=1.5), symbol="s", symbolSize=6, symbolBrush="#e6550d", symbolPen=None
        )
        self.marker = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#d9480f", width=2))
        self.marker.setVisible(False)
        self.addItem(self.marker)
        self.scene().sigMouseClicked.connect(self._on_clicked)

    def set_result(self, result) -> None:
        """Draw a DivergenceResult (None clears)."""
        self.entries = list(result.entries) if result is not None else []
        n = len(self.entries)
        x = np.arange(n, dtype=float)

        def col(attr: str) -> np.ndarray:
            return np.array([float(getattr(e, attr)) for e in self.entries], dtype=float)

        # Infinite SQNR (an exact unit) cannot be drawn; leave a gap instead.
        def finite(v: np.ndarray) -> np.ndarray:
            return np.where(np.isfinite(v), v, np.nan)

        if n:
            self.input_curve.setData(x, finite(col("input_sqnr_db")), connect="finite")
            self.output_curve.setData(x, finite(col("output_sqnr_db")), connect="finite")
            self.local_curve.setData(x, finite(col("local_sqnr_db")), connect="finite")
        else:
            for curve in (self.input_curve, self.output_curve, self.local_curve):
                curve.setData([], [])
        unit = getattr(result, "unit", "layer")
        step = max(1, int(np.ceil(n / (10 if unit == "layer" else 8))))
        located = getattr(result, "located", None) if result is not None else None
        names = [e.name for e in self.entries]
        marked = names.index(located.name) if located is not None and located.name in names else None
        # The marked unit always gets its label (the one the banner names); regular labels too close
        # to it would print over it, so they give way.
        ticks = [i for i in range(n) if i % step == 0 and (marked is None or abs(i - marked) >= step)]
        if marked is not None:
            ticks = sorted(ticks + [marked])
        self.getAxis("bottom").setTicks([[(i, _short_unit(names[i], unit)) for i in ticks]])
        if marked is not None:
            self.marker.setValue(marked)
        self.marker.setVisible(marked is not None)
        self.setLabel("bottom", f"{unit} (forward order; click to select)" if result is not None else "unit")
        self.enableAutoRange()
        if n:
            # Half a unit of room each side, so the first and last tick labels are not cut.
            self.setXRange(-0.5, n - 0.5, padding=0)

    def _on_clicked(self, event) -> None:
        if not self.entries:
            return
        vb = self.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        x = int(np.clip(round(vb.mapSceneToView(event.scenePos()).x()), 0, len(self.entries) - 1))
        self.sigUnitClicked.emit(self.entries[x].name)


class QtErrorsTab(QWidget):
    """Find the module that hurts, look at its values, keep it in float, check again."""

    sigEvaluated = Signal(object)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self.result = None
        self.previous_end_to_end = None
        self._eval_task = None
        self._sens_task = None
        self._image_task = None
        self._prepared: dict[int, tuple[list, list]] = {}  # id(result) -> table texts made by the worker
        self.per_image: dict[str, object] = {}  # image id -> CompareResult on that image alone
        self.divergence = None  # core DivergenceResult of the last locate
        self._div_task = None
        # image id -> (ImageErrorMaps, {module: Heatmap}), computed by the worker once per evaluation
        self.maps_cache: dict[str, tuple[object, dict[str, object]]] = {}
        self._maps_tasks: dict[str, object] = {}
        self._generation = 0  # bumped by every evaluation and clear: late results of older ones are dropped
        self._wanted_module: str | None = None  # shown in the heatmap once its image's maps arrive

        self.model = ModuleErrorModel(self)
        self.model.sigKeepFloatChanged.connect(self._on_keep_changed)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.proxy.setFilterKeyColumn(1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)

        # toolbar
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.setObjectName("evaluateButton")
        self.evaluate_button.setToolTip("Compare float and quantized outputs of every module on the calibration images")
        self.sensitivity_button = QPushButton("Sensitivity…")
        self.sensitivity_button.setObjectName("sensitivityButton")
        self.sensitivity_button.setToolTip("Keep each layer in float in turn and measure the end-to-end gain")
        self.to_settings_button = QPushButton("Use checked for export")
        self.to_settings_button.setObjectName("keepFloatToSettingsButton")
        self.to_settings_button.setToolTip(
            "Copy the modules checked 'Keep float' into the settings' keep-float list "
            "(Apply there re-prepares the model; calibrate again before exporting)"
        )
        self.to_settings_button.setEnabled(False)
        self.end_to_end_label = QLabel("End-to-end: not evaluated")
        self.end_to_end_label.setObjectName("endToEndLabel")
        self.end_to_end_label.setStyleSheet("font-weight: 600;")
        self.end_to_end_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.progress = QtTaskProgress(cancel_name="errorsCancelButton")
        self.progress.setMinimumWidth(300)
        self.progress.setMaximumWidth(420)
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter modules")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)

        # table
        self.table = QTableView()
        self.table.setObjectName("errorsTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(3, Qt.AscendingOrder)  # worst SQNR on top
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self._apply_widths()
        self.table.selectionModel().currentRowChanged.connect(self._on_current_row)
        # Show the keep-float check beside the name, where the eye already is (visual order only).
        self.table.horizontalHeader().moveSection(ModuleErrorModel.KEEP_COL, 2)

        # depth chart, built once
        self.metric_combo = QComboBox()
        self.metric_combo.addItems(["SQNR (dB)", "PEIR"])
        self.metric_combo.currentIndexChanged.connect(lambda _i: self._update_chart())
        self.depth_plot = pg.PlotWidget()
        self.depth_plot.setObjectName("errorsPlot")
        self.depth_plot.setBackground("w")
        self.depth_plot.showGrid(x=True, y=True, alpha=0.25)
        self.depth_plot.setLabel("bottom", "module (forward order = depth)")
        self._depth_curve = self.depth_plot.plot([], [], pen=pg.mkPen("#1f77b4", width=1.5), symbol="o", symbolSize=5, symbolBrush="#1f77b4", symbolPen=None)
        self._worst_points = pg.ScatterPlotItem(size=10, pen=pg.mkPen("#b71c1c"), brush=pg.mkBrush(229, 57, 53, 200))
        self.depth_plot.addItem(self._worst_points)
        self._depth_cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#444", style=Qt.DashLine))
        self._depth_cursor.setVisible(False)
        self.depth_plot.addItem(self._depth_cursor)
        self.depth_plot.scene().sigMouseClicked.connect(self._on_depth_clicked)

        # scatter, built once and setData'd
        self.image_combo = QComboBox()
        self.image_combo.addItem("All images")
        self.image_combo.setToolTip("Scatter of all evaluated images, or of one image (evaluated on demand)")
        self.image_combo.currentIndexChanged.connect(self._on_image_choice)
        self.scatter_widget = pg.PlotWidget()
        self.scatter_widget.setObjectName("scatterPlot")
        self.scatter_widget.setBackground("w")
        self.scatter_widget.showGrid(x=True, y=True, alpha=0.25)
        self.scatter_widget.setLabel("bottom", "float value")
        self.scatter_widget.setLabel("left", "quantized value")
        self.scatter = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(31, 119, 180, 90))
        self.scatter_widget.addItem(self.scatter)
        self._identity = self.scatter_widget.plot([], [], pen=pg.mkPen("#d62728", width=1.2, style=Qt.DashLine))
        self.scatter_title = QLabel("Select a module")
        self.scatter_title.setStyleSheet("font-weight: 600;")
        self.scatter_title.setWordWrap(True)

        # first divergence and its per-unit chart
        self.banner = QtDivergenceBanner()
        self.banner.sigShow.connect(self.show_unit)
        self.banner.sigLocate.connect(self.locate_divergence)
        self.banner.sigCancel.connect(self.cancel_diagnostics)
        self.divergence_plot = QtDivergenceChart()
        self.divergence_plot.sigUnitClicked.connect(self.show_unit)

        # patch heatmap
        self.heatmap = QtPatchHeatmap()
        self.heatmap.sigImageChosen.connect(self._on_heatmap_image)

        # sensitivity results
        self.sensitivity_table = QTableWidget(0, 4)
        self.sensitivity_table.setObjectName("sensitivityTable")
        self.sensitivity_table.setHorizontalHeaderLabels(["Kept in float", "End-to-end SQNR dB", "PEIR", "Gain dB"])
        self.sensitivity_table.verticalHeader().setVisible(False)
        self.sensitivity_table.horizontalHeader().setStretchLastSection(True)
        self.sensitivity_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.sensitivity_table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.sensitivity_table.itemSelectionChanged.connect(self._on_sensitivity_selected)
        self.sensitivity_table.setVisible(False)  # the heatmap gets the height until a sweep has run

        self.message = QtMessageLine()
        self.message.show_message("Calibrate, then Evaluate to compare float and quantized outputs.")

        # layout
        bar = QHBoxLayout()
        bar.addWidget(self.evaluate_button)
        bar.addWidget(self.end_to_end_label, 1)
        bar.addWidget(self.to_settings_button)
        bar.addWidget(self.sensitivity_button)
        bar.addWidget(self.progress)

        depth_box = QWidget()
        cl = QVBoxLayout(depth_box)
        cl.setContentsMargins(0, 0, 0, 0)
        chart_row = QHBoxLayout()
        chart_row.addWidget(QLabel("Error along depth — worst modules in red"))
        chart_row.addStretch(1)
        chart_row.addWidget(self.metric_combo)
        cl.addLayout(chart_row)
        cl.addWidget(self.depth_plot, 1)

        divergence_box = QWidget()
        dl = QVBoxLayout(divergence_box)
        dl.setContentsMargins(0, 0, 0, 0)
        div_title = QLabel(QtDivergenceChart.LEGEND_HTML)
        div_title.setToolTip(
            "input/output: SQNR where the unit reads and writes in the fully quantized run (error inherited and passed on); "
            "local: the unit quantized alone on the float model's input (the error it adds itself)"
        )
        div_title.setMinimumHeight(self.metric_combo.sizeHint().height())
        # Long one-line texts wrap instead of setting the window's minimum width (1280 px screens).
        for label in (div_title, self.end_to_end_label):
            label.setWordWrap(True)
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        dl.addWidget(div_title)
        dl.addWidget(self.divergence_plot, 1)

        chart_box = QSplitter(Qt.Horizontal)
        chart_box.addWidget(depth_box)
        chart_box.addWidget(divergence_box)
        chart_box.setSizes([640, 480])

        table_box = QWidget()
        tl = QVBoxLayout(table_box)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addWidget(self.filter_edit)
        tl.addWidget(self.table, 1)

        scatter_box = QWidget()
        sl = QVBoxLayout(scatter_box)
        sl.setContentsMargins(0, 0, 0, 0)
        srow = QHBoxLayout()
        srow.addWidget(self.scatter_title, 1)
        srow.addWidget(self.image_combo)
        sl.addLayout(srow)
        sl.addWidget(self.scatter_widget, 1)

        self.detail_tabs = QTabWidget()
        self.detail_tabs.setObjectName("errorsDetailTabs")
        self.detail_tabs.setDocumentMode(True)
        self.detail_tabs.addTab(self.heatmap, "Patch heatmap")
        self.detail_tabs.addTab(scatter_box, "Scatter")

        right = QSplitter(Qt.Vertical)
        right.addWidget(self.detail_tabs)
        right.addWidget(self.sensitivity_table)
        right.setSizes([420, 140])
        self._detail_splitter = right

        lower = QSplitter(Qt.Horizontal)
        lower.addWidget(table_box)
        lower.addWidget(right)
        lower.setSizes([680, 440])

        self.splitter = QSplitter(Qt.Vertical)
        self.splitter.addWidget(chart_box)
        self.splitter.addWidget(lower)
        self.splitter.setSizes([200, 500])

        layout = QVBoxLayout(self)
        layout.addWidget(self.banner)
        layout.addLayout(bar)
        layout.addWidget(self.splitter, 1)
        layout.addWidget(self.message)

        self.evaluate_button.clicked.connect(self.evaluate)
        self.sensitivity_button.clicked.connect(self.run_sensitivity)
        self.to_settings_button.clicked.connect(self.copy_keep_float_to_settings)
        self.progress.cancel_button.clicked.connect(self.cancel)

    def _apply_widths(self) -> None:
        char = self.table.fontMetrics().horizontalAdvance("0")
        for col, chars in enumerate(ModuleErrorModel.WIDTHS):
            self.table.setColumnWidth(col, chars * char + 12)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> None:
        """Run Session.evaluate with the checked keep-float modules, in the worker."""
        session = self._host.session
        if session is None or self._eval_task is not None:
            return
        keep = sorted(self.model.keep_float)
        if self.result is not None:
            self.previous_end_to_end = self.result.end_to_end
        self.evaluate_button.setEnabled(False)
        # The core reports evaluated images (one float and one quantized pass each), not modules.
        self.progress.begin(0, "images", "evaluating…")
        self.banner.set_waiting("waits for the evaluation, then locates itself…")
        self.message.show_message(
            "Evaluating" + (f" with {len(keep)} module(s) kept in float" if keep else "") + "…"
        )

        def work(progress, cancel):
            result = session.evaluate(progress=progress, cancel=cancel, keep_float=keep or None)
            self._prepared[id(result)] = ModuleErrorModel.prepare(result.modules)
            return result

        self._eval_task = self._host.submit(
            "evaluate", work, on_done=self._on_evaluated, on_error=self._on_eval_error, on_progress=self.progress.update_progress
        )

    def cancel(self) -> None:
        """Cancel the running evaluation or sensitivity sweep."""
        for task in (self._eval_task, self._sens_task):
            if task is not None:
                task.token.cancel()
        self.cancel_diagnostics()

    def cancel_diagnostics(self) -> None:
        """Cancel the divergence locator and the heatmaps being computed."""
        for task in [self._div_task, *self._maps_tasks.values()]:
            if task is not None:
                task.token.cancel()

    def _on_evaluated(self, result) -> None:
        self._eval_task = None
        self.evaluate_button.setEnabled(True)
        self.evaluate_button.setText("Re-evaluate")
        self.progress.end(f"evaluated on {plural(len(getattr(result, 'images', []) or []), 'image')}")
        self.set_result(result)
        # Queued before the signal, so whoever waits for the runner to go idle sees them too.
        self._start_diagnostics()
        self.sigEvaluated.emit(result)

    def _on_eval_error(self, exc: BaseException) -> None:
        self._eval_task = None
        self.evaluate_button.setEnabled(True)
        self.progress.end("failed")
        self.banner.clear()  # nothing is being located any more: "evaluate to locate it" is true again
        self.message.show_message(error_text(exc), "error")

    def clear(self) -> None:
        """Forget results (after the settings change)."""
        self.result = None
        self.previous_end_to_end = None
        self._generation += 1
        self.cancel_diagnostics()
        self._div_task = None
        self._maps_tasks = {}
        self.maps_cache = {}
        self._wanted_module = None
        self.divergence = None
        self.banner.clear()
        self.divergence_plot.set_result(None)
        self.heatmap.clear()
        self.model.set_modules([], ())
        self.to_settings_button.setEnabled(False)
        self.evaluate_button.setText("Evaluate")
        self.end_to_end_label.setText("End-to-end: not evaluated")
        self._update_chart()
        self.scatter.setData([], [])
        self._identity.setData([], [])
        self.message.show_message("Calibrate, then Evaluate to compare float and quantized outputs.")

    def set_result(self, result) -> None:
        """Show a CompareResult: table, chart, end-to-end line, image choices."""
        selected = self.selected_module()
        self.result = result
        self.per_image = {}
        keep = getattr(result, "keep_float", None) or self.model.keep_float
        self.model.set_modules(result.modules, keep, self._prepared.pop(id(result), None))
        self._prepared.clear()
        self.to_settings_button.setEnabled(bool(self.model.keep_float))
        self._apply_widths()
        self._update_chart()
        e2e = result.end_to_end
        text = f"End-to-end: SQNR {e2e.sqnr_db:.2f} dB · PEIR {fmt_float(e2e.peir)} (good: tens of dB on a trained model)"
        if self.previous_end_to_end is not None:
            old = self.previous_end_to_end
            delta = e2e.sqnr_db - old.sqnr_db
            text = (
                f"End-to-end SQNR: before {old.sqnr_db:.2f} dB → now {e2e.sqnr_db:.2f} dB ({delta:+.2f} dB) · "
                f"PEIR {fmt_float(old.peir)} → {fmt_float(e2e.peir)}"
            )
        self.end_to_end_label.setText(text)
        # A number needs a yardstick: say what good looks like, and that random weights are no test of it.
        self.end_to_end_label.setToolTip(
            "SQNR: signal-to-quantization-noise ratio of the final output, higher is better. "
            "uint8 activations on a trained model typically give tens of dB (20–40 dB); under ~10 dB the "
            "quantized output is mostly noise. The built-in models have random (seeded) weights, which "
            "amplify noise far more than trained ones: judge the quantizer on a real checkpoint."
        )
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItem("All images")
        for image_id in getattr(result, "images", []) or []:
            self.image_combo.addItem(str(image_id))
        self.image_combo.blockSignals(False)
        worst = sorted(result.modules, key=lambda m: m.sqnr_db)[:3]
        kept = list(getattr(result, "keep_float", []) or [])
        self.message.show_message(
            "Worst: " + ", ".join(f"{m.name} ({m.sqnr_db:.1f} dB)" for m in worst)
            + (f" · kept in float: {', '.join(kept)}" if kept else ""),
            "info",
        )
        names = [m.name for m in result.modules]
        self.select_module(selected if selected in names else (worst[0].name if worst else None))

    def copy_keep_float_to_settings(self) -> None:
        """Append the checked module names to the model panel's keep-float globs."""
        edit = self._host.model_panel.keep_float_edit
        current = self._host.model_panel.keep_float_globs()
        added = [name for name in sorted(self.model.keep_float) if name not in current]
        if added:
            edit.setPlainText("\n".join(current + added))
        self.message.show_message(
            f"Added {len(added)} module(s) to the keep-float settings; press Apply settings and calibrate again to export with them."
        )

    def _on_keep_changed(self) -> None:
        n = len(self.model.keep_float)
        self.to_settings_button.setEnabled(n > 0)
        self.evaluate_button.setText("Re-evaluate")
        self.message.show_message(
            f"{n} module(s) marked to keep in float — press Re-evaluate to see the end-to-end effect."
        )

    # -- chart and scatter --------------------------------------------------------------
    def _metric(self) -> tuple[str, np.ndarray]:
        mods = self.model.modules
        if self.metric_combo.currentIndex() == 1:
            return "PEIR", np.array([float(m.peir) for m in mods], dtype=float)
        return "SQNR dB", np.array([float(m.sqnr_db) for m in mods], dtype=float)

    def _update_chart(self) -> None:
        label, values = self._metric()
        n = len(values)
        x = np.arange(n, dtype=float)
        self._depth_curve.setData(x, values)
        self.depth_plot.setLabel("left", label)
        if n:
            sqnr = np.array([float(m.sqnr_db) for m in self.model.modules])
            worst = np.argsort(sqnr)[: min(WORST_N, n)]
            self._worst_points.setData(x[worst], values[worst])
        else:
            self._worst_points.setData([], [])
        self.depth_plot.enableAutoRange()

    def _on_depth_clicked(self, event) -> None:
        mods = self.model.modules
        if not mods:
            return
        vb = self.depth_plot.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        x = int(np.clip(round(vb.mapSceneToView(event.scenePos()).x()), 0, len(mods) - 1))
        self.select_module(mods[x].name)

    def selected_module(self) -> str | None:
        """Name of the module whose scatter is shown."""
        index = self.table.selectionModel().currentIndex()
        if not index.isValid():
            return None
        row = self.proxy.mapToSource(index).row()
        return self.model.modules[row].name if 0 <= row < len(self.model.modules) else None

    def select_module(self, name: str | None) -> None:
        """Select a module by name in the table (the scatter follows)."""
        if name is None:
            return
        for row, mod in enumerate(self.model.modules):
            if mod.name == name:
                proxy_index = self.proxy.mapFromSource(self.model.index(row, 0))
                if proxy_index.isValid():
                    self.table.selectionModel().setCurrentIndex(
                        proxy_index, QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows
                    )
                    self.table.scrollTo(proxy_index)
                self._update_scatter()
                self._follow_in_heatmap(name)
                return

    def _on_current_row(self, current, _previous) -> None:
        if current.isValid():
            self._update_scatter()
            self._follow_in_heatmap(self.selected_module())

    def _update_scatter(self) -> None:
        name = self.selected_module()
        mod = next((m for m in self.model.modules if m.name == name), None)
        if mod is None:
            self.scatter.setData([], [])
            self._identity.setData([], [])
            return
        row = self.model.modules.index(mod)
        self._depth_cursor.setValue(row)
        self._depth_cursor.setVisible(True)
        choice = self.image_combo.currentIndex() - 1
        source = mod
        if choice >= 0:
            single = self.per_image.get(self.image_combo.currentText())
            match = [m for m in getattr(single, "modules", []) if m.name == mod.name]
            if not match:
                self.scatter.setData([], [])
                self._identity.setData([], [])
                self.scatter_title.setText(f"{mod.name}: evaluating {self.image_combo.currentText()}…")
                return
            source = match[0]
        fp = np.asarray(source.samples_fp, dtype=np.float32).reshape(-1)
        q = np.asarray(source.samples_q, dtype=np.float32).reshape(-1)
        n = min(fp.size, q.size)
        fp, q = fp[:n], q[:n]
        if n > MAX_SCATTER_POINTS:
            # A fixed stride keeps the plot responsive and the picture the same each time.
            step = int(np.ceil(n / MAX_SCATTER_POINTS))
            fp, q = fp[::step], q[::step]
        self.scatter.setData(fp, q)
        if fp.size:
            lo = float(min(fp.min(), q.min()))
            hi = float(max(fp.max(), q.max()))
            self._identity.setData([lo, hi], [lo, hi])
        else:
            self._identity.setData([], [])
        self.scatter_widget.enableAutoRange()
        kept = " · kept in float" if mod.name in self.model.keep_float else ""
        per_image = "" if choice < 0 else f" · on {self.image_combo.currentText()} only"
        self.scatter_title.setText(
            f"{mod.name}: SQNR {float(source.sqnr_db):.2f} dB · max |err| {fmt_float(source.max_abs)}{kept}{per_image}"
        )

    def _on_image_choice(self, index: int) -> None:
        image_id = self.image_combo.currentText()
        session = self._host.session
        if index <= 0 or image_id in self.per_image or session is None or self.result is None:
            self._update_scatter()
            return
        path = self._host.calibration_tab.path_for(image_id)
        if path is None:
            self.message.show_message(f"{image_id} is no longer in the image set.", "error")
            return
        keep = list(getattr(self.result, "keep_float", []) or [])
        self._update_scatter()

        def work(progress, cancel):
            return session.evaluate(images=[path], progress=progress, cancel=cancel, keep_float=keep or None)

        def done(single):
            self._image_task = None
            self.per_image[image_id] = single
            self._update_scatter()

        def failed(exc):
            self._image_task = None
            self.message.show_message(error_text(exc), "error")

        self._image_task = self._host.submit("evaluate image", work, on_done=done, on_error=failed)

    # -- first divergence and patch heatmap ------------------------------------------------
    def _start_diagnostics(self) -> None:
        """After an evaluation: locate the first divergence and map the chosen image's errors."""
        self._generation += 1
        self.cancel_diagnostics()
        self._div_task = None
        self._maps_tasks = {}
        self.maps_cache = {}
        image_ids = [str(i) for i in getattr(self.result, "images", []) or []]
        self.heatmap.set_images(image_ids, self.heatmap.current_image())
        self.locate_divergence(self.banner.unit())
        self.request_maps(self.heatmap.current_image())

    def locate_divergence(self, unit: str = "layer") -> None:
        """Run core.analysis.divergence.locate_divergence on the evaluated images, in the worker."""
        session = self._host.session
        if session is None or self.result is None:
            self.banner.set_error("evaluate first, then locate")
            return
        if self._div_task is not None:
            self._div_task.token.cancel()
        unit = unit if unit in ("layer", "module") else "layer"
        index = self.banner.unit_combo.findData(unit)
        if index >= 0 and index != self.banner.unit_combo.currentIndex():
            self.banner.unit_combo.setCurrentIndex(index)
        generation = self._generation
        self.banner.set_busy(unit)
        # The what-if of the last evaluation (modules ticked to stay float) applies here too.
        keep = list(getattr(self.result, "keep_float", None) or [])

        def work(progress, cancel):
            from core.analysis.divergence import locate_divergence  # noqa: PLC0415 - torch stays off the UI start

            return locate_divergence(session, unit=unit, progress=progress, cancel=cancel, keep_float=keep or None)

        def current(task) -> bool:
            return generation == self._generation and task is self._div_task

        def done(result) -> None:
            if not current(task):
                return
            self._div_task = None
            self.banner.set_done()
            self.divergence = result
            self.banner.set_result(result)
            self.divergence_plot.set_result(result)

        def failed(exc: BaseException) -> None:
            if not current(task):
                return
            self._div_task = None
            self.banner.set_done()
            from core.errors import CancelledError  # noqa: PLC0415

            if isinstance(exc, CancelledError):
                self.banner.set_error("locating was cancelled — press Locate divergence to run it again")
            else:
                self.banner.set_error(error_text(exc))
                self.message.show_message(error_text(exc), "error")

        task = self._host.submit(
            "locating divergence", work, on_done=done, on_error=failed, on_progress=self.banner.set_progress
        )
        self._div_task = task

    def show_unit(self, name: str) -> None:
        """Select a unit in the table and show its patch heatmap (the banner's click)."""
        self.detail_tabs.setCurrentWidget(self.heatmap)
        if self.heatmap.heatmaps:
            if not self.heatmap.show_module(name):
                self.message.show_message(
                    f"{name} has no per-patch map (its rows are neither patches nor soft tokens); "
                    f"the heatmap shows {self.heatmap.module_combo.currentText()}."
                )
        else:
            self._wanted_module = name  # applied when the maps arrive
        self.select_module(name)

    def _follow_in_heatmap(self, name: str | None) -> None:
        """The heatmap follows the table's module when that module has a map."""
        if name is not None and self.heatmap.has_heatmap(name):
            self.heatmap.show_module(name)

    def _on_heatmap_image(self, image_id: str) -> None:
        self.request_maps(image_id)

    def request_maps(self, image_id: str | None) -> None:
        """Show an image's error maps: from the cache, or computed once in the worker."""
        if image_id is None:
            return
        if image_id in self.maps_cache:
            self._show_maps(image_id)
            return
        self.heatmap.show_pending(image_id)
        if image_id in self._maps_tasks:
            return
        session = self._host.session
        path = self._host.calibration_tab.path_for(image_id)
        if session is None or path is None:
            self.heatmap.title.setText(f"{image_id} is no longer in the image set.")
            return
        generation = self._generation

        def work(progress, cancel):
            from core.analysis.heatmaps import image_error_maps  # noqa: PLC0415

            maps = image_error_maps(session, path, progress=progress, cancel=cancel)
            # Every module's grid is made here too, so switching modules never computes on the UI thread.
            return maps, {name: maps.heatmap(name) for name in maps.modules()}

        def done(payload) -> None:
            if generation != self._generation:
                return
            self._maps_tasks.pop(image_id, None)
            self.maps_cache[image_id] = payload
            if self.heatmap.current_image() == image_id:
                self._show_maps(image_id)

        def failed(exc: BaseException) -> None:
            if generation != self._generation:
                return
            self._maps_tasks.pop(image_id, None)
            self.heatmap.title.setText(f"No heatmap for {image_id}: {error_text(exc)}")

        self._maps_tasks[image_id] = self._host.submit("patch errors", work, on_done=done, on_error=failed)

    def _show_maps(self, image_id: str) -> None:
        _maps, heatmaps = self.maps_cache[image_id]
        wanted, self._wanted_module = self._wanted_module, None
        module = wanted if wanted in heatmaps else None
        self.heatmap.set_heatmaps(image_id, heatmaps, module)

    # -- sensitivity --------------------------------------------------------------------
    def run_sensitivity(self) -> None:
        """Run the keep-one-in-float sweep in the worker, with progress."""
        session = self._host.session
        if session is None or self._sens_task is not None:
            return
        self.sensitivity_button.setEnabled(False)
        self.progress.begin(0, "layers", "sensitivity sweep…")
        self.message.show_message("Running the sensitivity sweep: one layer in float at a time…")

        def work(progress, cancel):
            return session.sensitivity(unit="layer", progress=progress, cancel=cancel)

        self._sens_task = self._host.submit(
            "sensitivity", work, on_done=self._on_sensitivity, on_error=self._on_sensitivity_error, on_progress=self.progress.update_progress
        )

    def _on_sensitivity(self, entries: list) -> None:
        self._sens_task = None
        self.sensitivity_button.setEnabled(True)
        self.progress.end(f"sensitivity: {len(entries)} entries")
        self.sensitivity_table.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            cells = [entry.name, f"{float(entry.sqnr_db):.2f}", fmt_float(entry.peir), f"{float(entry.improvement_db):+.2f}"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.sensitivity_table.setItem(row, col, item)
        self.sensitivity_table.resizeColumnsToContents()
        if not self.sensitivity_table.isVisible():
            self.sensitivity_table.setVisible(True)
            # Header and a few rows: the heatmap or scatter above keeps most of the height.
            total = sum(self._detail_splitter.sizes())
            table = min(130, total // 3)
            self._detail_splitter.setSizes([total - table, table])
        if entries:
            best = entries[0]
            self.message.show_message(
                f"Keeping {best.name} in float gains the most: {float(best.improvement_db):+.2f} dB end to end.", "ok"
            )

    def _on_sensitivity_error(self, exc: BaseException) -> None:
        self._sens_task = None
        self.sensitivity_button.setEnabled(True)
        self.progress.end("failed")
        self.message.show_message(error_text(exc), "error")

    def _on_sensitivity_selected(self) -> None:
        items = self.sensitivity_table.selectedItems()
        if items:
            name = self.sensitivity_table.item(items[0].row(), 0).text()
            if any(m.name == name for m in self.model.modules):
                self.select_module(name)
