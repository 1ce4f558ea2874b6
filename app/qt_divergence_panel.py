"""First divergence: the banner that names where the quantized model parts from the float one, and the
per-unit SQNR chart under it."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QFrame, QHBoxLayout, QLabel, QPushButton, QWidget

from app.qt_common import SteadyHeight


def _short_unit(name: str, unit: str) -> str:
    """A tick label for a unit: a layer without "encoder.", a module by its last part."""
    if unit == "module":
        return name.rsplit(".", 1)[-1]
    return name[len("encoder."):] if name.startswith("encoder.") else name


class QtClickableLabel(SteadyHeight, QLabel):
    """A label that says when it is clicked (the banner's text is its own button); its height only grows."""

    sigClicked = Signal()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.LeftButton:
            self.sigClicked.emit()
        super().mouseReleaseEvent(event)


class QtDivergenceBanner(QFrame):
    """The first thing in the tab: the first unit where the quantized model parts from the float one."""

    sigShow = Signal(str)  # the located unit's name
    sigLocate = Signal(str)  # "layer" or "module"
    sigCancel = Signal()

    _STYLE = (
        "QFrame#divergenceBanner { background: %s; border: 1px solid %s; border-left: 5px solid %s;"
        " border-radius: 3px; }"
    )
    _COLORS = {
        "idle": ("#f4f5f7", "#d0d4da", "#9aa1ab"),
        "found": ("#fff4e5", "#f0c36d", "#d9480f"),
        "error": ("#fdecea", "#f5b7b1", "#b00020"),
    }

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("divergenceBanner")
        self.result = None
        self.located: str | None = None
        self.busy = False
        self.text_label = QtClickableLabel("First divergence: evaluate to locate it")
        self.text_label.setObjectName("divergenceText")
        self.text_label.setWordWrap(True)
        self.text_label.setStyleSheet("font-size: 13px; font-weight: 600; background: transparent; border: none;")
        # Room for a located unit's sentence from the start, so the tab does not shift (and re-lay out
        # every chart) when the first photo's divergence arrives: four lines of the banner's font.
        self.text_label.ensurePolished()
        self.text_label.setMinimumHeight(4 * self.text_label.fontMetrics().lineSpacing())
        self.show_button = QPushButton("Show")
        self.show_button.setObjectName("divergenceShowButton")
        self.show_button.setToolTip("Select this unit in the table and show its patch heatmap")
        self.show_button.setEnabled(False)
        self.unit_combo = QComboBox()
        self.unit_combo.setObjectName("divergenceUnit")
        self.unit_combo.addItem("per layer", "layer")
        self.unit_combo.addItem("per module", "module")
        self.unit_combo.setToolTip("Compare whole encoder layers, or every module")
        self.locate_button = QPushButton("Locate divergence")
        self.locate_button.setObjectName("locateDivergenceButton")
        self.locate_button.setToolTip(
            "Feed each unit the float model's input and measure the error it adds on its own (local SQNR)"
        )
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 5, 6, 5)
        layout.addWidget(self.text_label, 1)
        layout.addWidget(self.show_button)
        layout.addWidget(self.unit_combo)
        layout.addWidget(self.locate_button)
        self._look: str | None = None
        self._set_look("idle")
        self.text_label.sigClicked.connect(self._on_clicked)
        self.show_button.clicked.connect(self._on_clicked)
        self.locate_button.clicked.connect(self._on_locate_button)

    def unit(self) -> str:
        """The unit the next locate uses: "layer" or "module"."""
        return str(self.unit_combo.currentData())

    def _set_look(self, state: str) -> None:
        if state == self._look:
            return  # a style sheet set again re-polishes the banner and its children for nothing
        self._look = state
        self.setStyleSheet(self._STYLE % self._COLORS[state])
        self.text_label.setCursor(Qt.PointingHandCursor if state == "found" else Qt.ArrowCursor)

    def set_result(self, result) -> None:
        """Show a core DivergenceResult's summary line."""
        self.result = result
        self.located = result.located.name if result.located is not None else None
        text = result.summary_line()
        self.text_label.setText(text)
        self.text_label.setToolTip(text + ("\nClick to select it in the table and show its heatmap." if self.located else ""))
        self.show_button.setEnabled(self.located is not None)
        self._set_look("found" if self.located else "idle")

    def set_busy(self, unit: str) -> None:
        """Say that the locator runs; its button cancels it meanwhile."""
        self.busy = True
        self.locate_button.setText("Cancel")
        self.show_button.setEnabled(False)
        self.text_label.setText(f"First divergence: locating (per {unit})…")
        self._set_look("idle")

    def set_progress(self, done: int, total: int, message: str = "") -> None:
        """The locator's progress, in the banner's own words."""
        if self.busy:
            count = f" {done}/{total}" if total else ""
            self.text_label.setText(f"First divergence: locating{count}… {message}".rstrip())

    def set_done(self) -> None:
        """The locator finished (well or not)."""
        self.busy = False
        self.locate_button.setText("Locate divergence")

    def set_waiting(self, text: str) -> None:
        """Say what the banner waits for (an evaluation runs; the locator follows it)."""
        self.result = None
        self.located = None
        self.text_label.setText(f"First divergence: {text}")
        self.text_label.setToolTip("")
        self.show_button.setEnabled(False)
        self._set_look("idle")

    def set_error(self, text: str) -> None:
        """Say why the locator failed."""
        self.result = None
        self.located = None
        self.text_label.setText(f"First divergence: {text}")
        self.show_button.setEnabled(False)
        self._set_look("error")

    def clear(self) -> None:
        """Back to "not located"."""
        self.result = None
        self.located = None
        self.text_label.setText("First divergence: evaluate to locate it")
        self.text_label.setToolTip("")
        self.show_button.setEnabled(False)
        self.set_done()
        self._set_look("idle")

    def _on_locate_button(self) -> None:
        if self.busy:
            self.sigCancel.emit()
        else:
            self.sigLocate.emit(self.unit())

    def _on_clicked(self) -> None:
        if self.located:
            self.sigShow.emit(self.located)


class QtDivergenceChart(pg.PlotWidget):
    """Input, output and local SQNR of every unit; the located unit marked."""

    LEGEND_HTML = (
        "Per unit SQNR: <span style='color:#808080'>- - input</span> · "
        "<span style='color:#1f77b4'>● output</span> · "
        "<span style='color:#e6550d'>■ local (the unit alone on float input)</span> · "
        "<span style='color:#d9480f'>| first divergence</span>"
    )

    sigUnitClicked = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("divergencePlot")
        self.setBackground("w")
        self.showGrid(x=False, y=True, alpha=0.25)
        self.setLabel("left", "SQNR dB")
        self.entries: list = []
        # The legend lives in the title above (LEGEND_HTML): inside the plot it hides the curves.
        self.input_curve = self.plot([], [], pen=pg.mkPen("#9e9e9e", width=1.5, style=Qt.DashLine))
        self.output_curve = self.plot(
            [], [], pen=pg.mkPen("#1f77b4", width=1.5), symbol="o", symbolSize=6, symbolBrush="#1f77b4", symbolPen=None
        )
        self.local_curve = self.plot(
            [], [], pen=pg.mkPen("#e6550d", width=1.5), symbol="s", symbolSize=6, symbolBrush="#e6550d", symbolPen=None
        )
        self.marker = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#d9480f", width=2))
        self.marker.setVisible(False)
        self.addItem(self.marker)
        self.scene().sigMouseClicked.connect(self._on_clicked)

    def set_result(self, result) -> None:
        """Draw a DivergenceResult (None clears)."""
        self.entries = list(result.entries) if result is not None else []
        n = len(self.entries)
        x = np.arange(n, dtype=float)

        def col(attr: str) -> np.ndarray:
            return np.array([float(getattr(e, attr)) for e in self.entries], dtype=float)

        # Infinite SQNR (an exact unit) cannot be drawn; leave a gap instead.
        def finite(v: np.ndarray) -> np.ndarray:
            return np.where(np.isfinite(v), v, np.nan)

        if n:
            self.input_curve.setData(x, finite(col("input_sqnr_db")), connect="finite")
            self.output_curve.setData(x, finite(col("output_sqnr_db")), connect="finite")
            self.local_curve.setData(x, finite(col("local_sqnr_db")), connect="finite")
        else:
            for curve in (self.input_curve, self.output_curve, self.local_curve):
                curve.setData([], [])
        unit = getattr(result, "unit", "layer")
        step = max(1, int(np.ceil(n / (10 if unit == "layer" else 8))))
        located = getattr(result, "located", None) if result is not None else None
        names = [e.name for e in self.entries]
        marked = names.index(located.name) if located is not None and located.name in names else None
        # The marked unit always gets its label (the one the banner names); regular labels too close
        # to it would print over it, so they give way.
        ticks = [i for i in range(n) if i % step == 0 and (marked is None or abs(i - marked) >= step)]
        if marked is not None:
            ticks = sorted(ticks + [marked])
        self.getAxis("bottom").setTicks([[(i, _short_unit(names[i], unit)) for i in ticks]])
        if marked is not None:
            self.marker.setValue(marked)
        self.marker.setVisible(marked is not None)
        self.setLabel("bottom", f"{unit} (forward order; click to select)" if result is not None else "unit")
        self.enableAutoRange()
        if n:
            # Half a unit of room each side, so the first and last tick labels are not cut.
            self.setXRange(-0.5, n - 0.5, padding=0)

    def _on_clicked(self, event) -> None:
        if not self.entries:
            return
        vb = self.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        x = int(np.clip(round(vb.mapSceneToView(event.scenePos()).x()), 0, len(self.entries) - 1))
        self.sigUnitClicked.emit(self.entries[x].name)
