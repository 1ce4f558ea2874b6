"""The Fix tab's before/after views beside its per-module chart: one module's patch-error map on one
evaluation photo before and after the fix (two of the Errors tab's heatmaps on one colour scale), and
the first divergence before -> after (a sentence each, and every unit's local SQNR on the A/B charts).

Views only: they draw what app.fix_state.FixViewState decides (the maps come with the FixResult).
"""

from __future__ import annotations

import math

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QGridLayout, QHBoxLayout, QLabel, QSlider, QVBoxLayout, QWidget

from app.qt_ab_charts import A_COLOR, B_COLOR, QtABCharts, module_group
from app.qt_common import fmt_float
from app.qt_heatmap import DEFAULT_OPACITY, QtPatchHeatmap, colour_top, module_title


def _sqnr_text(db: float) -> str:
    if math.isnan(db):
        return "SQNR not measured"
    return "exact (no error)" if math.isinf(db) and db > 0 else f"SQNR {db:.2f} dB"


def _chooser(name: str, tip: str, chars: int) -> QComboBox:
    """A combo box that keeps `chars` characters visible and never widens the window for a long name."""
    combo = QComboBox(objectName=name, toolTip=tip)
    combo.setMinimumContentsLength(chars)
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    return combo


class QtFixHeatmapPair(QWidget):
    """Photo and module choosers over two patch heatmaps, before and after the fix, on one colour scale."""

    sigPhotoChosen = Signal(str)  # image id
    sigModuleChosen = Signal(str)  # module name ("model" = the final output)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("fixHeatmapPair")
        self.photo_combo = _chooser("fixHeatmapPhoto", "Evaluation photo whose patch errors are shown before and after the fix", 10)
        self.module_combo = _chooser(
            "fixHeatmapModule", "Module whose output error is mapped; a click on the per-module chart chooses it too", 16
        )
        # One opacity for both maps: it drives each heatmap's own (hidden) slider.
        self.opacity_slider = QSlider(Qt.Horizontal, objectName="fixHeatmapOpacity", minimum=0, maximum=100)
        self.opacity_slider.setValue(DEFAULT_OPACITY)
        self.opacity_slider.setFixedWidth(90)
        self.before = QtPatchHeatmap()
        self.after = QtPatchHeatmap()
        self.headers: list[QLabel] = []
        grid = QGridLayout()
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(12)
        for col, (side, name, color) in enumerate(((self.before, "Before", A_COLOR), (self.after, "After", B_COLOR))):
            side.setObjectName(f"fixHeatmap{name}")
            side.toolbar.setVisible(False)  # one photo and module for both: chosen above them
            side.title.setVisible(False)  # the header says it in one line: room for the photo
            header = QLabel(f"{name} the fix")
            header.setObjectName(f"fixHeatmap{name}Header")
            header.setStyleSheet(f"color: {color}; font-weight: 600; font-size: 13px;")
            header.setWordWrap(True)  # never widens the window; the SQNR and peak wrap instead
            self.headers.append(header)
            grid.addWidget(header, 0, col)
            grid.addWidget(side, 1, col)
            grid.setColumnStretch(col, 1)
        grid.setRowStretch(1, 1)

        top = QHBoxLayout()
        top.addWidget(QLabel("Photo:"))
        top.addWidget(self.photo_combo, 1)
        top.addWidget(QLabel("Module:"))
        top.addWidget(self.module_combo, 2)
        self.note = QLabel("one colour scale · opacity:")
        self.note.setObjectName("fixHeatmapNote")
        self.note.setToolTip("Both maps share one colour scale: where the after map is darker, the fix removed error")
        self.opacity_slider.setToolTip("Opacity of the error maps over the photo")
        top.addWidget(self.note)
        top.addWidget(self.opacity_slider)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addLayout(grid, 1)

        self.photo_combo.currentIndexChanged.connect(self._on_photo_combo)
        self.module_combo.currentIndexChanged.connect(self._on_module_combo)
        self.opacity_slider.valueChanged.connect(self._on_opacity)

    def set_choices(self, photos: list[str], photo: str | None, modules: list[str], module: str | None) -> None:
        """List the photos and modules to choose from and select the given ones (no signal)."""
        for combo, items, current, title in (
            (self.photo_combo, photos, photo, str),
            (self.module_combo, modules, module, module_title),
        ):
            combo.blockSignals(True)
            combo.clear()
            for item in items:
                combo.addItem(title(item), item)
            combo.setCurrentIndex(combo.findData(current) if current is not None else -1)
            combo.blockSignals(False)

    def show_pair(self, pair) -> None:
        """Draw a fix_state.HeatmapPair (None: empty) with the two maps on one colour scale."""
        if pair is None:
            self.clear()
            return
        top = colour_top(pair.before.grid, pair.after.grid)
        for side, hm, header, name, db in (
            (self.before, pair.before, self.headers[0], "Before", pair.before_sqnr_db),
            (self.after, pair.after, self.headers[1], "After", pair.after_sqnr_db),
        ):
            side.set_scale_max(top)
            side.set_heatmaps(pair.image_id, {pair.module: hm}, pair.module)
            peak = f"peak {fmt_float(hm.row_error[int(hm.peak_row)])} (x {hm.peak_xy[0]}, y {hm.peak_xy[1]})"
            header.setText(f"{name} · {_sqnr_text(db)} · {peak}")
            header.setToolTip(f"{module_title(pair.module)} on {pair.image_id}, per {hm.level}; the peak is outlined")

    def clear(self) -> None:
        """Forget the maps and the choices."""
        self.set_choices([], None, [], None)
        for side in (self.before, self.after):
            side.clear()
            side.set_scale_max(None)
        self.headers[0].setText("Before the fix")
        self.headers[1].setText("After the fix")

    def _on_photo_combo(self, _index: int) -> None:
        data = self.photo_combo.currentData()
        if data is not None:
            self.sigPhotoChosen.emit(str(data))

    def _on_module_combo(self, _index: int) -> None:
        data = self.module_combo.currentData()
        if data is not None:
            self.sigModuleChosen.emit(str(data))

    def _on_opacity(self, value: int) -> None:
        for side in (self.before, self.after):
            side.opacity_slider.setValue(value)


class QtFixDivergenceLine(QLabel):
    """The first divergence before the fix and what the locator says after it, one sentence each."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("fixDivergenceText")
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setToolTip("Located per layer on the evaluation photos; local SQNR: the unit alone, quantized, on float input")

    def show_lines(self, lines: tuple[str, str] | None) -> None:
        """Show fix_state's (before, after) sentences in the before and after colours (None: nothing)."""
        self.setVisible(lines is not None)
        if lines is None:
            self.setText("")
            return
        before, after = lines
        self.setText(f"<span style='color:{A_COLOR}'>{before}</span><br><span style='color:{B_COLOR}'>{after}</span>")


class QtLocalSQNRChart(QWidget):
    """Every divergence unit's local SQNR before and after the fix, on the A/B charts; the unit located before marked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("fixLocalSQNR")
        caption = QLabel(
            "Local SQNR per layer: each unit run alone, quantized, on the float model's input (the error it adds by "
            "itself). The dashed line marks the first divergence before the fix."
        )
        caption.setWordWrap(True)
        caption.setStyleSheet("color: palette(dark);")
        self.charts = QtABCharts(labels=("before", "after"), name="fixLocal")
        self.charts.plot.setLabel("left", "local SQNR (dB)")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(caption)
        layout.addWidget(self.charts, 1)

    def show_changes(self, changes: list, located: str | None) -> None:
        """Draw fix_state.UnitChange rows in forward order and mark `located`."""
        self.charts.clear()
        self.charts.show_modules(changes)
        names = [c.name for c in changes]
        # A few units, not hundreds of modules: every one gets its label (the module axis thins them out).
        ticks = [[(float(i), module_group(n)) for i, n in enumerate(names)], []]
        self.charts.axis.setTicks(ticks)
        self.charts.delta_axis.setTicks(ticks)
        if located in names:
            self.charts.mark(names.index(located))

    def clear(self) -> None:
        """Empty the chart."""
        self.charts.clear()
