"""The Ranges tab's observer table: one row per ObserverRecord (texts made once), sorted and filtered by a
proxy; outlier rows tinted, observers kept in float greyed."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QBrush, QColor

from app.qt_common import fmt_float, scalar
from core.errors import PTQStudioError
from core.quant.dtypes import get_dtype

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
        ("Before fix", "before"),  # the range before the session's last remedy (hidden without one)
    ]

    # Column widths in characters; set once, because measuring hundreds of rows stalls the UI.
    # The observer name is elided (its tooltip has it whole) so Min and Max, beside it, fit at 1280 px.
    WIDTHS = (5, 26, 24, 15, 7, 9, 10, 10, 11, 10, 11, 24, 24, 22)
    NUMERIC = frozenset({"index", "min", "max", "scale", "zero_point", "outlier_ratio"})

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.records: list = []
        self._display: list[list[str]] = []
        self._sort: list[list] = []
        self._outlier_brush = QBrush(OUTLIER_BG)
        self._disabled_brush = QBrush(DISABLED_FG)

    @classmethod
    def prepare(cls, records: list, before: dict | None = None) -> tuple[list, list]:
        """Cell texts and sort keys; plain Python, so the worker thread can compute them.
        `before`: observer name -> (min, max) before the last remedy, for the "Before fix" column."""
        before = before or {}
        display = [
            [cls._before_text(before.get(rec.name)) if attr == "before" else cls._text(row, rec, attr) for _title, attr in cls.COLUMNS]
            for row, rec in enumerate(records)
        ]
        keys = [
            [scalar(before[rec.name][1], "max") if attr == "before" and rec.name in before else cls._key(row, rec, attr)
             for _title, attr in cls.COLUMNS]
            for row, rec in enumerate(records)
        ]
        return display, keys

    @staticmethod
    def _before_text(extremes) -> str:
        return "" if extremes is None else f"{fmt_float(extremes[0])} … {fmt_float(extremes[1])}"

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

    def extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's min and max (over channels), read from the sort keys the worker computed: the ranges
        chart's curves without a second pass over 1,192 per-channel records on the UI thread."""
        attrs = [attr for _title, attr in self.COLUMNS]
        lo, hi = attrs.index("min"), attrs.index("max")
        return (np.array([k[lo] for k in self._sort], dtype=float), np.array([k[hi] for k in self._sort], dtype=float))

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
