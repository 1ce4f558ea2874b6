"""FP-vs-quantized scatter of one module's sampled values, over all evaluated images or one image."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from app.qt_common import fmt_float

MAX_SCATTER_POINTS = 20000
ALL_IMAGES = "All images"


class QtErrorScatterPanel(QWidget):
    """Title, image chooser and the scatter with its y = x line; plot items built once, then setData'd."""

    sigImageChosen = Signal(str)  # an image id, or "" for all evaluated images

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image_combo = QComboBox()
        self.image_combo.addItem(ALL_IMAGES)
        self.image_combo.setToolTip("Scatter of all evaluated images, or of one image (evaluated on demand)")
        self.image_combo.currentIndexChanged.connect(lambda _i: self.sigImageChosen.emit(self.chosen_image() or ""))
        self.plot = pg.PlotWidget()
        self.plot.setObjectName("scatterPlot")
        self.plot.setBackground("w")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "float value")
        self.plot.setLabel("left", "quantized value")
        self.scatter = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(31, 119, 180, 90))
        self.plot.addItem(self.scatter)
        self.identity = self.plot.plot([], [], pen=pg.mkPen("#d62728", width=1.2, style=Qt.DashLine))
        self.title = QLabel("Select a module")
        self.title.setStyleSheet("font-weight: 600;")
        self.title.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.title, 1)
        row.addWidget(self.image_combo)
        layout.addLayout(row)
        layout.addWidget(self.plot, 1)

    def set_images(self, image_ids: list[str]) -> None:
        """Offer these evaluated images (back on "All images", without announcing a choice)."""
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItem(ALL_IMAGES)
        for image_id in image_ids:
            self.image_combo.addItem(str(image_id))
        self.image_combo.blockSignals(False)

    def chosen_image(self) -> str | None:
        """The image id chosen, or None for all evaluated images."""
        return self.image_combo.currentText() if self.image_combo.currentIndex() > 0 else None

    def clear(self) -> None:
        """No points."""
        self.scatter.setData([], [])
        self.identity.setData([], [])

    def show_pending(self, name: str, image_id: str) -> None:
        """Say that this module's values on one image are being evaluated."""
        self.clear()
        self.title.setText(f"{name}: evaluating {image_id}…")

    def show_module(self, source, kept: bool) -> None:
        """Draw a ModuleError's sampled float and quantized values (a fixed stride past the cap)."""
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
            self.identity.setData([lo, hi], [lo, hi])
        else:
            self.identity.setData([], [])
        self.plot.enableAutoRange()
        image_id = self.chosen_image()
        kept_text = " · kept in float" if kept else ""
        per_image = "" if image_id is None else f" · on {image_id} only"
        self.title.setText(
            f"{source.name}: SQNR {float(source.sqnr_db):.2f} dB · max |err| {fmt_float(source.max_abs)}{kept_text}{per_image}"
        )
