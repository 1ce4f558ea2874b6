"""The Errors tab's per-module table: one row per ModuleError, worst SQNR tinted, a keep-in-float check."""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QBrush, QColor

from app.qt_common import fmt_float

SORT_ROLE = Qt.UserRole + 20


def sqnr_color(sqnr: float) -> QColor | None:
    """The row tint for an SQNR: red under 15 dB, amber under 25 dB, none above."""
    # Rough bands an engineer reads at a glance: < 15 dB hurts, < 25 dB is worth a look.
    if not np.isfinite(sqnr):
        return None
    if sqnr < 15:
        return QColor(229, 57, 53, 70)
    if sqnr < 25:
        return QColor(255, 193, 7, 60)
    return None


class ModuleErrorModel(QAbstractTableModel):
    """Rows are ModuleErrors in the current sort order; the last column is a keep-in-float check.

    The model sorts itself (see sort): a QSortFilterProxyModel sorting 700 rows calls the Python
    data() about 13,000 times, 105 ms of GUI-thread time on every refresh.
    """

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
        self.modules: list = []  # in row (sorted) order; forward holds them in forward order
        self.forward: list = []
        self.keep_float: set[str] = set()
        self.sort_column = -1  # -1: forward order
        self.sort_order = Qt.AscendingOrder
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
        self.forward = list(modules)
        self.modules = list(self.forward)
        self.keep_float = set(keep_float or ())
        # Computed once (by the worker when it can): data() is called thousands of times.
        self._display, self._sort = prepared if prepared is not None else self.prepare(self.modules)
        self._brush = []
        for m in self.modules:
            color = sqnr_color(float(m.sqnr_db))
            self._brush.append(QBrush(color) if color is not None else None)
        # Sorted inside the reset: no layout signals, no proxy re-sort.
        self._reorder(self._row_order())
        self.endResetModel()

    def sort(self, column: int, order=Qt.AscendingOrder) -> None:
        """Sort the rows by a column with one Python sort over the prepared keys; selections survive."""
        self.sort_column, self.sort_order = column, order
        self.layoutAboutToBeChanged.emit()
        old_rows = self._row_order()
        new_row = {old: new for new, old in enumerate(old_rows)}
        self._reorder(old_rows)
        # The proxy's (and so the view's) current index and selection are persistent indexes here.
        before = self.persistentIndexList()
        after = [self.index(new_row[i.row()], i.column()) for i in before]
        self.changePersistentIndexList(before, after)
        self.layoutChanged.emit()

    def _row_order(self) -> list[int]:
        """Current rows in their new order: by the sort column's key, ties and NaNs in forward order."""
        # Forward order first, then a stable sort: ties stay in forward order in both directions,
        # as the proxy's stable sort left them; NaNs (no value) go last either way.
        rows = sorted(range(len(self.modules)), key=lambda r: self._sort[r][0])
        if not 0 <= self.sort_column < len(self.COLUMNS):
            return rows
        if self.sort_column == self.KEEP_COL:
            keys = [int(m.name in self.keep_float) for m in self.modules]
        else:
            keys = [row[self.sort_column] for row in self._sort]
        nans = [r for r in rows if isinstance(keys[r], float) and math.isnan(keys[r])]
        valued = [r for r in rows if not (isinstance(keys[r], float) and math.isnan(keys[r]))]
        valued.sort(key=keys.__getitem__, reverse=self.sort_order == Qt.DescendingOrder)
        return valued + nans

    def _reorder(self, old_rows: list[int]) -> None:
        """Row i becomes what row old_rows[i] was."""
        self.modules = [self.modules[r] for r in old_rows]
        self._display = [self._display[r] for r in old_rows]
        self._sort = [self._sort[r] for r in old_rows]
        self._brush = [self._brush[r] for r in old_rows]

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


class ModuleErrorProxy(QSortFilterProxyModel):
    """Filters a ModuleErrorModel by module name; sorting is forwarded to the model, which does it once in Python."""

    def __init__(self, model: ModuleErrorModel, parent=None) -> None:
        super().__init__(parent)
        self.setSourceModel(model)
        self.setSortRole(SORT_ROLE)
        self.setFilterKeyColumn(1)
        self.setFilterCaseSensitivity(Qt.CaseInsensitive)

    def sort(self, column: int, order=Qt.AscendingOrder) -> None:
        """Let the model sort (the proxy's own sort would call data() n log n times)."""
        self.sourceModel().sort(column, order)
