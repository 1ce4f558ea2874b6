"""Sensitivity sweep results: end-to-end error with one unit kept in float, best gain first."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem, QWidget

from app.events import SessionSubscriptions
from app.qt_common import fmt_float


class QtSensitivityTable(QTableWidget):
    """One row per SensitivityEntry in the core's order; selecting a row names its unit."""

    sigUnitChosen = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 4, parent)
        self.setObjectName("sensitivityTable")
        self.setHorizontalHeaderLabels(["Kept in float", "End-to-end SQNR dB", "PEIR", "Gain dB"])
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setStretchLastSection(True)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.itemSelectionChanged.connect(self._on_selection)
        self._subscriptions = SessionSubscriptions()

    def set_session(self, session) -> None:
        """Show this session's sweeps from now on; new statistics or a new config make a sweep stale."""
        self._subscriptions.replace(
            session.events if session is not None else None,
            {"analysed": self._on_analysed, "calibrated": self._forget, "config_changed": self._forget},
        )
        self._forget()

    def _on_analysed(self, view: str, result) -> None:
        if view == "sensitivity":
            self.show_entries(list(result))

    def _forget(self, *_) -> None:
        self.setRowCount(0)

    def show_entries(self, entries: list) -> None:
        """Fill the table with SensitivityEntries."""
        self.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            cells = [entry.name, f"{float(entry.sqnr_db):.2f}", fmt_float(entry.peir), f"{float(entry.improvement_db):+.2f}"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.setItem(row, col, item)
        self.resizeColumnsToContents()

    def _on_selection(self) -> None:
        items = self.selectedItems()
        if items:
            self.sigUnitChosen.emit(self.item(items[0].row(), 0).text())
