"""Per-module error along the model's depth, the worst modules in red; a click selects a module."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

WORST_N = 5


class QtDepthChart(QWidget):
    """SQNR or PEIR of every module in forward order; plot items built once, then setData'd."""

    sigModuleClicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.modules: list = []
        self.metric_combo = QComboBox()
        self.metric_combo.addItems(["SQNR (dB)", "PEIR"])
        self.metric_combo.currentIndexChanged.connect(lambda _i: self._redraw())
        self.plot = pg.PlotWidget()
        self.plot.setObjectName("errorsPlot")
        self.plot.setBackground("w")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "module (forward order = depth)")
        self.curve = self.plot.plot(
            [], [], pen=pg.mkPen("#1f77b4", width=1.5), symbol="o", symbolSize=5, symbolBrush="#1f77b4", symbolPen=None
        )
        self.worst_points = pg.ScatterPlotItem(size=10, pen=pg.mkPen("#b71c1c"), brush=pg.mkBrush(229, 57, 53, 200))
        self.plot.addItem(self.worst_points)
        self.cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#444", style=Qt.DashLine))
        self.cursor.setVisible(False)
        self.plot.addItem(self.cursor)
        self.plot.scene().sigMouseClicked.connect(self._on_clicked)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(QLabel("Error along depth — worst modules in red"))
        row.addStretch(1)
        row.addWidget(self.metric_combo)
        layout.addLayout(row)
        layout.addWidget(self.plot, 1)

    def set_modules(self, modules: list) -> None:
        """Draw these ModuleErrors (forward order)."""
        self.modules = list(modules)
        self._redraw()

    def set_cursor(self, row: int) -> None:
        """Mark the selected module."""
        self.cursor.setValue(row)
        self.cursor.setVisible(True)

    def _metric(self) -> tuple[str, np.ndarray]:
        if self.metric_combo.currentIndex() == 1:
            return "PEIR", np.array([float(m.peir) for m in self.modules], dtype=float)
        return "SQNR dB", np.array([float(m.sqnr_db) for m in self.modules], dtype=float)

    def _redraw(self) -> None:
        label, values = self._metric()
        n = len(values)
        x = np.arange(n, dtype=float)
        self.curve.setData(x, values)
        self.plot.setLabel("left", label)
        if n:
            sqnr = np.array([float(m.sqnr_db) for m in self.modules])
            worst = np.argsort(sqnr)[: min(WORST_N, n)]
            self.worst_points.setData(x[worst], values[worst])
        else:
            self.worst_points.setData([], [])
        self.plot.enableAutoRange()

    def _on_clicked(self, event) -> None:
        if not self.modules:
            return
        vb = self.plot.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        x = int(np.clip(round(vb.mapSceneToView(event.scenePos()).x()), 0, len(self.modules) - 1))
        self.sigModuleClicked.emit(self.modules[x].name)
