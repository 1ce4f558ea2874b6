"""The Fix tab's Pareto chart: every mixed-precision configuration tried, cost against SQNR; a click
on a point asks for it (sigPointClicked), built once and updated in place."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Signal

ORIGIN_COLORS = {"search": "#1f77b4", "greedy": "#ff7f0e", "baseline": "#7f7f7f"}
CHOSEN_COLOR = "#2ca02c"


class QtParetoChart(pg.PlotWidget):
    """Exported size (kB) against end-to-end SQNR of the configurations a search tried."""

    sigPointClicked = Signal(object)  # the ParetoPoint clicked

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("fixParetoPlot")
        self.setBackground("w")
        self.showGrid(x=True, y=True, alpha=0.2)
        self.setLabel("bottom", "exported size (kB)")
        self.setLabel("left", "end-to-end SQNR (dB)")
        self.points = pg.ScatterPlotItem(size=9, hoverable=True, tip=self._tip)
        self.addItem(self.points)
        self.points.sigClicked.connect(self._on_clicked)

    @staticmethod
    def _tip(x, y, data) -> str:
        overrides = ", ".join(f"{g}={v}" for g, v in getattr(data, "overrides", {}).items()) or "no overrides"
        return f"{getattr(data, 'origin', '')}: {x:.1f} kB, {y:.2f} dB\n{overrides}"

    def show_points(self, points, chosen=None) -> None:
        """Draw the points; the chosen one in green."""
        spots = [
            {
                "pos": (p.cost_bytes / 1024.0, p.sqnr_db),
                "data": p,
                "brush": pg.mkBrush(CHOSEN_COLOR if p is chosen else ORIGIN_COLORS.get(p.origin, "#444")),
                "symbol": "s" if p.origin == "greedy" else "o",
            }
            for p in points
        ]
        self.points.setData(spots)
        self.enableAutoRange()

    def clear_points(self) -> None:
        """No search shown."""
        self.points.setData([])

    def _on_clicked(self, _item, points, *_args) -> None:
        if len(points):
            self.sigPointClicked.emit(points[0].data())
