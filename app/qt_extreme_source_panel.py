"""Where an observer's extreme came from: the calibration image that set its min or max, with the patches
outlined, and the button that excludes that image and recalibrates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import (
    QButtonGroup,
    QGraphicsRectItem,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import QtTaskProgress, error_text, fmt_float
from app.qt_observer_table import MAX_COLOR, MIN_COLOR
from app.tab_state import ImageSnapshot, RangesState


class QtExtremeSourcePanel(QWidget):
    """Shows the ExtremeLocation of the selected observer's min or max, looked up in the worker one at a
    time (the last one asked for wins) and kept in ``state.locations`` for the statistics on screen."""

    sigExcludeImage = Signal(str, str)  # the image's path (or id), its label

    def __init__(self, state: RangesState, submit: Callable[..., Any], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("sourcePanel")
        self.state = state
        self._submit = submit
        self.session: Any = None
        self.images = ImageSnapshot()
        self._locate_task = None
        self.busy = False  # a recalibration runs: no second exclude meanwhile
        self.location = None  # the ExtremeLocation on screen

        self.max_radio = QRadioButton("Max")
        self.min_radio = QRadioButton("Min")
        self.max_radio.setObjectName("sourceMaxRadio")
        self.min_radio.setObjectName("sourceMinRadio")
        self.max_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.max_radio)
        group.addButton(self.min_radio)
        self.max_radio.toggled.connect(lambda _on: self.request_location())

        self.view = pg.GraphicsLayoutWidget()
        self.view.setObjectName("sourceImageView")
        self.view.setBackground("w")
        self.view.setMinimumSize(220, 180)
        self.vb = self.view.addViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.source_image = pg.ImageItem(axisOrder="row-major")
        self.vb.addItem(self.source_image)
        self._box_items: list[QGraphicsRectItem] = []  # one per patch, exactly the core's boxes
        self._halo_items: list[QGraphicsRectItem] = []  # a ring around them, for the eye only

        self.min_caption = QLabel("")
        self.max_caption = QLabel("")
        for lab in (self.min_caption, self.max_caption):
            lab.setWordWrap(True)
            lab.setTextInteractionFlags(Qt.TextSelectableByMouse)
            lab.setStyleSheet("color: palette(dark); font-size: 11px;")
        self.caption = QLabel("Select an activation observer to see the image that set its range.")
        self.caption.setObjectName("sourceCaption")
        self.caption.setWordWrap(True)
        self.caption.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.exclude_button = QPushButton("Exclude this image and recalibrate")
        self.exclude_button.setObjectName("excludeAndRecalibrateButton")
        self.exclude_button.setToolTip(
            "Mark the image that set this extreme as excluded and calibrate again on the others "
            "(Cancel restores the current statistics)"
        )
        self.exclude_button.setEnabled(False)
        self.exclude_button.clicked.connect(self.exclude_current_image)
        self.recal_progress = QtTaskProgress(cancel_name="recalibrateCancelButton")

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        head = QHBoxLayout()
        title = QLabel("Image that set the")
        title.setStyleSheet("font-weight: 600;")
        head.addWidget(title)
        head.addWidget(self.max_radio)
        head.addWidget(self.min_radio)
        head.addStretch(1)
        layout.addLayout(head)
        layout.addWidget(self.view, 1)
        sources = QHBoxLayout()
        for text, caption in (("max:", self.max_caption), ("min:", self.min_caption)):
            label = QLabel(text)
            label.setStyleSheet("color: palette(dark); font-size: 11px;")
            sources.addWidget(label)
            sources.addWidget(caption, 1)
        layout.addLayout(sources)
        layout.addWidget(self.caption)
        layout.addWidget(self.exclude_button)
        layout.addWidget(self.recal_progress)
        # Long names (one unbreakable word) would widen the pane on every selection: the texts wrap
        # within the width the user gave the pane instead of setting it.
        for label in (self.min_caption, self.max_caption, self.caption):
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
            label.setMinimumWidth(1)

    def set_context(self, session, images: ImageSnapshot) -> None:
        """The session to ask and its images (ids, paths, statuses) as last announced."""
        self.session = session
        self.images = images

    def which(self) -> str:
        """The extreme asked for: "min" or "max"."""
        return "min" if self.min_radio.isChecked() else "max"

    def show_record(self, rec) -> None:
        """Captions for an observer's min and max sources, then its chosen extreme's image."""
        for caption, source in ((self.min_caption, rec.min_source), (self.max_caption, rec.max_source)):
            if isinstance(source, (list, tuple)):
                # per-channel weights: one source per channel; they are all "weights"
                source = source[0] if source else None
            text = "" if source is None else str(source)
            caption.setText(text or "—")
            caption.setToolTip(self.images.path_for(text) or text)
        self.request_location()

    def clear_source(self, text: str) -> None:
        """No image on screen; say why."""
        self.location = None
        self.source_image.clear()
        self._set_boxes([], MAX_COLOR)
        self.caption.setText(text)
        self.exclude_button.setEnabled(False)

    def request_location(self) -> None:
        """Ask the core where the selected observer's min or max occurred (one lookup at a time)."""
        rec = self.state.selected_record()
        if rec is None:
            return
        which = self.which()
        source = rec.min_source if which == "min" else rec.max_source
        if isinstance(source, (list, tuple)):
            source = source[0] if source else None
        if rec.kind == "weight" or source == "weights":
            self.state.wanted = None
            self.clear_source(f"The {which} of {rec.name} is set by the weights, not by an image.")
            return
        if not source:
            self.state.wanted = None
            self.clear_source(f"{rec.name} has seen no image yet.")
            return
        key = (rec.name, which)
        self.state.wanted = key
        if key in self.state.locations:
            self._show_location(self.state.locations[key])
            return
        self.caption.setText(f"Finding where the {which} of {rec.name} occurred in {source}…")
        if self._locate_task is None:
            self._submit_locate(key)

    def _submit_locate(self, key: tuple[str, str]) -> None:
        session = self.session
        if session is None:
            return
        name, which = key
        generation = self.state.generation

        def work():
            return generation, key, session.locate_extreme(name, which=which)

        self._locate_task = self._submit(
            "locating extreme",
            work,
            takes_progress=False,
            on_done=self._on_located,
            on_error=lambda exc, k=key: self._on_locate_failed(k, exc),
        )

    def _next_location(self) -> None:
        wanted = self.state.wanted
        if wanted is None:
            return
        if wanted in self.state.locations:
            self._show_location(self.state.locations[wanted])
        else:
            self._submit_locate(wanted)

    def _on_located(self, payload) -> None:
        generation, key, location = payload
        self._locate_task = None
        if generation == self.state.generation:  # statistics from before a recalibration are stale
            self.state.locations[key] = location
        self._next_location()

    def _on_locate_failed(self, key: tuple[str, str], exc: BaseException) -> None:
        self._locate_task = None
        if self.state.wanted == key:
            self.clear_source(f"Cannot locate the {key[1]} of {key[0]}: {error_text(exc)}")
            return
        self._next_location()

    def _set_boxes(self, boxes, color: str, image_size: tuple[int, int] | None = None) -> None:
        for item in self._box_items + self._halo_items:
            self.vb.removeItem(item)
        self._box_items = []
        self._halo_items = []
        pen = QPen(QColor(color))
        pen.setWidthF(2.0)
        pen.setCosmetic(True)
        fill = QColor(color)
        fill.setAlpha(110)
        for left, top, right, bottom in boxes:
            item = QGraphicsRectItem(QRectF(float(left), float(top), float(right - left), float(bottom - top)))
            item.setPen(pen)
            item.setBrush(fill)
            item.setZValue(10)
            self.vb.addItem(item)
            self._box_items.append(item)
        if boxes and image_size is not None:
            # One 16-pixel patch is a speck on a large image: ring it so the eye finds it.
            left = min(b[0] for b in boxes)
            top = min(b[1] for b in boxes)
            right = max(b[2] for b in boxes)
            bottom = max(b[3] for b in boxes)
            margin = max(6.0, 0.05 * max(image_size))
            ring = QRectF(left - margin, top - margin, right - left + 2 * margin, bottom - top + 2 * margin)
            for width, shade, style in ((5.0, QColor(255, 255, 255, 200), Qt.SolidLine), (2.0, QColor(color), Qt.DashLine)):
                halo_pen = QPen(shade)
                halo_pen.setWidthF(width)
                halo_pen.setCosmetic(True)
                halo_pen.setStyle(style)
                halo = QGraphicsRectItem(ring)
                halo.setPen(halo_pen)
                halo.setZValue(9)
                self.vb.addItem(halo)
                self._halo_items.append(halo)

    def shown_boxes(self) -> list[tuple[float, float, float, float]]:
        """The highlighted pixel boxes (left, top, right, bottom) on the source image."""
        out = []
        for item in self._box_items:
            r = item.rect()
            out.append((r.left(), r.top(), r.right(), r.bottom()))
        return out

    def _show_location(self, loc) -> None:
        self.location = loc
        image = getattr(loc, "image", None)
        color = MIN_COLOR if loc.which == "min" else MAX_COLOR
        if image is None:
            self.source_image.clear()
            self._set_boxes([], color)
        else:
            image = np.asarray(image)
            self.source_image.setImage(image, autoLevels=False, levels=(0, 255))
            h, w = image.shape[:2]
            self._set_boxes(list(loc.boxes or []), color, (h, w))
            self.vb.setRange(xRange=(0, w), yRange=(0, h), padding=0.02)
        n = len(loc.patches) if getattr(loc, "patches", None) is not None else len(loc.boxes or [])
        where = f"row {loc.row}" + (f" ({loc.level} level)" if getattr(loc, "level", None) else "")
        status = self.images.status_of(str(loc.path))
        excluded = " · <b>excluded</b>" if status == "excluded" else ""
        self.caption.setText(
            f"<span style='color:{color}; font-weight:600'>{loc.which} {fmt_float(loc.value)}</span> "
            f"in <b>{loc.image_id}</b> at {where}; {n} patch{'es' if n != 1 else ''} outlined{excluded}"
        )
        self.caption.setToolTip(str(loc.path))
        self.exclude_button.setEnabled(bool(loc.image_id) and not self.busy and status != "excluded")

    def exclude_current_image(self) -> None:
        """Ask to exclude the image on screen and recalibrate without it."""
        loc = self.location
        if loc is None or not loc.image_id:
            return
        self.sigExcludeImage.emit(str(loc.path or loc.image_id), str(loc.image_id))
