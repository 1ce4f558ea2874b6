"""What the window remembers between runs: dialog folders, recent sessions, the export path."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths
from PySide6.QtWidgets import QMainWindow

from core.models import SPECS

MAX_RECENT = 8


class WindowSettings:
    """The window's QSettings, read and written through named methods."""

    def __init__(self, settings: QSettings) -> None:
        self.qsettings = settings

    def last_folder(self, key: str) -> str:
        """The folder a dialog of this kind opened last (home by default)."""
        home = QStandardPaths.writableLocation(QStandardPaths.HomeLocation) or str(Path.home())
        value = self.qsettings.value(f"folders/{key}", home)
        return str(value) if value and Path(str(value)).is_dir() else home

    def remember_folder(self, key: str, folder: str) -> None:
        """Remember the folder of a dialog for next time."""
        self.qsettings.setValue(f"folders/{key}", folder)

    def default_export_path(self, model_spec: str) -> str:
        """Where an export goes unless the user chose: named for the model, in the folder of the
        last export, else Documents, else the folder the app was started from (home last)."""
        name = model_spec if model_spec in SPECS else (Path(model_spec).name or "model")
        folder = self.qsettings.value("folders/export")
        if not (folder and Path(str(folder)).is_dir()):
            documents = QStandardPaths.writableLocation(QStandardPaths.DocumentsLocation)
            cwd = Path.cwd()
            if documents and Path(documents).is_dir():
                folder = documents
            elif os.access(cwd, os.W_OK) and cwd != Path(cwd.anchor):
                folder = str(cwd)
            else:
                folder = self.last_folder("export")
        return str(Path(str(folder)) / f"gemma4_vision_{name}.circle")

    def recent_sessions(self) -> list[str]:
        """Saved or opened session folders, newest first."""
        value = self.qsettings.value("recentSessions", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def add_recent(self, folder: str) -> None:
        """Put a session folder first in the recent list."""
        items = [folder] + [f for f in self.recent_sessions() if f != folder]
        self.qsettings.setValue("recentSessions", items[:MAX_RECENT])

    def restore_window(self, window: QMainWindow) -> bool:
        """Put back the window's saved geometry and dock layout; False when none was saved."""
        geometry = self.qsettings.value("window/geometry")
        state = self.qsettings.value("window/state")
        if geometry is not None:
            window.restoreGeometry(geometry)
        if state is not None:
            window.restoreState(state)
        return geometry is not None

    def save_window(self, window: QMainWindow) -> None:
        """Remember the window's geometry and dock layout."""
        self.qsettings.setValue("window/geometry", window.saveGeometry())
        self.qsettings.setValue("window/state", window.saveState())
        self.qsettings.sync()
