"""Ranges tab: observer table, [min, max] chart in forward order, histogram of the selection."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import (
    QAbstractTableModel,
    QItemSelectionModel,
    QModelIndex,
    QRectF,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QBrush, QColor, QPen
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QGraphicsRectItem,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import QtMessageLine, QtTaskProgress, error_text, fmt_float, results_table, scalar
from core.errors import PTQStudioError
from core.quant.dtypes import get_dtype

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

SORT_ROLE = Qt.UserRole + 10
OUTLIER_BG = QColor(255, 193, 7, 70)
DISABLED_FG = QColor("#888888")
MAX_COLOR = "#d62728"
MIN_COLOR = "#1f77b4"

def grid_limits(record) -> tuple[float, float] | None:
    """Real values of the lowest and highest grid points, (qmin - zp)·s and (qmax - zp)·s."""
    if record.scale is None or record.zero_point is None:
        return None
    try:
        qdtype = get_dtype(str(record.dtype))
    except PTQStudioError:
        return None
    qmin, qmax = qdtype.qmin, qdtype.qmax
    scale = np.asarray(record.scale, dtype=np.float64).reshape(-1)
    zp = np.asarray(record.zero_point, dtype=np.float64).reshape(-1)
    lows = (qmin - zp) * scale
    highs = (qmax - zp) * scale
    return float(lows.min()), float(highs.max())


class ObserverTableModel(QAbstractTableModel):
    """Rows are ObserverRecords in forward order; the proxy sorts and filters."""

    COLUMNS = [
        ("#", "index"),
        ("Observer", "name"),
        ("Module", "module"),
        ("Kind", "kind"),
        ("dtype", "dtype"),
        ("Scheme", "scheme"),
        ("Min", "min"),
        ("Max", "max"),
        ("Scale", "scale"),
        ("Zero point", "zero_point"),
        ("Outlier ratio", "outlier_ratio"),
        ("Min set by", "min_source"),
        ("Max set by", "max_source"),
    ]

    # Column widths in characters; set once, because measuring hundreds of rows stalls the UI.
    # The observer name is elided (its tooltip has it whole) so Min and Max, beside it, fit at 1280 px.
    WIDTHS = (5, 26, 24, 15, 7, 9, 10, 10, 11, 10, 11, 24, 24)
    NUMERIC = frozenset({"index", "min", "max", "scale", "zero_point", "outlier_ratio"})

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.records: list = []
        self._display: list[list[str]] = []
        self._sort: list[list] = []
        self._outlier_brush = QBrush(OUTLIER_BG)
        self._disabled_brush = QBrush(DISABLED_FG)

    @classmethod
    def prepare(cls, records: list) -> tuple[list, list]:
        """Cell texts and sort keys; plain Python, so the worker thread can compute them."""
        display = [[cls._text(row, rec, attr) for _title, attr in cls.COLUMNS] for row, rec in enumerate(records)]
        keys = [[cls._key(row, rec, attr) for _title, attr in cls.COLUMNS] for row, rec in enumerate(records)]
        return display, keys

    def set_records(self, records: list, prepared: tuple[list, list] | None = None) -> None:
        """Replace every row (texts and sort keys computed once, not per paint)."""
        self.beginResetModel()
        self.records = list(records)
        self._display, self._sort = prepared if prepared is not None else self.prepare(self.records)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802 - Qt override
        return 0 if parent.isValid() else len(self.records)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802 - Qt override
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section, orientation, role=Qt.DisplayRole):  # noqa: N802 - Qt override
        if orientation == Qt.Horizontal and role == Qt.DisplayRole:
            return self.COLUMNS[section][0]
        return None

    @staticmethod
    def _text(row: int, rec, attr: str) -> str:
        value = row if attr == "index" else getattr(rec, attr, None)
        if attr in ("min", "max", "scale", "outlier_ratio"):
            return fmt_float(value)
        if attr == "zero_point":
            if value is None:
                return ""
            arr = np.asarray(value)
            return f"{int(arr.min())} … {int(arr.max())}" if arr.size > 1 else str(int(arr.reshape(-1)[0]))
        if attr == "dtype" and not getattr(rec, "enabled", True):
            return "float"
        if attr == "kind" and getattr(rec, "per_channel", False):
            return f"{value} (per-ch)"
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value[:3])) + (" …" if len(value) > 3 else "")
        return "" if value is None else str(value)

    @staticmethod
    def _key(row: int, rec, attr: str):
        value = row if attr == "index" else getattr(rec, attr, None)
        if attr in ("min", "scale", "zero_point"):
            return scalar(value, "min")
        if attr in ("max", "outlier_ratio"):
            return scalar(value, "max")
        if attr == "index":
            return row
        return "" if value is None else str(value)

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        row, col = index.row(), index.column()
        if role == Qt.DisplayRole:
            return self._display[row][col]
        if role == SORT_ROLE:
            return self._sort[row][col]
        rec = self.records[row]
        if role == Qt.BackgroundRole:
            return self._outlier_brush if getattr(rec, "outlier", False) else None
        if role == Qt.ForegroundRole:
            return None if getattr(rec, "enabled", True) else self._disabled_brush
        if role == Qt.ToolTipRole:
            tips = [rec.name]
            if getattr(rec, "outlier", False):
                tips.append(f"outlier: range is {fmt_float(rec.outlier_ratio)}× wider than the bulk of its values")
            if not getattr(rec, "enabled", True):
                tips.append("kept in float")
            return "\n".join(tips)
        if role == Qt.TextAlignmentRole and self.COLUMNS[col][1] in self.NUMERIC:
            return int(Qt.AlignRight | Qt.AlignVCenter)
        return None


class ObserverFilterProxy(QSortFilterProxyModel):
    """Name filter from the search box plus an 'outliers only' switch."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.outliers_only = False

    def set_outliers_only(self, only: bool) -> None:
        """Show only rows whose observer is flagged as an outlier."""
        self.beginFilterChange()
        self.outliers_only = bool(only)
        self.endFilterChange()

    def filterAcceptsRow(self, source_row: int, source_parent) -> bool:  # noqa: N802 - Qt override
        if self.outliers_only:
            records = self.sourceModel().records
            if not getattr(records[source_row], "outlier", False):
                return False
        return super().filterAcceptsRow(source_row, source_parent)


class QtRangesTab(QWidget):
    """Where are the ranges wide, and which image made them so."""

    sigObserverSelected = Signal(int)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self.records: list = []

        self.model = ObserverTableModel(self)
        self.proxy = ObserverFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.proxy.setFilterKeyColumn(1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)

        self.filter_edit = QLineEdit()
        self.filter_edit.setObjectName("rangesFilter")
        self.filter_edit.setPlaceholderText("Filter observers by name (e.g. layers.3 or mlp)")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)
        self.outliers_only = QCheckBox("Outliers only")
        self.outliers_only.toggled.connect(self.proxy.set_outliers_only)
        self.summary = QLabel("")
        self.summary.setStyleSheet("color: palette(dark);")

        self.table = QTableView()
        self.table.setObjectName("rangesTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Interactive)
        header.setStretchLastSection(True)
        self._apply_widths()
        # Min and max beside the name, where the eye already is (visual order only).
        header.moveSection(6, 2)
        header.moveSection(7, 3)
        self.table.selectionModel().currentRowChanged.connect(self._on_current_row)

        # range chart, built once
        self.plot = pg.PlotWidget()
        self.plot.setObjectName("rangesPlot")
        self.plot.setBackground("w")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "observer (forward order)")
        self.plot.setLabel("left", "range")
        self.plot.addLegend(offset=(10, 5))
        self._max_curve = self.plot.plot([], [], pen=pg.mkPen("#d62728", width=1.2), name="max")
        self._min_curve = self.plot.plot([], [], pen=pg.mkPen("#1f77b4", width=1.2), name="min")
        self._fill = pg.FillBetweenItem(self._min_curve, self._max_curve, brush=pg.mkBrush(31, 119, 180, 40))
        self.plot.addItem(self._fill)
        self._outlier_points = pg.ScatterPlotItem(size=7, pen=None, brush=pg.mkBrush(255, 152, 0, 220), name="outlier")
        self.plot.addItem(self._outlier_points)
        self._cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#444", width=1, style=Qt.DashLine))
        self._cursor.setVisible(False)
        self.plot.addItem(self._cursor)
        self.plot.scene().sigMouseClicked.connect(self._on_plot_clicked)

        self.linear_radio = QRadioButton("Linear")
        self.log_radio = QRadioButton("Log |range|")
        self.linear_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.linear_radio)
        group.addButton(self.log_radio)
        self.log_radio.toggled.connect(lambda _checked: self._update_chart())

        # histogram of the selected observer, built once
        self.hist = pg.PlotWidget()
        self.hist.setObjectName("rangesHistogram")
        self.hist.setBackground("w")
        self.hist.showGrid(x=True, y=True, alpha=0.25)
        self.hist.setLabel("left", "count")
        self._hist_curve = self.hist.plot([], [], stepMode="center", fillLevel=0, brush=(31, 119, 180, 120), pen=pg.mkPen("#1f77b4"))
        self._qmin_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#d62728", width=2), label="qmin", labelOpts={"position": 0.9, "color": "#d62728"})
        self._qmax_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#d62728", width=2), label="qmax", labelOpts={"position": 0.9, "color": "#d62728"})
        for line in (self._qmin_line, self._qmax_line):
            line.setVisible(False)
            self.hist.addItem(line)

        self.hist_log = QCheckBox("Log counts")
        self.hist_log.setToolTip("log10(count + 1): shows the sparse tails that set the range")
        self.hist_log.setChecked(True)  # activation histograms are heavy-tailed: the tails set the range
        self.hist_log.toggled.connect(lambda _on: self._show_detail(self._detail_row))
        self._detail_row = -1
        self.detail_title = QLabel("Select an observer")
        self.detail_title.setStyleSheet("font-weight: 600;")
        self.detail_title.setWordWrap(True)
        self.detail_text = QLabel("")
        self.detail_text.setWordWrap(True)
        self.detail_text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.min_caption = QLabel("")
        self.max_caption = QLabel("")
        for lab in (self.min_caption, self.max_caption):
            lab.setWordWrap(True)
            lab.setTextInteractionFlags(Qt.TextSelectableByMouse)
            lab.setStyleSheet("color: palette(dark); font-size: 11px;")
        self._build_source_panel()
        self._build_ranking()
        self.message = QtMessageLine()
        self.message.show_message("Calibrate to see the observers' ranges.")

        # layout
        filter_row = QHBoxLayout()
        filter_row.addWidget(self.filter_edit, 1)
        filter_row.addWidget(self.outliers_only)
        self.summary.setWordWrap(True)
        self.summary.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        table_box = QWidget()
        tl = QVBoxLayout(table_box)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addLayout(filter_row)
        tl.addWidget(self.summary)
        tl.addWidget(self.table, 1)
        self.table_tabs = QTabWidget()
        self.table_tabs.setObjectName("rangesTableTabs")
        self.table_tabs.setDocumentMode(True)
        self.table_tabs.addTab(table_box, "Observers")
        self.table_tabs.addTab(self.ranking_box, "Image ranking")

        chart_box = QWidget()
        cl = QVBoxLayout(chart_box)
        cl.setContentsMargins(0, 0, 0, 0)
        mode_row = QHBoxLayout()
        mode_row.addWidget(QLabel("Observer ranges"))
        mode_row.addStretch(1)
        mode_row.addWidget(self.linear_radio)
        mode_row.addWidget(self.log_radio)
        cl.addLayout(mode_row)
        cl.addWidget(self.plot, 1)

        detail = QWidget()
        dl = QVBoxLayout(detail)
        dl.setContentsMargins(0, 0, 0, 0)
        title_row = QHBoxLayout()
        title_row.addWidget(self.detail_title, 1)
        title_row.addWidget(self.hist_log)
        dl.addLayout(title_row)
        dl.addWidget(self.hist, 1)
        dl.addWidget(self.detail_text)

        lower = QSplitter(Qt.Horizontal)
        lower.addWidget(self.table_tabs)
        lower.addWidget(detail)
        lower.addWidget(self.source_box)
        lower.setStretchFactor(0, 4)
        lower.setStretchFactor(1, 2)
        lower.setStretchFactor(2, 2)
        lower.setSizes([640, 280, 300])
        self.splitter = QSplitter(Qt.Vertical)
        self.splitter.addWidget(chart_box)
        self.splitter.addWidget(lower)
        self.splitter.setStretchFactor(0, 2)
        self.splitter.setStretchFactor(1, 3)
        self.splitter.setSizes([260, 420])

        layout = QVBoxLayout(self)
        layout.addWidget(self.splitter, 1)
        layout.addWidget(self.message)

    # -- data in ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Ask the session for its observer table (in the worker) and show it."""
        session = self._host.session
        if session is None:
            return
        self.message.show_message("Reading observer statistics…")
        def work():
            records = session.observer_table()
            return records, ObserverTableModel.prepare(records)

        self._host.submit(
            "observer table", work, takes_progress=False, on_done=lambda out: self.set_records(*out), on_error=self._on_error
        )
        self.refresh_ranking()

    def set_records(self, records: list, prepared: tuple[list, list] | None = None) -> None:
        """Show these ObserverRecords (forward order)."""
        keep = self.records[self._detail_row].name if 0 <= self._detail_row < len(self.records) else None
        self._locations.clear()
        self._wanted = None  # the selection below asks again
        self.records = list(records)
        self._detail_row = -1
        header = self.table.horizontalHeader()
        if header.sortIndicatorSection() == 0 and header.sortIndicatorOrder() == Qt.AscendingOrder:
            # Rows already arrive in forward order: skip a sort that calls data() thousands of times.
            self.proxy.sort(-1)
        self.model.set_records(self.records, prepared)
        self._apply_widths()
        n_out = sum(bool(getattr(r, "outlier", False)) for r in self.records)
        # "Outlier" is the core's per-observer test (a few values far beyond that observer's own
        # bulk); a range far wider than its neighbours' is something else, so the widest is named
        # beside the count instead of being hidden behind "0 outliers".
        from core.analysis.metrics import OUTLIER_PERCENTILE, OUTLIER_RATIO_THRESHOLD  # noqa: PLC0415 - torch stays off the UI start

        self.summary.setText(f"{len(self.records)} observers · {n_out} with outlier values" + self._widest_text())
        self.summary.setToolTip(
            f"An observer has outlier values when its largest |value| is over {OUTLIER_RATIO_THRESHOLD:g}× "
            f"the {OUTLIER_PERCENTILE:g}th percentile of its own values (highlighted rows, orange points). "
            "A range that is simply wider than the others' is not counted; the widest is named here."
        )
        self._update_chart()
        note, self._after_note = self._after_note, ""
        if note and self.records:
            self.message.show_message(f"{note} {len(self.records)} observers; {n_out} with outlier ranges.", "ok")
        else:
            self.message.show_message(
                f"{len(self.records)} observers; {n_out} with outlier ranges (highlighted)." if self.records else "No observers yet."
            )
        if self.records:
            names = [r.name for r in self.records]
            # After an exclude-and-recalibrate the user wants to see the same observer again.
            self.select_observer(names.index(keep) if keep in names else 0)
        else:
            self._clear_source("Calibrate to see which image set each range.")

    def _widest_text(self) -> str:
        if not self.records:
            return ""
        mags = [max(abs(scalar(r.min, "min")), abs(scalar(r.max, "max"))) for r in self.records]
        mags = [m if m == m else -1.0 for m in mags]  # NaN (an empty observer) never wins
        i = int(np.argmax(mags))
        rec = self.records[i]
        return f" · widest: #{i} {rec.name} [{fmt_float(scalar(rec.min, 'min'))}, {fmt_float(scalar(rec.max, 'max'))}]"

    def _apply_widths(self) -> None:
        char = self.table.fontMetrics().horizontalAdvance("0")
        for col, chars in enumerate(ObserverTableModel.WIDTHS):
            self.table.setColumnWidth(col, chars * char + 12)

    def clear(self) -> None:
        """Forget the shown statistics (after the settings change)."""
        self.set_records([])
        self.show_ranking([])
        self.message.show_message("Calibrate to see the observers' ranges.")

    def _on_error(self, exc: BaseException) -> None:
        self.message.show_message(error_text(exc), "error")

    # -- chart --------------------------------------------------------------------------
    def _update_chart(self) -> None:
        n = len(self.records)
        x = np.arange(n, dtype=float)
        mins = np.array([scalar(r.min, "min") for r in self.records], dtype=float)
        maxs = np.array([scalar(r.max, "max") for r in self.records], dtype=float)
        log = self.log_radio.isChecked()
        self.plot.setLogMode(x=False, y=log)
        if log:
            # Both ends as magnitudes, each as measured; a zero end has no logarithm, so it is a gap.
            def magnitude(v: np.ndarray) -> np.ndarray:
                v = np.abs(v)
                return np.where(v > 0, v, np.nan)

            self._max_curve.setData(x, magnitude(maxs), connect="finite")
            self._min_curve.setData(x, magnitude(mins), connect="finite")
            self.plot.setLabel("left", "|min| and |max| (log)")
        else:
            self._max_curve.setData(x, maxs)
            self._min_curve.setData(x, mins)
            self.plot.setLabel("left", "range")
        self._fill.setVisible(not log)  # a band between |min| and |max| would mean nothing
        out = np.array([bool(getattr(r, "outlier", False)) for r in self.records], dtype=bool)
        if n and out.any():
            ys = np.maximum(np.abs(mins), np.abs(maxs)) if log else maxs
            ys = np.log10(np.maximum(ys, 1e-30)) if log else ys
            self._outlier_points.setData(x[out], ys[out])
        else:
            self._outlier_points.setData([], [])
        self.plot.enableAutoRange()

    def _on_plot_clicked(self, event) -> None:
        if not self.records:
            return
        vb = self.plot.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        x = vb.mapSceneToView(event.scenePos()).x()
        self.select_observer(int(np.clip(round(x), 0, len(self.records) - 1)))

    # -- selection ----------------------------------------------------------------------
    def select_observer(self, source_row: int) -> None:
        """Select an observer by its forward index (table row follows)."""
        src = self.model.index(source_row, 0)
        proxy_index = self.proxy.mapFromSource(src)
        if proxy_index.isValid():
            self.table.selectionModel().setCurrentIndex(
                proxy_index, QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows
            )
            self.table.scrollTo(proxy_index)
        else:
            self._show_detail(source_row)

    def _on_current_row(self, current, _previous) -> None:
        if not current.isValid():
            return
        self._show_detail(self.proxy.mapToSource(current).row())

    def _show_detail(self, row: int) -> None:
        if not (0 <= row < len(self.records)):
            return
        rec = self.records[row]
        self._detail_row = row
        self._cursor.setValue(row)
        self._cursor.setVisible(True)
        self.detail_title.setText(f"{row}: {rec.name}")
        counts = np.asarray(getattr(rec, "hist_counts", []), dtype=float)
        edges = np.asarray(getattr(rec, "hist_edges", []), dtype=float)
        if counts.size and edges.size == counts.size + 1:
            log = self.hist_log.isChecked()
            self._hist_curve.setData(edges, np.log10(counts + 1.0) if log else counts)
            self.hist.setLabel("left", "log10(count + 1)" if log else "count")
        else:
            self._hist_curve.setData([], [])
        limits = grid_limits(rec)
        if limits is not None and getattr(rec, "enabled", True):
            self._qmin_line.setValue(limits[0])
            self._qmax_line.setValue(limits[1])
            self._qmin_line.setVisible(True)
            self._qmax_line.setVisible(True)
            grid = f"grid [{fmt_float(limits[0])}, {fmt_float(limits[1])}]"
        else:
            self._qmin_line.setVisible(False)
            self._qmax_line.setVisible(False)
            grid = "kept in float" if not getattr(rec, "enabled", True) else "no grid yet"
        self.hist.enableAutoRange()
        self.hist.setLabel("bottom", f"{rec.kind} value")
        pc = " per-channel" if getattr(rec, "per_channel", False) else ""
        self.detail_text.setText(
            f"{rec.dtype} {rec.scheme}{pc} · min {fmt_float(rec.min)} · max {fmt_float(rec.max)} · "
            f"scale {fmt_float(rec.scale)} · zp {self.model.data(self.model.index(row, 9))} · {grid}"
        )
        self._show_source_captions(rec)
        self._request_location()
        self.sigObserverSelected.emit(row)

    def _show_source_captions(self, rec) -> None:
        for caption, source in ((self.min_caption, rec.min_source), (self.max_caption, rec.max_source)):
            if isinstance(source, (list, tuple)):
                # per-channel weights: one source per channel; they are all "weights"
                source = source[0] if source else None
            text = "" if source is None else str(source)
            caption.setText(text or "—")
            caption.setToolTip(self._host.calibration_tab.path_for(text) or text)

    # -- where the extremes came from ----------------------------------------------------
    def _build_source_panel(self) -> None:
        self._locations: dict[tuple[str, str], object] = {}
        self._wanted: tuple[str, str] | None = None
        self._locate_task = None
        self._recal_task = None
        self._generation = 0
        self.location = None  # the ExtremeLocation on screen
        self._excluding = ""
        self._after_note = ""  # said again when the refreshed ranges arrive

        self.source_max_radio = QRadioButton("Max")
        self.source_min_radio = QRadioButton("Min")
        self.source_max_radio.setObjectName("sourceMaxRadio")
        self.source_min_radio.setObjectName("sourceMinRadio")
        self.source_max_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.source_max_radio)
        group.addButton(self.source_min_radio)
        self.source_max_radio.toggled.connect(lambda _on: self._request_location())

        self.source_view = pg.GraphicsLayoutWidget()
        self.source_view.setObjectName("sourceImageView")
        self.source_view.setBackground("w")
        self.source_view.setMinimumSize(220, 180)
        self.source_vb = self.source_view.addViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.source_image = pg.ImageItem(axisOrder="row-major")
        self.source_vb.addItem(self.source_image)
        self._box_items: list[QGraphicsRectItem] = []  # one per patch, exactly the core's boxes
        self._halo_items: list[QGraphicsRectItem] = []  # a ring around them, for the eye only

        self.source_caption = QLabel("Select an activation observer to see the image that set its range.")
        self.source_caption.setObjectName("sourceCaption")
        self.source_caption.setWordWrap(True)
        self.source_caption.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.exclude_button = QPushButton("Exclude this image and recalibrate")
        self.exclude_button.setObjectName("excludeAndRecalibrateButton")
        self.exclude_button.setToolTip(
            "Mark the image that set this extreme as excluded and calibrate again on the others "
            "(Cancel restores the current statistics)"
        )
        self.exclude_button.setEnabled(False)
        self.exclude_button.clicked.connect(self.exclude_current_image)
        self.recal_progress = QtTaskProgress(cancel_name="recalibrateCancelButton")
        self.recal_progress.cancel_button.clicked.connect(self.cancel_recalibration)

        self.source_box = QWidget()
        self.source_box.setObjectName("sourcePanel")
        sl = QVBoxLayout(self.source_box)
        sl.setContentsMargins(0, 0, 0, 0)
        head = QHBoxLayout()
        title = QLabel("Image that set the")
        title.setStyleSheet("font-weight: 600;")
        head.addWidget(title)
        head.addWidget(self.source_max_radio)
        head.addWidget(self.source_min_radio)
        head.addStretch(1)
        sl.addLayout(head)
        sl.addWidget(self.source_view, 1)
        sources = QHBoxLayout()
        for text, caption in (("max:", self.max_caption), ("min:", self.min_caption)):
            label = QLabel(text)
            label.setStyleSheet("color: palette(dark); font-size: 11px;")
            sources.addWidget(label)
            sources.addWidget(caption, 1)
        sl.addLayout(sources)
        sl.addWidget(self.source_caption)
        sl.addWidget(self.exclude_button)
        sl.addWidget(self.recal_progress)
        # Long names (one unbreakable word) would widen their pane on every selection: the texts
        # wrap within the width the user gave the pane instead of setting it.
        for label in (self.detail_title, self.detail_text, self.min_caption, self.max_caption, self.source_caption):
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
            label.setMinimumWidth(1)

    def _which(self) -> str:
        return "min" if self.source_min_radio.isChecked() else "max"

    def _clear_source(self, text: str) -> None:
        self.location = None
        self.source_image.clear()
        self._set_boxes([], MAX_COLOR)
        self.source_caption.setText(text)
        self.exclude_button.setEnabled(False)

    def _request_location(self) -> None:
        """Ask the core where the selected observer's min or max occurred (one lookup at a time)."""
        if not (0 <= self._detail_row < len(self.records)):
            return
        rec = self.records[self._detail_row]
        which = self._which()
        source = rec.min_source if which == "min" else rec.max_source
        if isinstance(source, (list, tuple)):
            source = source[0] if source else None
        if rec.kind == "weight" or source == "weights":
            self._wanted = None
            self._clear_source(f"The {which} of {rec.name} is set by the weights, not by an image.")
            return
        if not source:
            self._wanted = None
            self._clear_source(f"{rec.name} has seen no image yet.")
            return
        key = (rec.name, which)
        self._wanted = key
        if key in self._locations:
            self._show_location(self._locations[key])
            return
        self.source_caption.setText(f"Finding where the {which} of {rec.name} occurred in {source}…")
        if self._locate_task is None:
            self._submit_locate(key)

    def _submit_locate(self, key: tuple[str, str]) -> None:
        session = self._host.session
        if session is None:
            return
        name, which = key
        generation = self._generation

        def work():
            from core.analysis.provenance import locate_extreme  # noqa: PLC0415 - the core is imported lazily

            return generation, key, locate_extreme(session, name, which=which)

        self._locate_task = self._host.submit(
            "locating extreme",
            work,
            takes_progress=False,
            on_done=self._on_located,
            on_error=lambda exc, k=key: self._on_locate_failed(k, exc),
        )

    def _next_location(self) -> None:
        wanted = self._wanted
        if wanted is None:
            return
        if wanted in self._locations:
            self._show_location(self._locations[wanted])
        else:
            self._submit_locate(wanted)

    def _on_located(self, payload) -> None:
        generation, key, location = payload
        self._locate_task = None
        if generation == self._generation:  # statistics from before a recalibration are stale
            self._locations[key] = location
        self._next_location()

    def _on_locate_failed(self, key: tuple[str, str], exc: BaseException) -> None:
        self._locate_task = None
        if self._wanted == key:
            self._clear_source(f"Cannot locate the {key[1]} of {key[0]}: {error_text(exc)}")
            return
        self._next_location()

    def _set_boxes(self, boxes, color: str, image_size: tuple[int, int] | None = None) -> None:
        for item in self._box_items + self._halo_items:
            self.source_vb.removeItem(item)
        self._box_items = []
        self._halo_items = []
        pen = QPen(QColor(color))
        pen.setWidthF(2.0)
        pen.setCosmetic(True)
        fill = QColor(color)
        fill.setAlpha(110)
        for left, top, right, bottom in boxes:
            item = QGraphicsRectItem(QRectF(float(left), float(top), float(right - left), float(bottom - top)))
            item.setPen(pen)
            item.setBrush(fill)
            item.setZValue(10)
            self.source_vb.addItem(item)
            self._box_items.append(item)
        if boxes and image_size is not None:
            # One 16-pixel patch is a speck on a large image: ring it so the eye finds it.
            left = min(b[0] for b in boxes)
            top = min(b[1] for b in boxes)
            right = max(b[2] for b in boxes)
            bottom = max(b[3] for b in boxes)
            margin = max(6.0, 0.05 * max(image_size))
            ring = QRectF(left - margin, top - margin, right - left + 2 * margin, bottom - top + 2 * margin)
            for width, shade, style in ((5.0, QColor(255, 255, 255, 200), Qt.SolidLine), (2.0, QColor(color), Qt.DashLine)):
                halo_pen = QPen(shade)
                halo_pen.setWidthF(width)
                halo_pen.setCosmetic(True)
                halo_pen.setStyle(style)
                halo = QGraphicsRectItem(ring)
                halo.setPen(halo_pen)
                halo.setZValue(9)
                self.source_vb.addItem(halo)
                self._halo_items.append(halo)

    def shown_boxes(self) -> list[tuple[float, float, float, float]]:
        """The highlighted pixel boxes (left, top, right, bottom) on the source image."""
        out = []
        for item in self._box_items:
            r = item.rect()
            out.append((r.left(), r.top(), r.right(), r.bottom()))
        return out

    def _show_location(self, loc) -> None:
        self.location = loc
        image = getattr(loc, "image", None)
        color = MIN_COLOR if loc.which == "min" else MAX_COLOR
        if image is None:
            self.source_image.clear()
            self._set_boxes([], color)
        else:
            image = np.asarray(image)
            self.source_image.setImage(image, autoLevels=False, levels=(0, 255))
            h, w = image.shape[:2]
            self._set_boxes(list(loc.boxes or []), color, (h, w))
            self.source_vb.setRange(xRange=(0, w), yRange=(0, h), padding=0.02)
        n = len(loc.patches) if getattr(loc, "patches", None) is not None else len(loc.boxes or [])
        where = f"row {loc.row}" + (f" ({loc.level} level)" if getattr(loc, "level", None) else "")
        status = self._host.calibration_tab.entries_by_status().get(str(loc.path), "")
        excluded = " · <b>excluded</b>" if status == "excluded" else ""
        self.source_caption.setText(
            f"<span style='color:{color}; font-weight:600'>{loc.which} {fmt_float(loc.value)}</span> "
            f"in <b>{loc.image_id}</b> at {where}; {n} patch{'es' if n != 1 else ''} outlined{excluded}"
        )
        self.source_caption.setToolTip(str(loc.path))
        self.exclude_button.setEnabled(bool(loc.image_id) and self._recal_task is None and status != "excluded")

    # -- exclude and recalibrate -----------------------------------------------------------
    def exclude_current_image(self) -> None:
        """Exclude the image on screen and recalibrate without it."""
        loc = self.location
        if loc is None or not loc.image_id:
            return
        self.exclude_and_recalibrate([str(loc.path or loc.image_id)], str(loc.image_id))

    def exclude_and_recalibrate(self, paths_or_ids: list[str], label: str) -> None:
        """Run Session.recalibrate_without in the worker, with progress and cancel."""
        session = self._host.session
        if session is None or self._recal_task is not None:
            return
        usable = sum(s in ("ok", "used") for s in self._host.calibration_tab.entries_by_status().values())
        if usable - len(paths_or_ids) < 1:
            self.message.show_message(f"Excluding {label} would leave no image to calibrate on.", "error")
            return
        self.exclude_button.setEnabled(False)
        self.ranking_exclude_button.setEnabled(False)
        self.include_button.setEnabled(False)
        self.recal_progress.begin(usable - len(paths_or_ids), "images", "recalibrating…")
        self.message.show_message(f"Excluding {label} and recalibrating on {usable - len(paths_or_ids)} image(s)…")
        self._excluding = label
        # Locations looked up before this run finishes describe the old statistics.
        self._generation += 1

        def work(progress, cancel):
            import copy  # noqa: PLC0415

            result = session.recalibrate_without(list(paths_or_ids), progress=progress, cancel=cancel)
            return result, [copy.copy(e) for e in session.images]

        self._recal_task = self._host.submit(
            "recalibrating",
            work,
            on_done=self._on_recalibrated,
            on_error=self._on_recalibrate_error,
            on_progress=self.recal_progress.update_progress,
        )

    def cancel_recalibration(self) -> None:
        """Stop the recalibration; the core restores the earlier statistics and statuses."""
        self.recal_progress.cancel_task(self._recal_task)

    @property
    def recalibrating(self) -> bool:
        """Whether an exclude-and-recalibrate run is in progress."""
        return self._recal_task is not None

    def _on_recalibrated(self, payload) -> None:
        result, entries = payload
        self._recal_task = None
        self.ranking_exclude_button.setEnabled(True)
        self.include_button.setEnabled(True)
        self._locations.clear()
        if getattr(result, "cancelled", False):
            self.recal_progress.end("cancelled: the earlier statistics were restored")
            self.message.show_message(f"Cancelled; {self._excluding} is included again and the earlier ranges are kept.")
            self._host.after_recalibration(result, entries)
            self._request_location()
            return
        else:
            secs = float(getattr(result, "seconds", 0.0) or 0.0)
            self.recal_progress.end(f"done: {result.images_done} images in {secs:.1f} s")
            self._after_note = (
                f"Excluded {self._excluding}; recalibrated on {result.images_done} image(s) in {secs:.1f} s; "
                "ranges and errors refreshed."
            )
            self.message.show_message(self._after_note, "ok")
        self._host.after_recalibration(result, entries)

    def _on_recalibrate_error(self, exc: BaseException) -> None:
        self._recal_task = None
        self.ranking_exclude_button.setEnabled(True)
        self.include_button.setEnabled(True)
        self.recal_progress.end("failed")
        self.message.show_message(error_text(exc), "error")
        self._host.show_error(exc)
        self._request_location()

    # -- image ranking -----------------------------------------------------------------------
    RANK_COLUMNS = ("Image", "Extremes set", "Min", "Max", "Status", "Observers")

    def _build_ranking(self) -> None:
        self.ranks: list = []
        # Row numbers are the ranks, as under the bars.
        self.ranking_table = results_table(self.RANK_COLUMNS, "imageRankingTable", row_numbers=True)
        self.ranking_table.setWordWrap(False)
        self.ranking_summary = QLabel("Images ranked by how many observer extremes (min or max) they set.")
        self.ranking_summary.setWordWrap(True)
        self.ranking_summary.setStyleSheet("color: palette(dark);")
        self.ranking_exclude_button = QPushButton("Exclude selected image and recalibrate")
        self.ranking_exclude_button.setObjectName("rankingExcludeButton")
        self.ranking_exclude_button.clicked.connect(self.exclude_ranked_image)
        self.ranking_table.itemSelectionChanged.connect(self._on_ranking_selection)
        # min and max counts per image, stacked, in ranking order; built once
        self.ranking_plot = pg.PlotWidget()
        self.ranking_plot.setObjectName("imageRankingPlot")
        self.ranking_plot.setBackground("w")
        self.ranking_plot.setMaximumHeight(150)
        self.ranking_plot.showGrid(y=True, alpha=0.25)
        self.ranking_plot.setLabel("left", "extremes")
        self.ranking_plot.setMouseEnabled(x=False, y=False)
        self._rank_min_bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=MIN_COLOR, name="min set")
        self._rank_max_bars = pg.BarGraphItem(x=[], y0=[], height=[], width=0.7, brush=MAX_COLOR, name="max set")
        self.ranking_plot.addItem(self._rank_min_bars)
        self.ranking_plot.addItem(self._rank_max_bars)
        self.ranking_box = QWidget()
        rl = QVBoxLayout(self.ranking_box)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.ranking_summary)
        rl.addWidget(self.ranking_plot)
        rl.addWidget(self.ranking_table, 1)
        row = QHBoxLayout()
        row.addWidget(self.ranking_exclude_button)
        row.addStretch(1)
        rl.addLayout(row)
        self.excluded_label = QLabel("")
        self.excluded_label.setWordWrap(True)
        self.excluded_label.setStyleSheet("color: #7b7b7b;")
        self.include_button = QPushButton("Include them again and recalibrate")
        self.include_button.setObjectName("includeExcludedButton")
        self.include_button.clicked.connect(self.include_excluded)
        excluded_row = QHBoxLayout()
        excluded_row.addWidget(self.excluded_label, 1)
        excluded_row.addWidget(self.include_button)
        rl.addLayout(excluded_row)
        self.excluded_label.setVisible(False)
        self.include_button.setVisible(False)

    def refresh_ranking(self) -> None:
        """Ask the core which images set the most extremes (in the worker)."""
        session = self._host.session
        if session is None:
            return

        def work():
            from core.analysis.provenance import rank_images  # noqa: PLC0415

            return rank_images(session)

        self._host.submit("image ranking", work, takes_progress=False, on_done=self.show_ranking, on_error=self._on_ranking_error)

    def _on_ranking_error(self, exc: BaseException) -> None:
        self.show_ranking([])
        self.ranking_summary.setText(f"No ranking: {error_text(exc)}")

    def show_ranking(self, ranks: list) -> None:
        """Fill the ranking table with ImageRanks in the core's order (most extremes first)."""
        self.ranks = list(ranks)
        statuses = self._host.calibration_tab.entries_by_status()
        table = self.ranking_table
        table.setRowCount(len(self.ranks))
        for row, rank in enumerate(self.ranks):
            observers = list(getattr(rank, "observers", []) or [])
            status = getattr(rank, "status", "") or statuses.get(str(rank.path), "")
            cells = [
                str(rank.image_id),
                int(rank.extremes),
                int(rank.min_count),
                int(rank.max_count),
                status,
                ", ".join(observers[:3]) + (f" … (+{len(observers) - 3})" if len(observers) > 3 else ""),
            ]
            for col, value in enumerate(cells):
                item = QTableWidgetItem()
                item.setData(Qt.DisplayRole, value)
                if col == 0:
                    item.setData(Qt.UserRole, str(rank.path or rank.image_id))
                    item.setData(Qt.UserRole + 1, status)
                    item.setToolTip(str(rank.path or "no longer in the session"))
                if col == 5:
                    item.setToolTip("\n".join(observers[:40]) + ("\n…" if len(observers) > 40 else ""))
                if isinstance(value, int):
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                if status == "excluded":
                    item.setForeground(DISABLED_FG)
                table.setItem(row, col, item)
        for col in range(table.columnCount() - 1):
            table.resizeColumnToContents(col)
        x = np.arange(len(self.ranks), dtype=float)
        mins = np.array([int(r.min_count) for r in self.ranks], dtype=float)
        maxs = np.array([int(r.max_count) for r in self.ranks], dtype=float)
        self._rank_min_bars.setOpts(x=x, height=mins, width=0.7)
        self._rank_max_bars.setOpts(x=x, y0=mins, height=maxs, width=0.7)
        # File names do not fit under the bars: number them as the table's rows are numbered.
        step = max(1, -(-len(self.ranks) // 20))
        self.ranking_plot.getAxis("bottom").setTicks([[(float(i), str(i + 1)) for i in range(0, len(self.ranks), step)], []])
        self.ranking_plot.enableAutoRange()
        self.table_tabs.setTabText(1, f"Image ranking ({len(self.ranks)})" if self.ranks else "Image ranking")
        excluded = [p for p, st in statuses.items() if st == "excluded"]
        names = ", ".join(Path(p).name for p in excluded[:4]) + (" …" if len(excluded) > 4 else "")
        self.excluded_label.setText(f"Excluded from calibration: {names}" if excluded else "")
        self.excluded_label.setVisible(bool(excluded))
        self.include_button.setVisible(bool(excluded))
        if self.ranks:
            top = self.ranks[0]
            self.ranking_summary.setText(
                f"<b>{top.image_id}</b> set the most extremes: {int(top.extremes)} "
                f"(<span style='color:{MIN_COLOR}'>■ {int(top.min_count)} min</span>, "
                f"<span style='color:{MAX_COLOR}'>■ {int(top.max_count)} max</span>). "
                "Images that set many extremes are candidates to exclude."
            )
            table.selectRow(0)

    def exclude_ranked_image(self) -> None:
        """Exclude the image selected in the ranking table and recalibrate."""
        rows = {i.row() for i in self.ranking_table.selectionModel().selectedRows()}
        if not rows:
            self.message.show_message("Select an image in the ranking first.", "error")
            return
        item = self.ranking_table.item(min(rows), 0)
        if item.data(Qt.UserRole + 1) == "excluded":
            self.include_and_recalibrate([str(item.data(Qt.UserRole))], item.text())
        else:
            self.exclude_and_recalibrate([str(item.data(Qt.UserRole))], item.text())

    def include_excluded(self) -> None:
        """Include every excluded image again and recalibrate on the full set."""
        excluded = [p for p, st in self._host.calibration_tab.entries_by_status().items() if st == "excluded"]
        if excluded:
            label = Path(excluded[0]).name if len(excluded) == 1 else f"{len(excluded)} images"
            self.include_and_recalibrate(excluded, label)

    def _on_ranking_selection(self) -> None:
        rows = {i.row() for i in self.ranking_table.selectionModel().selectedRows()}
        item = self.ranking_table.item(min(rows), 0) if rows else None
        excluded = item is not None and item.data(Qt.UserRole + 1) == "excluded"
        self.ranking_exclude_button.setText(
            "Include selected image again and recalibrate" if excluded else "Exclude selected image and recalibrate"
        )

    def include_and_recalibrate(self, paths_or_ids: list[str], label: str) -> None:
        """Undo an exclusion: include the image again and calibrate on the full set."""
        session = self._host.session
        if session is None or self._recal_task is not None:
            return
        self.exclude_button.setEnabled(False)
        self.ranking_exclude_button.setEnabled(False)
        self.include_button.setEnabled(False)
        usable = sum(s in ("ok", "used") for s in self._host.calibration_tab.entries_by_status().values())
        self.recal_progress.begin(usable + len(paths_or_ids), "images", "recalibrating…")
        self.message.show_message(f"Including {label} again and recalibrating…")
        self._excluding = label
        self._generation += 1

        def work(progress, cancel):
            import copy  # noqa: PLC0415

            session.include_images(list(paths_or_ids))
            result = session.calibrate(progress=progress, cancel=cancel)
            return result, [copy.copy(e) for e in session.images]

        def done(payload):
            self._recal_task = None
            self.ranking_exclude_button.setEnabled(True)
            self.include_button.setEnabled(True)
            self._locations.clear()
            result, entries = payload
            secs = float(getattr(result, "seconds", 0.0) or 0.0)
            self.recal_progress.end(
                "cancelled: the earlier statistics were kept" if result.cancelled else f"done: {result.images_done} images in {secs:.1f} s"
            )
            if result.cancelled:
                self.message.show_message(
                    f"Included {label} again, but the calibration was cancelled: the ranges are still those without it."
                )
                self._host.after_recalibration(result, entries)
                self._request_location()
                return
            self._after_note = f"Included {label} again; recalibrated on {result.images_done} image(s)."
            self.message.show_message(self._after_note, "ok")
            self._host.after_recalibration(result, entries)

        self._recal_task = self._host.submit(
            "recalibrating", work, on_done=done, on_error=self._on_recalibrate_error, on_progress=self.recal_progress.update_progress
        )
