"""Patch-error heatmap: where in the photo quantization hurts, for one image and one module.

A view only: the Errors tab computes ``core.analysis.heatmaps`` results in the worker and hands this
widget ready-made ``Heatmap`` objects (per-patch grids); nothing here touches torch.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import (
    QComboBox,
    QGraphicsRectItem,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import fmt_float

FINAL_OUTPUT = "model"  # the core's name for the vision model's output
FINAL_OUTPUT_TITLE = "final output"
COLORMAP = "inferno"
DEFAULT_OPACITY = 50  # percent: the photo stays readable under the map


def module_title(name: str) -> str:
    """What the module chooser shows for a module name."""
    return FINAL_OUTPUT_TITLE if name == FINAL_OUTPUT else name


def colour_top(*grids: np.ndarray) -> float:
    """The top of a colour scale that fits every grid's finite errors (1.0 when none is above 0)."""
    peaks = [float(v[np.isfinite(v)].max()) for v in (np.asarray(g, dtype=float) for g in grids) if np.isfinite(v).any()]
    top = max(peaks, default=0.0)
    return top if top > 0 else 1.0


def upsample(grid: np.ndarray, patch_size: int) -> np.ndarray:
    """A (rows, cols) patch grid as a (rows*p, cols*p) pixel map, one block per patch."""
    return np.repeat(np.repeat(np.asarray(grid, dtype=np.float32), patch_size, axis=0), patch_size, axis=1)


class QtPatchHeatmap(QWidget):
    """Photo with its per-patch relative error on top, colour bar, opacity, image and module choosers."""

    sigImageChosen = Signal(str)  # image id
    sigModuleChosen = Signal(str)  # module name ("model" for the final output)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("patchHeatmap")
        self.heatmaps: dict[str, object] = {}  # module name -> core Heatmap of the shown image
        self.heatmap = None  # the one on screen
        self.image_id: str | None = None
        self.scale_max: float | None = None  # a fixed top of the colour scale (a before/after pair shares one)

        self.image_combo = QComboBox()
        self.image_combo.setObjectName("heatmapImageCombo")
        self.image_combo.setToolTip("Image whose patch errors are shown (computed once per image, then cached)")
        self.image_combo.setMinimumContentsLength(8)
        self.image_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.module_combo = QComboBox()
        self.module_combo.setObjectName("heatmapModuleCombo")
        self.module_combo.setToolTip(
            "Module whose output error is mapped; follows the module selected in the table when it has a patch or token map"
        )
        self.module_combo.setMinimumContentsLength(10)
        self.module_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.opacity_slider = QSlider(Qt.Horizontal)
        self.opacity_slider.setObjectName("heatmapOpacity")
        self.opacity_slider.setRange(0, 100)
        self.opacity_slider.setValue(DEFAULT_OPACITY)
        self.opacity_slider.setFixedWidth(80)
        self.opacity_slider.setToolTip("Opacity of the error map over the photo")
        self.opacity_label = QLabel(f"{DEFAULT_OPACITY}%")
        self.opacity_label.setMinimumWidth(34)
        self.fit_button = QPushButton("Fit")
        self.fit_button.setObjectName("heatmapFitButton")
        self.fit_button.setToolTip("Show the whole image again after zooming or panning")

        self.title = QLabel("Evaluate to see where in the image the error is")
        self.title.setObjectName("heatmapTitle")
        self.title.setStyleSheet("font-weight: 600;")
        self.title.setWordWrap(True)
        self.hover_label = QLabel("Hover over the image for a patch's error")
        self.hover_label.setObjectName("heatmapHover")
        self.hover_label.setStyleSheet("color: palette(dark);")
        self.hover_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        # Items are created once and updated in place (setImage / setRect), never rebuilt.
        self.view = pg.GraphicsLayoutWidget()
        self.view.setObjectName("heatmapView")
        self.view.setBackground("w")
        self.plot = self.view.addPlot()
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.vb = self.plot.getViewBox()
        self.vb.setAspectLocked(True)
        self.vb.setDefaultPadding(0.02)
        self.vb.invertY(True)  # row 0 at the top, as in the photo
        self.photo_item = pg.ImageItem(axisOrder="row-major")
        self.error_item = pg.ImageItem(axisOrder="row-major")
        self.error_item.setOpacity(DEFAULT_OPACITY / 100)
        self.plot.addItem(self.photo_item)
        self.plot.addItem(self.error_item)
        self.color_bar = pg.ColorBarItem(
            values=(0.0, 1.0), colorMap=COLORMAP, label="relative error", interactive=False, width=16, colorMapMenu=False
        )
        self.color_bar.setImageItem(self.error_item, insert_in=self.plot)
        # Relative errors are small numbers ("0.0004"); the bar's default 45 px hides such labels.
        self.color_bar.axis.setWidth(72)
        pen = QPen(QColor(0, 229, 255))
        pen.setWidth(2)
        pen.setCosmetic(True)  # same thickness at every zoom
        self.peak_rect = QGraphicsRectItem()
        self.peak_rect.setPen(pen)
        self.peak_rect.setZValue(10)
        self.peak_rect.setVisible(False)
        self.plot.addItem(self.peak_rect)
        # A one-patch outline is a few screen pixels on a large photo: a ring marks it at any zoom.
        self.peak_marker = pg.ScatterPlotItem(
            size=30, symbol="o", pen=pg.mkPen(0, 229, 255, width=2), brush=None, pxMode=True
        )
        self.peak_marker.setZValue(11)
        self.plot.addItem(self.peak_marker)

        # The choosers in one widget, so a view that chooses for several maps can hide them.
        self.toolbar = QWidget()
        top = QHBoxLayout(self.toolbar)
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(QLabel("Image:"))
        top.addWidget(self.image_combo, 1)
        top.addWidget(QLabel("Module:"))
        top.addWidget(self.module_combo, 2)
        top.addWidget(QLabel("Opacity:"))
        top.addWidget(self.opacity_slider)
        top.addWidget(self.opacity_label)
        top.addWidget(self.fit_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.title)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.hover_label)

        self.opacity_slider.valueChanged.connect(self._on_opacity)
        self.fit_button.clicked.connect(self.fit)
        self.image_combo.currentIndexChanged.connect(self._on_image_combo)
        self.module_combo.currentIndexChanged.connect(self._on_module_combo)
        self.view.scene().sigMouseMoved.connect(self._on_mouse_moved)

    # -- model to view ------------------------------------------------------------------
    def set_images(self, image_ids: list[str], current: str | None = None) -> None:
        """List the images to choose from (no signal); keeps ``current`` when it is listed."""
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for image_id in image_ids:
            self.image_combo.addItem(str(image_id), str(image_id))
        index = self.image_combo.findData(current) if current is not None else -1
        self.image_combo.setCurrentIndex(index if index >= 0 else (0 if image_ids else -1))
        self.image_combo.blockSignals(False)

    def current_image(self) -> str | None:
        """The chosen image id."""
        data = self.image_combo.currentData()
        return None if data is None else str(data)

    def current_module(self) -> str:
        """The chosen module name ("model" = the final output)."""
        data = self.module_combo.currentData()
        return FINAL_OUTPUT if data is None else str(data)

    def show_pending(self, image_id: str) -> None:
        """Say that this image's maps are being computed."""
        self.title.setText(f"Computing the patch errors of {image_id}…")

    def set_heatmaps(self, image_id: str, heatmaps: dict[str, object], module: str | None = None) -> None:
        """Show one image's heatmaps (module name -> core Heatmap), on ``module`` if it has one."""
        keep = module or self.current_module()
        self.image_id = image_id
        self.heatmaps = dict(heatmaps)
        self.module_combo.blockSignals(True)
        self.module_combo.clear()
        names = list(self.heatmaps)
        # The final output first: it is what a user of the encoder sees.
        if FINAL_OUTPUT in names:
            names.remove(FINAL_OUTPUT)
            names.insert(0, FINAL_OUTPUT)
        for name in names:
            hm = self.heatmaps[name]
            self.module_combo.addItem(module_title(name), name)
            self.module_combo.setItemData(self.module_combo.count() - 1, f"{name} · {hm.level} level", Qt.ToolTipRole)
        index = self.module_combo.findData(keep)
        if index < 0:
            index = self.module_combo.findData(FINAL_OUTPUT)
        self.module_combo.setCurrentIndex(max(index, 0) if names else -1)
        self.module_combo.blockSignals(False)
        self._show(self.current_module())

    def set_scale_max(self, top: float | None) -> None:
        """Fix the top of the colour scale (None: each map's own peak), before the maps are shown."""
        self.scale_max = top

    def has_heatmap(self, module: str) -> bool:
        """Whether the shown image has a map for this module."""
        return module in self.heatmaps

    def show_module(self, module: str) -> bool:
        """Show this module's map if it has one; False (nothing changes) when it has none."""
        index = self.module_combo.findData(module)
        if index < 0:
            return False
        if index == self.module_combo.currentIndex():
            self._show(module)
        else:
            self.module_combo.setCurrentIndex(index)  # _on_module_combo shows it
        return True

    def clear(self) -> None:
        """Forget every map and image."""
        self.heatmaps = {}
        self.heatmap = None
        self.image_id = None
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.blockSignals(False)
        self.module_combo.blockSignals(True)
        self.module_combo.clear()
        self.module_combo.blockSignals(False)
        self.photo_item.clear()
        self.error_item.clear()
        self.peak_rect.setVisible(False)
        self.peak_marker.setData([], [])
        self.title.setText("Evaluate to see where in the image the error is")
        self.hover_label.setText("Hover over the image for a patch's error")

    def error_image(self) -> np.ndarray | None:
        """The overlay as drawn: one error value per photo pixel (NaN where no patch)."""
        return None if self.heatmap is None else self.error_item.image

    def _show(self, module: str) -> None:
        hm = self.heatmaps.get(module)
        self.heatmap = hm
        if hm is None:
            self.photo_item.clear()
            self.error_item.clear()
            self.peak_rect.setVisible(False)
            self.peak_marker.setData([], [])
            return
        photo = np.asarray(hm.image)
        p = int(hm.layout.patch_size)
        error = upsample(hm.grid, p)
        h, w = photo.shape[:2]
        # The model sees whole patches; the photo is exactly that many pixels, so the map matches it.
        error = error[:h, :w]
        self.photo_item.setImage(photo, autoLevels=False, levels=(0, 255))
        self.photo_item.setRect(QRectF(0, 0, w, h))
        hi = self.scale_max if self.scale_max is not None else colour_top(hm.grid)
        self.error_item.setImage(error, autoLevels=False)
        self.error_item.setRect(QRectF(0, 0, error.shape[1], error.shape[0]))
        self.color_bar.setLevels((0.0, hi))
        # A token-level map's peak is a k x k block of patches: outline all of it.
        left, top, right, bottom = hm.peak_box() if hasattr(hm, "peak_box") else hm.layout.patch_box(int(hm.peak_patch))
        self.peak_rect.setRect(QRectF(left, top, right - left, bottom - top))
        self.peak_rect.setVisible(True)
        self.peak_marker.setData([(left + right) / 2], [(top + bottom) / 2])
        self.fit()
        rows, cols = np.asarray(hm.grid).shape
        px, py = (int(v) for v in hm.peak_xy)
        unit = "patch" if hm.level == "patch" else "soft token (k×k patches)"
        self.title.setText(
            f"{module_title(module)} on {hm.image_id} · per {unit} · {cols}×{rows} patches, {w}×{h} px · "
            f"peak {fmt_float(hm.row_error[int(hm.peak_row)])} at patch x {px}, y {py} (outlined)"
        )

    def fit(self) -> None:
        """Fit the photo in the view, and keep it fitted as the view is resized or first shown.

        A one-off autoRange while the tab is hidden fits a view of the wrong size (the photo
        ends up a speck once shown); auto-range stays on until the user pans or zooms."""
        self.vb.autoRange(padding=0.02)
        self.vb.enableAutoRange()  # autoRange() turned it off

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        if self.heatmap is not None and any(self.vb.autoRangeEnabled()):
            self.vb.autoRange(padding=0.02)

    # -- view to model ------------------------------------------------------------------
    def _on_opacity(self, value: int) -> None:
        self.error_item.setOpacity(value / 100)
        self.opacity_label.setText(f"{value}%")

    def _on_image_combo(self, _index: int) -> None:
        image_id = self.current_image()
        if image_id is not None:
            self.sigImageChosen.emit(image_id)

    def _on_module_combo(self, _index: int) -> None:
        module = self.current_module()
        self._show(module)
        self.sigModuleChosen.emit(module)

    def describe_pixel(self, x: float, y: float) -> str | None:
        """The hover text for a point in photo pixels; None outside the patches."""
        hm = self.heatmap
        if hm is None:
            return None
        p = int(hm.layout.patch_size)
        grid = np.asarray(hm.grid)
        if x < 0 or y < 0:
            return None
        col, row = int(x // p), int(y // p)
        if row >= grid.shape[0] or col >= grid.shape[1] or not np.isfinite(grid[row, col]):
            return None
        return f"patch x {col}, y {row} · relative error {fmt_float(grid[row, col])}"

    def _on_mouse_moved(self, scene_pos) -> None:
        if self.heatmap is None or not self.vb.sceneBoundingRect().contains(scene_pos):
            return
        point = self.vb.mapSceneToView(scene_pos)
        text = self.describe_pixel(point.x(), point.y())
        if text is not None:
            self.hover_label.setText(text)
