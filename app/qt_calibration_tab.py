"""Calibration tab: drop zone, thumbnail grid with per-image status, Calibrate/Cancel."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import (
    QObject,
    QRunnable,
    QSize,
    Qt,
    QThreadPool,
    Signal,
    Slot,
)
from PySide6.QtGui import (
    QColor,
    QIcon,
    QImage,
    QImageReader,
    QKeySequence,
    QPainter,
    QPen,
    QPixmap,
    QShortcut,
    QStandardItem,
    QStandardItemModel,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListView,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import QtMessageLine, QtSessionTab, QtTaskProgress, error_text, plural
from app.qt_drop_zone import QtDropZone
from app.qt_evaluation_marks import EvaluationMarks

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

THUMB = 96
PATH_ROLE = Qt.UserRole + 1
STATUS_ROLE = Qt.UserRole + 2
REASON_ROLE = Qt.UserRole + 3
ID_ROLE = Qt.UserRole + 4
EVAL_ROLE = Qt.UserRole + 5  # the photo is in the session's evaluation set

STATUS_COLORS = {
    "ok": QColor("#2e7dd7"),
    "used": QColor("#1b9e4b"),
    "rejected": QColor("#d32f2f"),
    "excluded": QColor("#7b7b7b"),
}
IMAGE_FILTER = "Images (*.jpg *.jpeg *.png *.bmp *.webp *.gif *.tif *.tiff);;All files (*)"


PREVIEW = 256


class _ThumbSignals(QObject):
    sigThumbnail = Signal(str, QImage, int)  # path, image, requested size


class _ThumbJob(QRunnable):
    """Decode a small version of one image in the pool (QImage is safe off the UI thread)."""

    def __init__(self, path: str, signals: _ThumbSignals, size: int = THUMB) -> None:
        super().__init__()
        self.path = path
        self.signals = signals
        self.size = size

    def run(self) -> None:
        reader = QImageReader(self.path)
        reader.setAutoTransform(True)
        size = reader.size()
        if size.isValid() and size.width() > 0 and size.height() > 0:
            # Let the decoder scale (JPEG decodes at 1/2, 1/4, 1/8 for free).
            reader.setScaledSize(size.scaled(self.size * 2, self.size * 2, Qt.KeepAspectRatio))
        image = reader.read()
        if not image.isNull():
            image = image.scaled(self.size, self.size, Qt.KeepAspectRatio, Qt.SmoothTransformation)
        self.signals.sigThumbnail.emit(self.path, image, self.size)


@dataclass
class CalibrationRun:
    """How the tab's last calibration run ended (Qt-free view state)."""

    result: Any = None  # the run's SessionCalibration
    in_force: Any = None  # the session's calibration in force afterwards
    calibrated: bool = False  # whether the session holds statistics afterwards

    @property
    def restored(self) -> bool:
        """The run was cancelled and the core put the earlier calibration back."""
        r = self.result
        return bool(r is not None and r.cancelled and self.calibrated and self.in_force is not None and self.in_force is not r)


class QtCalibrationTab(QtSessionTab):
    """Images in, statistics out: the first thing a user does."""

    sigCalibrated = Signal(object)  # CalibrationResult

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__(host)
        self.last_run = CalibrationRun()
        self._thumbs: dict[str, QImage] = {}
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)  # torch owns the cores during calibration
        self._thumb_signals = _ThumbSignals()
        self._thumb_signals.sigThumbnail.connect(self._on_thumbnail)

        self.drop_zone = QtDropZone()
        self.drop_zone.sigPathsDropped.connect(self._on_paths_dropped)
        self.drop_zone.setStyleSheet(
            "#dropZone { border: 2px dashed palette(mid); border-radius: 8px; }"
            "#dropZone[dragActive=\"true\"] { border-color: #2e7dd7; background: rgba(46,125,215,0.08); }"
        )
        hint = QLabel("Drop images or folders here — JPEG, PNG, WebP, BMP")
        hint.setAlignment(Qt.AlignCenter)
        hint.setStyleSheet("color: palette(dark); font-size: 13px; padding: 6px;")
        self.add_button = QPushButton("Add images…")
        self.add_button.setToolTip("Choose image files (Ctrl+I)")
        self.add_folder_button = QPushButton("Add folder…")
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip("Remove the selected images (Delete)")
        self.clear_button = QPushButton("Clear")
        self.count_label = QLabel("")
        self.count_label.setStyleSheet("color: palette(dark);")

        self.model = QStandardItemModel(self)
        self.grid = QListView()
        self.grid.setObjectName("thumbnailGrid")
        self.grid.setModel(self.model)
        self.grid.setViewMode(QListView.IconMode)
        self.grid.setIconSize(QSize(THUMB, THUMB))
        self.grid.setGridSize(QSize(THUMB + 36, THUMB + 38))
        self.grid.setResizeMode(QListView.Adjust)
        self.grid.setMovement(QListView.Static)
        self.grid.setUniformItemSizes(True)
        self.grid.setWordWrap(True)
        self.grid.setSpacing(4)
        self.grid.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.grid.setEditTriggers(QAbstractItemView.NoEditTriggers)
        # Drops on the grid bubble up to the drop zone, its parent.
        self.grid.setAcceptDrops(False)
        self.grid.viewport().setAcceptDrops(False)
        self.grid.setDragEnabled(False)
        self.marks = EvaluationMarks(
            self.grid, PATH_ROLE, host.submit, lambda text: self.message.show_message(text, "error")
        )

        self._preview_path: str | None = None
        self.preview_image = QLabel("Select an image")
        self.preview_image.setObjectName("imagePreview")
        self.preview_image.setAlignment(Qt.AlignCenter)
        self.preview_image.setMinimumSize(PREVIEW, PREVIEW)
        self.preview_image.setStyleSheet("background: palette(base); border: 1px solid palette(mid); color: palette(dark);")
        self.preview_name = QLabel("")
        self.preview_name.setStyleSheet("font-weight: 600;")
        self.preview_name.setWordWrap(True)
        self.preview_details = QLabel("")
        self.preview_details.setWordWrap(True)
        self.preview_details.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.preview_details.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        preview = QWidget()
        preview.setMinimumWidth(PREVIEW + 16)
        pl = QVBoxLayout(preview)
        pl.setContentsMargins(4, 0, 0, 0)
        pl.addWidget(self.preview_image)
        pl.addWidget(self.preview_name)
        pl.addWidget(self.preview_details, 1)

        top = QHBoxLayout()
        top.addWidget(hint, 1)
        top.addWidget(self.add_button)
        top.addWidget(self.add_folder_button)
        split = QSplitter(Qt.Horizontal)
        split.addWidget(self.grid)
        split.addWidget(preview)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 0)
        split.setSizes([800, PREVIEW + 24])
        zone_layout = QVBoxLayout(self.drop_zone)
        zone_layout.setContentsMargins(8, 6, 8, 8)
        zone_layout.addLayout(top)
        zone_layout.addWidget(split, 1)

        self.calibrate_button = QPushButton("Calibrate")
        self.calibrate_button.setObjectName("calibrateButton")
        self.calibrate_button.setDefault(True)
        self.calibrate_button.setMinimumWidth(110)
        self.calibrate_button.setStyleSheet("QPushButton#calibrateButton { font-weight: 600; padding: 4px 14px; }")
        self.progress = QtTaskProgress(cancel_name="cancelButton")
        self.cancel_button = self.progress.cancel_button
        self.message = QtMessageLine()

        row = QHBoxLayout()
        row.addWidget(self.remove_button)
        row.addWidget(self.clear_button)
        row.addWidget(self.count_label)
        row.addWidget(self.marks.count_label)
        row.addStretch(1)
        actions = QHBoxLayout()
        actions.addWidget(self.calibrate_button)
        actions.addWidget(self.progress, 1)

        layout = QVBoxLayout(self)
        layout.addWidget(self.drop_zone, 1)
        layout.addLayout(row)
        layout.addLayout(actions)
        layout.addWidget(self.message)

        self.add_button.clicked.connect(self.choose_images)
        self.add_folder_button.clicked.connect(self.choose_folder)
        self.remove_button.clicked.connect(self.remove_selected)
        self.clear_button.clicked.connect(self.clear)
        self.calibrate_button.clicked.connect(self.calibrate)
        self.cancel_button.clicked.connect(self.cancel)
        QShortcut(QKeySequence.Delete, self.grid, activated=self.remove_selected)
        self.grid.selectionModel().currentChanged.connect(self._on_current_image)
        self._update_counts()

    # -- the session ---------------------------------------------------------------------
    def set_session(self, session) -> None:
        """Show this session's images and follow its changes from now on."""
        self._session = session
        # A calibration or a new config changes statuses ("used"), so each redraws the grid too.
        self._subscriptions.replace(
            getattr(session, "events", None),
            {
                "images_changed": self._on_images_changed,
                "calibrated": self._on_images_changed,
                "config_changed": self._on_images_changed,
                "evaluation_changed": self._on_images_changed,
            },
        )
        self._on_images_changed()

    def _on_images_changed(self, *_args) -> None:
        # Copied here, on the GUI thread, so the grid never holds entries the worker mutates.
        entries = [copy.copy(e) for e in tuple(getattr(self._session, "images", ()))]
        self.marks.refresh(self._session)
        self.show_entries(entries)

    def shutdown(self) -> None:
        """Stop following the session and wait for the thumbnail decoder."""
        self._subscriptions.clear()
        self._pool.clear()
        self._pool.waitForDone(5000)

    # -- adding and removing -------------------------------------------------------------
    def choose_images(self) -> None:
        """Open the file dialog and add the chosen files."""
        start = self._host.last_folder("images")
        files, _ = QFileDialog.getOpenFileNames(self, "Add calibration images", start, IMAGE_FILTER)
        if files:
            self._host.remember_folder("images", str(Path(files[0]).parent))
            self.add_paths([Path(f) for f in files])

    def choose_folder(self) -> None:
        """Open the folder dialog and add every image under it."""
        start = self._host.last_folder("images")
        folder = QFileDialog.getExistingDirectory(self, "Add a folder of calibration images", start)
        if folder:
            self._host.remember_folder("images", folder)
            self.add_paths([Path(folder)])

    @Slot(list)
    def _on_paths_dropped(self, paths: list[Path]) -> None:
        self.add_paths(paths)

    def add_paths(self, paths: list[Path]) -> None:
        """Ask the session to add files/folders; bad files come back as rejected, not errors."""
        session = self._session
        if session is None:
            self.message.show_message("The model is still loading; the images will be added when it is ready.")
            self._host.defer(lambda: self.add_paths(paths))
            return
        paths = [Path(p) for p in paths]
        self.message.show_message(f"Reading {len(paths)} item(s)…")

        self._host.submit(
            "add images", lambda: session.add_images(paths), takes_progress=False, on_done=self._on_added, on_error=self._on_error
        )

    def _on_added(self, result) -> None:
        # The grid follows session.events.images_changed; this only says what happened.
        accepted, rejected = len(result.accepted), len(result.rejected)
        if rejected:
            first = result.rejected[0]
            self.message.show_message(
                f"Added {accepted} image(s); rejected {rejected}: {Path(first.path).name} — {first.reason}"
                + (" (hover a red thumbnail for each reason)" if rejected > 1 else ""),
                "error",
            )
        else:
            self.message.show_message(f"Added {accepted} image(s).", "ok")
        self._host.refresh_status()

    def remove_selected(self) -> None:
        """Remove the selected images from the session."""
        paths = [Path(i.data(PATH_ROLE)) for i in self.grid.selectionModel().selectedIndexes()]
        session = self._session
        if not paths or session is None:
            return

        self._host.submit("remove images", lambda: session.remove_images(paths), takes_progress=False, on_error=self._on_error)

    def clear(self) -> None:
        """Remove every image from the session."""
        session = self._session
        if session is None:
            return

        self._host.submit("clear images", session.clear_images, takes_progress=False, on_error=self._on_error)

    # -- the grid -------------------------------------------------------------------------
    def show_entries(self, entries: list) -> None:
        """Make the grid show exactly these ImageEntry objects, in order."""
        wanted = [str(e.path) for e in entries]
        existing = {self.model.item(r).data(PATH_ROLE): r for r in range(self.model.rowCount())}
        if list(existing) != wanted:
            self.model.clear()
            existing = {}
        names = [Path(str(e.path)).name for e in entries]
        for entry in entries:
            key = str(entry.path)
            if key in existing:
                item = self.model.item(existing[key])
            else:
                item = QStandardItem(self._caption(Path(key), names))
                item.setData(key, PATH_ROLE)
                item.setEditable(False)
                self.model.appendRow(item)
                if key not in self._thumbs:
                    self._pool.start(_ThumbJob(key, self._thumb_signals))
            item.setData(entry.status, STATUS_ROLE)
            item.setData(entry.reason or "", REASON_ROLE)
            item.setData(getattr(entry, "image_id", ""), ID_ROLE)
            item.setData(key in self.marks.paths, EVAL_ROLE)
            self._decorate(item)
        current = self.grid.currentIndex()
        self._show_preview(self.model.itemFromIndex(current) if current.isValid() else None)
        self._update_counts()

    @staticmethod
    def _caption(path: Path, names: list[str]) -> str:
        # Two files of the same name from different folders must not look the same in the grid.
        if names.count(path.name) > 1:
            return f"{path.parent.name}/{path.name}"
        return path.name

    def entries_by_status(self) -> dict[str, str]:
        """Map path -> status as shown (for tests and the status bar)."""
        return {self.model.item(r).data(PATH_ROLE): self.model.item(r).data(STATUS_ROLE) for r in range(self.model.rowCount())}

    def thumbnail_for(self, image_id: str) -> QImage | None:
        """The thumbnail of the image with this id, if it is listed and decoded."""
        for r in range(self.model.rowCount()):
            item = self.model.item(r)
            if item.data(ID_ROLE) == image_id:
                return self._thumbs.get(item.data(PATH_ROLE))
        return None

    def path_for(self, image_id: str) -> str | None:
        """The file path of the image with this id."""
        for r in range(self.model.rowCount()):
            item = self.model.item(r)
            if item.data(ID_ROLE) == image_id:
                return item.data(PATH_ROLE)
        return None

    @Slot(str, QImage, int)
    def _on_thumbnail(self, path: str, image: QImage, size: int) -> None:
        if size == PREVIEW:
            if path == self._preview_path:
                self._set_preview_image(image)
            return
        self._thumbs[path] = image
        for r in range(self.model.rowCount()):
            item = self.model.item(r)
            if item.data(PATH_ROLE) == path:
                self._decorate(item)

    def _decorate(self, item: QStandardItem) -> None:
        path = item.data(PATH_ROLE)
        status = item.data(STATUS_ROLE) or "ok"
        reason = item.data(REASON_ROLE) or ""
        color = STATUS_COLORS.get(status, QColor("gray"))
        canvas = QPixmap(THUMB, THUMB)
        canvas.fill(Qt.transparent)
        painter = QPainter(canvas)
        painter.setRenderHint(QPainter.Antialiasing)
        thumb = self._thumbs.get(path)
        if thumb is not None and not thumb.isNull():
            x = (THUMB - thumb.width()) // 2
            y = (THUMB - thumb.height()) // 2
            painter.drawImage(x, y, thumb)
            if status == "rejected":
                painter.fillRect(0, 0, THUMB, THUMB, QColor(211, 47, 47, 90))
            elif status == "excluded":  # left out of calibration by the user: greyed out
                painter.fillRect(0, 0, THUMB, THUMB, QColor(255, 255, 255, 150))
        else:
            painter.fillRect(2, 2, THUMB - 4, THUMB - 4, QColor(0, 0, 0, 20))
            painter.setPen(QColor("#888"))
            painter.drawText(canvas.rect(), Qt.AlignCenter, "no preview" if status == "rejected" else "…")
        # status badge, top-right
        painter.setPen(QPen(Qt.white, 2))
        painter.setBrush(color)
        painter.drawEllipse(THUMB - 22, 4, 18, 18)
        painter.setPen(Qt.white)
        glyph = {"ok": "•", "used": "✓", "rejected": "✕", "excluded": "–"}.get(status, "?")
        painter.drawText(THUMB - 22, 4, 18, 18, Qt.AlignCenter, glyph)
        if item.data(EVAL_ROLE):  # an evaluation photo: the Errors tab's numbers come from it
            painter.setPen(QPen(Qt.white, 2))
            painter.setBrush(QColor("#e08a00"))
            painter.drawRoundedRect(4, THUMB - 22, 18, 18, 4, 4)
            painter.setPen(Qt.white)
            painter.drawText(4, THUMB - 22, 18, 18, Qt.AlignCenter, "E")
        painter.end()
        item.setIcon(QIcon(canvas))
        tip = f"{path}\nstatus: {status}" + ("\nevaluation photo (right-click to change)" if item.data(EVAL_ROLE) else "")
        if reason:
            tip += f"\nreason: {reason}"
        item.setToolTip(tip)
        item.setForeground(color if status in ("rejected", "excluded") else QColor())

    def _on_current_image(self, current, _previous) -> None:
        self._show_preview(self.model.itemFromIndex(current) if current.isValid() else None)

    def _show_preview(self, item: QStandardItem | None) -> None:
        if item is None:
            self._preview_path = None
            self.preview_image.clear()
            self.preview_image.setText("Select an image")
            self.preview_name.setText("")
            self.preview_details.setText("")
            return
        path = item.data(PATH_ROLE)
        status = item.data(STATUS_ROLE) or ""
        reason = item.data(REASON_ROLE) or ""
        self.preview_name.setText(Path(path).name)
        color = STATUS_COLORS.get(status, QColor("gray")).name()
        lines = [f"<span style='color:{color}; font-weight:600'>{status}</span>"]
        if reason:
            lines.append(f"<span style='color:#b00020'>{reason}</span>")
        if item.data(ID_ROLE):
            lines.append(f"id: {item.data(ID_ROLE)}")
        lines.append(f"<span style='color:gray'>{path}</span>")
        self.preview_details.setText("<br>".join(lines))
        if path != self._preview_path:
            self._preview_path = path
            self.preview_image.setText("…")
            self._pool.start(_ThumbJob(path, self._thumb_signals, PREVIEW))

    def _set_preview_image(self, image: QImage) -> None:
        if image.isNull():
            self.preview_image.setPixmap(QPixmap())
            self.preview_image.setText("no preview")
        else:
            self.preview_image.setPixmap(QPixmap.fromImage(image))

    def _update_counts(self) -> None:
        statuses = list(self.entries_by_status().values())
        n_ok = sum(s in ("ok", "used") for s in statuses)
        n_used = statuses.count("used")
        n_bad = statuses.count("rejected")
        n_excluded = statuses.count("excluded")
        self.count_label.setText(
            f"{plural(len(statuses), 'image')} · {n_ok} usable · {n_used} used · {n_bad} rejected"
            + (f" · {n_excluded} excluded" if n_excluded else "")
        )
        self._host.refresh_status()

    # -- calibration ----------------------------------------------------------------------
    def calibrate(self) -> None:
        """Run calibration on the usable images in the worker thread."""
        session = self._session
        if session is None:
            self.message.show_message("The model is still loading.", "error")
            return
        if self._host.settings_pending():
            self.message.show_message("Apply the changed settings first (Apply settings in the panel).", "error")
            return
        statuses = list(self.entries_by_status().values())
        usable = sum(s in ("ok", "used") for s in statuses)
        if usable == 0:
            self.message.show_message("Add at least one usable image before calibrating.", "error")
            return
        self.calibrate_button.setEnabled(False)
        self.progress.begin(usable, "images", "calibrating…")
        self.message.show_message(f"Calibrating on {usable} image(s)…")

        def work(progress, cancel):
            result = session.calibrate(progress=progress, cancel=cancel, batch_size=1)
            # session.calibration is the calibration now in force: the earlier one when a
            # cancelled re-run was rolled back, this run's otherwise.
            return result, session.state, session.calibration

        self._task = self._host.submit(
            "calibrate",
            work,
            on_done=self._on_calibrated,
            on_error=self._on_calibrate_error,
            on_progress=self.progress.update_progress,
            on_started=self.progress.mark_started,
        )

    def cancel(self) -> None:
        """Stop calibration after the current batch; completed batches are kept."""
        self.progress.cancel_task(self._task, "cancelling after the current image…")

    @property
    def restored(self) -> bool:
        """Whether the last run was cancelled and the earlier calibration put back."""
        return self.last_run.restored

    @property
    def running(self) -> bool:
        """Whether calibration is in progress."""
        return self._task is not None

    def _on_calibrated(self, payload) -> None:
        result, state, in_force = payload
        self._task = None
        # A cancelled re-calibration is rolled back by the core: the earlier statistics are in force.
        self.last_run = CalibrationRun(result, in_force, state == "calibrated")
        self._host.refresh_calibrate_enabled()
        secs = getattr(result, "seconds", 0.0) or 0.0
        if self.last_run.restored:
            text = (
                f"Cancelled after {result.images_done}/{result.total_images} images; the earlier calibration "
                f"({in_force.images_done}/{in_force.total_images} images) is restored, unchanged."
            )
            self.progress.end(f"cancelled at {result.images_done}/{result.total_images} · earlier calibration kept")
            self.message.show_message(text, "info")
        elif result.cancelled:
            # Say what the core actually kept rather than what we hope it kept.
            kept = (
                "the statistics of the completed images are kept."
                if state == "calibrated"
                else "the model is left uncalibrated, as before; press Calibrate to run again."
            )
            text = f"Cancelled after {result.images_done}/{result.total_images} images; {kept}"
            self.progress.end(f"cancelled at {result.images_done}/{result.total_images}")
            self.message.show_message(text, "error" if not result.images_done else "info")
        else:
            self.progress.end(f"done: {plural(result.images_done, 'image')} in {secs:.1f} s")
            self.message.show_message(f"Calibrated on {plural(result.images_done, 'image')} in {secs:.1f} s.", "ok")
        self.sigCalibrated.emit(result)

    def _on_calibrate_error(self, exc: BaseException) -> None:
        self._task = None
        self._host.refresh_calibrate_enabled()
        self.progress.end("failed")
        self._on_error(exc)

    def _on_error(self, exc: BaseException) -> None:
        self.message.show_message(error_text(exc), "error")
        self._host.show_error(exc)
