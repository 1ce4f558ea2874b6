"""Calibration images ranked by how many observer extremes they set: a stacked min/max bar chart, the
table, and the buttons that exclude an image (or include the excluded ones again) and recalibrate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QTableWidgetItem, QVBoxLayout, QWidget

from app.qt_common import results_table
from app.qt_observer_table import DISABLED_FG, MAX_COLOR, MIN_COLOR
from app.tab_state import ImageSnapshot

RANK_COLUMNS = ("Image", "Extremes set", "Min", "Max", "Status", "Observers")
DEFAULT_SUMMARY = "Images ranked by how many observer extremes (min or max) they set."


class QtImageRankingPanel(QWidget):
    """Shows ImageRanks in the core's order; asks (by signal) to exclude or include images."""

    sigExclude = Signal(list, str)  # paths (or ids), label
    sigInclude = Signal(list, str)
    sigCountChanged = Signal(int)  # how many images are ranked
    sigMessage = Signal(str, str)  # text, level: for the tab's message line

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ranks: list = []
        self.images = ImageSnapshot()
        # Row numbers are the ranks, as under the bars.
        self.table = results_table(RANK_COLUMNS, "imageRankingTable", row_numbers=True)
        self.table.setWordWrap(False)
        self.summary = QLabel(DEFAULT_SUMMARY)
        self.summary.setWordWrap(True)
        self.summary.setStyleSheet("color: palette(dark);")
        self.exclude_button = QPushButton("Exclude selected image and recalibrate")
        self.exclude_button.setObjectName("rankingExcludeButton")
        self.exclude_button.clicked.connect(self.exclude_selected)
        self.table.itemSelectionChanged.connect(self._on_selection)
        # min and max counts per image, stacked, in ranking order; built once
        self.plot = pg.PlotWidget()
        self.plot.setObjectName("imageRankingPlot")
        self.plot.setBackground("w")
        self.plot.setMaximumHeight(150)
        self.plot.showGrid(y=True, alpha=0.25)
        self.plot.setLabel("left", "extremes")
        self.plot.setMouseEnabled(x=False, y=False)
        self._min_bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=MIN_COLOR, name="min set")
        self._max_bars = pg.BarGraphItem(x=[], y0=[], height=[], width=0.7, brush=MAX_COLOR, name="max set")
        self.plot.addItem(self._min_bars)
        self.plot.addItem(self._max_bars)
        self.excluded_label = QLabel("")
        self.excluded_label.setWordWrap(True)
        self.excluded_label.setStyleSheet("color: #7b7b7b;")
        self.include_button = QPushButton("Include them again and recalibrate")
        self.include_button.setObjectName("includeExcludedButton")
        self.include_button.clicked.connect(self.include_excluded)
        self.excluded_label.setVisible(False)
        self.include_button.setVisible(False)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot)
        layout.addWidget(self.table, 1)
        row = QHBoxLayout()
        row.addWidget(self.exclude_button)
        row.addStretch(1)
        layout.addLayout(row)
        excluded_row = QHBoxLayout()
        excluded_row.addWidget(self.excluded_label, 1)
        excluded_row.addWidget(self.include_button)
        layout.addLayout(excluded_row)

    def set_busy(self, busy: bool) -> None:
        """A recalibration runs: no second one meanwhile."""
        self.exclude_button.setEnabled(not busy)
        self.include_button.setEnabled(not busy)

    def show_error(self, text: str) -> None:
        """No ranking; say why."""
        self.show_ranking([], self.images)
        self.summary.setText(f"No ranking: {text}")

    def show_ranking(self, ranks: list, images: ImageSnapshot) -> None:
        """Fill the table and the bars with ImageRanks in the core's order (most extremes first)."""
        self.ranks = list(ranks)
        self.images = images
        table = self.table
        table.setRowCount(len(self.ranks))
        for row, rank in enumerate(self.ranks):
            observers = list(getattr(rank, "observers", []) or [])
            status = getattr(rank, "status", "") or images.status_of(str(rank.path))
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
        self._min_bars.setOpts(x=x, height=mins, width=0.7)
        self._max_bars.setOpts(x=x, y0=mins, height=maxs, width=0.7)
        # File names do not fit under the bars: number them as the table's rows are numbered.
        step = max(1, -(-len(self.ranks) // 20))
        self.plot.getAxis("bottom").setTicks([[(float(i), str(i + 1)) for i in range(0, len(self.ranks), step)], []])
        self.plot.enableAutoRange()
        self.sigCountChanged.emit(len(self.ranks))
        self.show_excluded(images)
        if self.ranks:
            top = self.ranks[0]
            self.summary.setText(
                f"<b>{top.image_id}</b> set the most extremes: {int(top.extremes)} "
                f"(<span style='color:{MIN_COLOR}'>■ {int(top.min_count)} min</span>, "
                f"<span style='color:{MAX_COLOR}'>■ {int(top.max_count)} max</span>). "
                "Images that set many extremes are candidates to exclude."
            )
            table.selectRow(0)

    def show_excluded(self, images: ImageSnapshot) -> None:
        """Name the excluded images and offer to include them again."""
        self.images = images
        excluded = images.excluded()
        names = ", ".join(Path(p).name for p in excluded[:4]) + (" …" if len(excluded) > 4 else "")
        self.excluded_label.setText(f"Excluded from calibration: {names}" if excluded else "")
        self.excluded_label.setVisible(bool(excluded))
        self.include_button.setVisible(bool(excluded))

    def exclude_selected(self) -> None:
        """Exclude the image selected in the table (or include it, when it is excluded) and recalibrate."""
        rows = {i.row() for i in self.table.selectionModel().selectedRows()}
        if not rows:
            self.sigMessage.emit("Select an image in the ranking first.", "error")
            return
        item = self.table.item(min(rows), 0)
        signal = self.sigInclude if item.data(Qt.UserRole + 1) == "excluded" else self.sigExclude
        signal.emit([str(item.data(Qt.UserRole))], item.text())

    def include_excluded(self) -> None:
        """Include every excluded image again and recalibrate on the full set."""
        excluded = self.images.excluded()
        if excluded:
            label = Path(excluded[0]).name if len(excluded) == 1 else f"{len(excluded)} images"
            self.sigInclude.emit(excluded, label)

    def _on_selection(self) -> None:
        rows = {i.row() for i in self.table.selectionModel().selectedRows()}
        item = self.table.item(min(rows), 0) if rows else None
        excluded = item is not None and item.data(Qt.UserRole + 1) == "excluded"
        self.exclude_button.setText(
            "Include selected image again and recalibrate" if excluded else "Exclude selected image and recalibrate"
        )
