"""Ranges tab: observer table, [min, max] chart in forward order, histogram of the selection."""

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
from PySide6.QtGui import QBrush, QColor, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QRadioButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from core.errors import PTQStudioError
from core.quant.dtypes import get_dtype

from app.qt_common import QtMessageLine, error_text, fmt_float, scalar

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

SORT_ROLE = Qt.UserRole + 10
OUTLIER_BG = QColor(255, 193, 7, 70)
DISABLED_FG = QColor("#888888")

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
    WIDTHS = (5, 42, 30, 15, 7, 9, 11, 11, 11, 10, 11, 24, 24)
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
        self.min_image = QLabel()
        self.max_image = QLabel()
        self.min_caption = QLabel("")
        self.max_caption = QLabel("")
        for lab in (self.min_image, self.max_image):
            lab.setFixedSize(72, 72)
            lab.setAlignment(Qt.AlignCenter)
            lab.setStyleSheet("border: 1px solid palette(mid); background: palette(base);")
        for lab in (self.min_caption, self.max_caption):
            lab.setWordWrap(True)
            lab.setStyleSheet("color: palette(dark); font-size: 11px;")
        self.message = QtMessageLine()
        self.message.show_message("Calibrate to see the observers' ranges.")

        # layout
        filter_row = QHBoxLayout()
        filter_row.addWidget(self.filter_edit, 1)
        filter_row.addWidget(self.outliers_only)
        filter_row.addWidget(self.summary)
        table_box = QWidget()
        tl = QVBoxLayout(table_box)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addLayout(filter_row)
        tl.addWidget(self.table, 1)

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
        images = QGridLayout()
        images.addWidget(QLabel("Min set by"), 0, 0)
        images.addWidget(QLabel("Max set by"), 0, 1)
        images.addWidget(self.min_image, 1, 0)
        images.addWidget(self.max_image, 1, 1)
        images.addWidget(self.min_caption, 2, 0)
        images.addWidget(self.max_caption, 2, 1)
        dl.addLayout(images)

        lower = QSplitter(Qt.Horizontal)
        lower.addWidget(table_box)
        lower.addWidget(detail)
        lower.setStretchFactor(0, 3)
        lower.setStretchFactor(1, 2)
        lower.setSizes([700, 420])
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

    def set_records(self, records: list, prepared: tuple[list, list] | None = None) -> None:
        """Show these ObserverRecords (forward order)."""
        self.records = list(records)
        header = self.table.horizontalHeader()
        if header.sortIndicatorSection() == 0 and header.sortIndicatorOrder() == Qt.AscendingOrder:
            # Rows already arrive in forward order: skip a sort that calls data() thousands of times.
            self.proxy.sort(-1)
        self.model.set_records(self.records, prepared)
        self._apply_widths()
        n_out = sum(bool(getattr(r, "outlier", False)) for r in self.records)
        self.summary.setText(f"{len(self.records)} observers · {n_out} outliers")
        self._update_chart()
        self.message.show_message(
            f"{len(self.records)} observers; {n_out} with outlier ranges (highlighted)." if self.records else "No observers yet."
        )
        if self.records:
            self.select_observer(0)

    def _apply_widths(self) -> None:
        char = self.table.fontMetrics().horizontalAdvance("0")
        for col, chars in enumerate(ObserverTableModel.WIDTHS):
            self.table.setColumnWidth(col, chars * char + 12)

    def clear(self) -> None:
        """Forget the shown statistics (after the settings change)."""
        self.set_records([])
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
            mag = np.maximum(np.abs(mins), np.abs(maxs))
            mag = np.where(mag > 0, mag, np.nan)
            floor = np.nanmin(mag) if n and np.isfinite(mag).any() else 1.0
            self._max_curve.setData(x, np.nan_to_num(mag, nan=floor))
            self._min_curve.setData(x, np.full(n, floor))
            self.plot.setLabel("left", "max(|min|, |max|)")
        else:
            self._max_curve.setData(x, maxs)
            self._min_curve.setData(x, mins)
            self.plot.setLabel("left", "range")
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
        self._show_source(self.min_image, self.min_caption, getattr(rec, "min_source", None))
        self._show_source(self.max_image, self.max_caption, getattr(rec, "max_source", None))
        self.sigObserverSelected.emit(row)

    def _show_source(self, image_label: QLabel, caption: QLabel, image_id) -> None:
        if isinstance(image_id, (list, tuple)):
            # per-channel weights: one source per channel; they are all "weights" or the first image
            image_id = image_id[0] if image_id else None
        image_id = "" if image_id is None else str(image_id)
        caption.setText(image_id or "—")
        caption.setToolTip(self._host.calibration_tab.path_for(image_id) or image_id)
        thumb = self._host.calibration_tab.thumbnail_for(image_id) if image_id else None
        if thumb is not None and not thumb.isNull():
            image_label.setPixmap(QPixmap.fromImage(thumb).scaled(70, 70, Qt.KeepAspectRatio, Qt.SmoothTransformation))
        else:
            image_label.clear()
            image_label.setText("weights" if image_id == "weights" else "—")
