"""The main window's permanent status-bar fields: model, parameters, images, mode, memory."""

from __future__ import annotations

import os

import psutil
from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QLabel, QStatusBar

from app.qt_common import fmt_bytes


class QtStatusFields(QObject):
    """Labels added to a status bar; the memory field updates itself every two seconds."""

    def __init__(self, bar: QStatusBar) -> None:
        super().__init__(bar)
        self.model = QLabel()
        self.params = QLabel()
        self.images = QLabel()
        self.mode = QLabel()
        self.memory = QLabel()
        for label in (self.model, self.params, self.images, self.mode, self.memory):
            label.setContentsMargins(6, 0, 6, 0)
            bar.addPermanentWidget(label)
        self._process = psutil.Process(os.getpid())
        self._timer = QTimer(self)
        self._timer.setInterval(2000)
        self._timer.timeout.connect(self.update_memory)
        self._timer.start()
        self.update_memory()

    def update_memory(self) -> None:
        """Show the process's resident memory."""
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            return
        self.memory.setText(f"memory {fmt_bytes(rss)}")

    def show(self, info: dict, fallback_name: str, statuses: list[str], mode: str) -> None:
        """Fill the model, parameters, images and mode fields."""
        self.model.setText(f"model: {info.get('name', fallback_name)}")
        params = info.get("parameters")
        self.params.setText(f"{params / 1e6:.2f} M params" if isinstance(params, (int, float)) else "")
        self.images.setText(f"images: {len(statuses)} ({statuses.count('rejected')} rejected)" if statuses else "images: 0")
        self.mode.setText(f"mode: {mode}")

    def stop(self) -> None:
        """Stop the memory timer (shutdown)."""
        self._timer.stop()
