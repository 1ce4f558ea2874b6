"""The Calibration tab's evaluation set: which photos the Errors tab's numbers come from, a count, and the
grid's context-menu items that change it (the Session does the choosing; this only shows and asks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Qt
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QLabel, QListView

from app.qt_common import error_text
from app.tab_state import ImageSnapshot


class EvaluationMarks(QObject):
    """Marks, counts and changes the session's evaluation photos from the thumbnail grid."""

    def __init__(self, grid: QListView, path_role: int, submit: Callable[..., Any], show_error: Callable[[str], None]) -> None:
        super().__init__(grid)
        self._grid = grid
        self._path_role = path_role
        self._submit = submit
        self._show_error = show_error
        self._session: Any = None
        self.paths: list[str] = []  # the session's evaluation photos, as of its last event
        self.count_label = QLabel("")
        self.count_label.setObjectName("evaluationCountLabel")
        self.count_label.setToolTip(
            "The Errors tab evaluates on these photos (marked E in the grid): by default the first few, "
            "not every calibration image, so its numbers come quickly. Right-click a photo to change them."
        )
        self.toggle_action = QAction("Evaluate on this photo", self)
        self.toggle_action.setObjectName("evaluateOnPhotoAction")
        self.toggle_action.setCheckable(True)
        self.toggle_action.triggered.connect(self._on_toggled)
        self.reset_action = QAction("Evaluate on the default photos", self)
        self.reset_action.setObjectName("evaluateOnDefaultAction")
        self.reset_action.triggered.connect(lambda: self._ask(None))
        grid.setContextMenuPolicy(Qt.ActionsContextMenu)
        grid.addAction(self.toggle_action)
        grid.addAction(self.reset_action)
        grid.selectionModel().selectionChanged.connect(lambda *_: self._sync_check())

    def refresh(self, session) -> None:
        """Read the session's evaluation set (on the GUI thread, after its event) and update the count."""
        self._session = session
        snapshot = ImageSnapshot.of(session)
        self.paths = snapshot.evaluation
        self.count_label.setText(snapshot.evaluation_count_text() if snapshot.status_by_path else "")
        self._sync_check()

    def selected_paths(self) -> list[str]:
        """The paths of the photos selected in the grid."""
        return [str(i.data(self._path_role)) for i in self._grid.selectionModel().selectedIndexes()]

    def _sync_check(self) -> None:
        selected = self.selected_paths()
        self.toggle_action.setEnabled(bool(selected))
        self.toggle_action.setChecked(bool(selected) and all(p in self.paths for p in selected))
        self.toggle_action.setText("Evaluate on these photos" if len(selected) > 1 else "Evaluate on this photo")

    def _on_toggled(self, checked: bool) -> None:
        selected = self.selected_paths()
        if checked:
            wanted = self.paths + [p for p in selected if p not in self.paths]
        else:
            wanted = [p for p in self.paths if p not in selected]
        self._ask(wanted)

    def _ask(self, paths: list[str] | None) -> None:
        """Ask the session (on the worker) for this evaluation set; None: the default."""
        session = self._session
        if session is None:
            return

        def failed(exc: BaseException) -> None:
            self._sync_check()  # the set did not change: neither does the mark
            self._show_error(error_text(exc))

        self._submit(
            "choose evaluation photos", lambda: session.set_evaluation_images(paths), takes_progress=False, on_error=failed
        )
