"""Small widgets and formatting shared by the tabs."""

from __future__ import annotations

import math
import time

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from app.events import SessionSubscriptions
from core.errors import CancelledError, PTQStudioError


def error_text(exc: BaseException) -> str:
    """One line for a failure: the core's own message, or the type and text of a bug."""
    if isinstance(exc, PTQStudioError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def fmt_float(value, digits: int = 4) -> str:
    """Compact number for tables: 4 significant digits, scientific when tiny or huge."""
    if value is None:
        return ""
    arr = np.asarray(value)
    if arr.size == 0:
        return ""
    if arr.size > 1:
        return f"{fmt_float(arr.min(), digits)} … {fmt_float(arr.max(), digits)}"
    v = float(arr.reshape(-1)[0])
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def scalar(value, reduce: str = "max") -> float:
    """A sortable float for a scalar or per-channel value (min or max over channels)."""
    if value is None:
        return float("nan")
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return float("nan")
    return float(arr.min() if reduce == "min" else arr.max())


def plural(n: int, word: str) -> str:
    """'1 image', '3 images'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def fmt_bytes(n: int) -> str:
    """Human file size."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def fmt_duration(seconds: float) -> str:
    """m:ss or h:mm:ss."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def calibration_text(calibration) -> str:
    """One line for the calibration in force: "3/3 images in 1.2 s", or a loaded session's."""
    if calibration is None:
        return "a loaded session"
    secs = float(getattr(calibration, "seconds", 0.0) or 0.0)
    tail = " (cancelled)" if calibration.cancelled else ""
    return f"{calibration.images_done}/{calibration.total_images} images in {secs:.1f} s{tail}"


class SteadyHeight:
    """Mixin for a word-wrapped QLabel whose height only grows with its texts, never shrinks back.

    Texts that change while results stream in (the end-to-end line, the divergence banner) would
    otherwise change the label's height now and then, and every change re-lays out the whole tab:
    each chart below is resized and the window repainted, 30-40 ms apiece on e2b (bench/bench_gui.py)."""

    def setText(self, text: str) -> None:  # noqa: N802 - Qt override
        super().setText(text)  # type: ignore[misc]
        width = self.width()  # type: ignore[attr-defined]
        if width > 0:
            need = self.heightForWidth(width)  # type: ignore[attr-defined]
            if need > self.minimumHeight():  # type: ignore[attr-defined]
                self.setMinimumHeight(need)  # type: ignore[attr-defined]


class QtSteadyLabel(SteadyHeight, QLabel):
    """A word-wrapped label whose height only grows (SteadyHeight), at least `lines` lines from the start."""

    def __init__(self, text: str = "", lines: int = 1) -> None:
        super().__init__(text)
        self.setWordWrap(True)
        self.setMinimumHeight(lines * self.fontMetrics().lineSpacing())


class QtMessageLine(QLabel):
    """One line in a tab that says what happened last (info or error), never modal."""

    _STYLES = {
        "info": "color: palette(text);",
        "ok": "color: #1b7f3b;",
        "error": "color: #b00020; font-weight: 600;",
    }

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.level = "info"

    def show_message(self, text: str, level: str = "info") -> None:
        """Show ``text``; level is info, ok or error."""
        self.level = level
        self.setStyleSheet(self._STYLES.get(level, ""))
        self.setText(text)
        self.setToolTip(text)


class QtTaskProgress(QWidget):
    """Progress bar with count and ETA plus a Cancel button."""

    def __init__(self, parent: QWidget | None = None, cancel_name: str = "") -> None:
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setFormat("idle")
        self.bar.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        if cancel_name:
            self.cancel_button.setObjectName(cancel_name)
        self.cancel_button.setEnabled(False)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.cancel_button)
        self._t0 = 0.0
        self.unit = "items"

    def begin(self, total: int = 0, unit: str = "items", text: str = "starting…") -> None:
        """Reset for a new run."""
        self._t0 = time.monotonic()
        self.unit = unit
        self.bar.setRange(0, max(total, 0))
        self.bar.setValue(0)
        self.bar.setFormat(text)
        self.cancel_button.setEnabled(True)

    def mark_started(self) -> None:
        """The worker has started the task: measure the rate from now, not from begin().

        A task queued behind another (a Calibrate behind a run being cancelled) would otherwise
        count the wait as work and show an ETA of hours."""
        self._t0 = time.monotonic()

    def update_progress(self, done: int, total: int, message: str = "") -> None:
        """Show done/total, the rate-based ETA and the core's message."""
        total = max(int(total), 0)
        done = max(0, min(int(done), total)) if total else int(done)
        self.bar.setRange(0, total)
        self.bar.setValue(done)
        elapsed = time.monotonic() - self._t0
        eta = ""
        if total and done:
            remaining = elapsed / done * (total - done)
            eta = f" · ETA {fmt_duration(remaining)}"
        count = f"{done}/{total} {self.unit}" if total else f"{done} {self.unit}"
        tail = f" · {message}" if message else ""
        # QProgressBar treats % as a placeholder, so escape it.
        self.bar.setFormat((count + eta + tail).replace("%", "%%"))

    def cancel_task(self, task, text: str = "cancelling…") -> None:
        """Ask a runner task to stop at its next check and show that it was asked."""
        if task is None:
            return
        task.token.cancel()
        self.bar.setFormat(text)
        self.cancel_button.setEnabled(False)

    def end(self, text: str) -> None:
        """Stop; keep the bar where it was and say why."""
        self.cancel_button.setEnabled(False)
        if self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
        self.bar.setFormat(text.replace("%", "%%"))


def end_task_with_error(exc: BaseException, progress: QtTaskProgress, message: QtMessageLine, host, cancelled: str) -> None:
    """A tab's worker error path: a cancel is said calmly; a failure in the tab and in the window's status bar."""
    if isinstance(exc, CancelledError):
        progress.end("cancelled")
        message.show_message(cancelled)
        return
    progress.end("failed")
    message.show_message(error_text(exc), "error")
    host.show_error(exc)


def results_table(columns, name: str, row_numbers: bool = False) -> QTableWidget:
    """A read-only table of result rows: whole-row single selection, compact rows, last column stretched."""
    table = QTableWidget(0, len(columns))
    table.setObjectName(name)
    table.setHorizontalHeaderLabels(list(columns))
    table.verticalHeader().setVisible(row_numbers)
    table.verticalHeader().setDefaultSectionSize(22)
    table.setEditTriggers(QAbstractItemView.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectRows)
    table.setSelectionMode(QAbstractItemView.SingleSelection)
    table.setAlternatingRowColors(True)
    table.horizontalHeader().setStretchLastSection(True)
    return table


# Where a SortKeyItem keeps the value it sorts by.
SORT_KEY_ROLE = Qt.UserRole + 40


class SortKeyItem(QTableWidgetItem):
    """A table cell that sorts by SORT_KEY_ROLE (numbers as numbers, missing values last)."""

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a, b = self.data(SORT_KEY_ROLE), other.data(SORT_KEY_ROLE)
        if isinstance(a, float) or isinstance(b, float):
            a = float("inf") if a is None or a != a else float(a)
            b = float("inf") if b is None or b != b else float(b)
            return a < b
        return str(a) < str(b)


class QtSessionTab(QWidget):
    """A tab of the main window that follows its session: the host it asks to run work, the session
    it shows, its event subscriptions and its one running task (each tab adds its own view state)."""

    def __init__(self, host) -> None:
        super().__init__()
        self._host = host
        self._session = None
        self._subscriptions = SessionSubscriptions()
        self._task = None
