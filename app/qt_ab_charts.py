"""The A/B tab's charts: both configs' SQNR per module, and B − A below it, x linked; built once."""

from __future__ import annotations

import re

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

A_COLOR = "#1f77b4"
B_COLOR = "#ff7f0e"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_SHORT = {"patch_embedder": "embed", "encoder": "enc", "pooler": "pool", "": "model"}


def module_group(name: str) -> str:
    """A short label for the part of the model a module belongs to (L3, embed, pool, …)."""
    m = _LAYER.search(name)
    if m:
        return f"L{m.group(1)}"
    head = name.split(".")[0]
    return _SHORT.get(head, head)


def finite_or_nan(values) -> np.ndarray:
    """Floats with ±inf as nan, so curves break there instead of shooting off the chart."""
    arr = np.asarray(values, dtype=float)
    return np.where(np.isfinite(arr), arr, np.nan)


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


def _plot(axis: _CategoryAxis, name: str, left_label: str) -> pg.PlotWidget:
    """A white, gridded plot over the module axis."""
    plot = pg.PlotWidget(axisItems={"bottom": axis})
    plot.setObjectName(name)
    plot.setBackground("w")
    plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setLabel("left", left_label)
    return plot


class QtABCharts(QWidget):
    """SQNR of A and B per module (points clickable) over a bar chart of B − A."""

    sigModuleClicked = Signal(int)  # forward-order index of the clicked module

    def __init__(self, labels: tuple[str, str] = ("A", "B"), name: str = "ab") -> None:
        super().__init__()
        # The Fix tab draws "before" and "after" with the same charts.
        self.labels = la, lb = labels
        self.axis = _CategoryAxis(orientation="bottom")
        self.plot = _plot(self.axis, f"{name}Plot", "SQNR (dB)")
        self.plot.addLegend(offset=(-10, 5))
        self.curve_a = self.plot.plot([], [], pen=pg.mkPen(A_COLOR, width=1.5), name=la)
        self.curve_b = self.plot.plot([], [], pen=pg.mkPen(B_COLOR, width=1.5), name=lb)
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
        self.delta_plot = _plot(self.delta_axis, f"{name}DeltaPlot", f"Δ dB ({lb} − {la})")
        self.delta_plot.setXLink(self.plot)
        self.delta_bars = pg.BarGraphItem(x=[], height=[], width=0.7, brush=B_COLOR)
        self.delta_plot.addItem(self.delta_bars)
        self.delta_plot.addItem(pg.InfiniteLine(pos=0, angle=0, movable=False, pen=pg.mkPen("#888")))
        self.delta_plot.setMaximumHeight(170)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.delta_plot)

    @staticmethod
    def _tip(x, y, data) -> str:
        return f"{data}\nSQNR {y:.2f} dB"

    def show_modules(self, modules) -> None:
        """Draw the ABModules of a comparison, in forward order."""
        names = [m.name for m in modules]
        x = np.arange(len(modules), dtype=float)
        a = finite_or_nan([m.a.sqnr_db for m in modules])
        b = finite_or_nan([m.b.sqnr_db for m in modules])
        delta = finite_or_nan([m.delta_sqnr_db for m in modules])
        self.curve_a.setData(x, a, connect="finite")
        self.curve_b.setData(x, b, connect="finite")
        ok_a, ok_b = np.isfinite(a), np.isfinite(b)
        self.points_a.setData(x[ok_a], a[ok_a], data=[f"{names[i]} ({self.labels[0]})" for i in np.flatnonzero(ok_a)])
        self.points_b.setData(x[ok_b], b[ok_b], data=[f"{names[i]} ({self.labels[1]})" for i in np.flatnonzero(ok_b)])
        colors = {"A": A_COLOR, "B": B_COLOR}
        brushes = [pg.mkBrush(colors.get(str(m.winner), "#999")) for m in modules]
        self.delta_bars.setOpts(x=x, height=np.nan_to_num(delta), width=0.7, brushes=brushes)
        self.axis.set_names(names)
        self.delta_axis.set_names(names)
        self.plot.enableAutoRange()
        self.delta_plot.enableAutoRange()

    def clear(self) -> None:
        """Empty every curve, bar and the cursor."""
        for item in (self.curve_a, self.curve_b, self.points_a, self.points_b):
            item.setData([], [])
        self.delta_bars.setOpts(x=[], height=[], brushes=None)
        self._cursor.setVisible(False)

    def mark(self, index: int) -> None:
        """Put the dashed cursor on the module at this forward-order index."""
        self._cursor.setValue(index)
        self._cursor.setVisible(True)

    def _on_point_clicked(self, _item, points, *_args) -> None:
        if len(points):
            self.sigModuleClicked.emit(int(round(points[0].pos().x())))
