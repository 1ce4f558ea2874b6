"""The Errors tab's analysis run, photo by photo: Session.analyse on the worker hands each evaluation photo's
partial numbers (table texts and heatmaps made there, so the UI thread only draws) to the GUI thread, where
the tab draws them as they arrive; later photos refine them (issue 13, item 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QTimer

from app.events import on_gui_thread
from app.qt_common import QtSteadyLabel
from app.qt_module_errors_table import ModuleErrorModel
from app.tab_state import ErrorsState, ImageSnapshot, PartialAnalysis, PartialResults
from core.analysis.analysis_pass import STEPS_PER_IMAGE


class ErrorsStream:
    """Numbers the tab's analysis runs, carries their partial results to ``on_partial(part, first)`` on the
    GUI thread, and remembers which photos a run used (so a changed evaluation set re-runs)."""

    def __init__(self, on_partial: Callable[[PartialAnalysis, bool], None]) -> None:
        self._on_partial = on_partial
        self.partials = PartialResults()
        on_gui_thread(self.partials.arrived, self._deliver)
        self.run = 0  # partial results of an older run are dropped
        self.running = False
        self.streamed = False  # the running analysis has drawn at least one photo
        self.wanted_paths: list[str] | None = None  # the evaluation set the session last announced
        self.ran_paths: list[str] | None = None  # the photos the last run evaluated
        self.tables: dict[int, tuple[list, list]] = {}  # id(CompareResult) -> table texts made by the worker
        self._pending: tuple[int, PartialAnalysis] | None = None  # the newest photo not drawn yet
        self._scheduled = False
        self.label = QtSteadyLabel("")  # which photos the numbers on screen are from
        self.label.setObjectName("evaluationLabel")
        self.label.setStyleSheet("color: palette(dark);")

    def show_line(self, state: ErrorsState, images: ImageSnapshot, running: bool) -> None:
        """Say which photos the numbers on screen are from (the tooltip lists them all)."""
        names = [images.name_of(i) for i in state.images]
        self.label.setText(state.evaluation_line(names, running))
        self.label.setToolTip("\n".join(names))

    def work(self, session, unit: str, keep: list[str]) -> Callable[..., Any]:
        """A new run: the worker function (progress, cancel) -> AnalysisResult."""
        self.run += 1
        self.running, self.streamed, self.ran_paths = True, False, None
        run, partials, tables = self.run, self.partials, self.tables

        def work(progress, cancel):
            # One pass per image gives the table, the divergence banner and the maps (core.analysis.analysis_pass);
            # it reports its three steps per image, the bar counts images.
            def per_image(done: int, total: int, message: str = "") -> None:
                progress(done // STEPS_PER_IMAGE, total // STEPS_PER_IMAGE, message)

            paths = [e.path for e in session.evaluation_images]
            self.ran_paths = paths

            def on_image(image_id: str, partial) -> None:
                # The first photo is what the heatmap shows; the others are drawn when chosen. The
                # what-if's maps (modules kept float) are not what the heatmap shows: not drawn.
                maps = None if keep or len(partial.images) > 1 else partial.maps.get(image_id)
                drawn = None if maps is None else (maps, {name: maps.heatmap(name) for name in maps.modules()})
                table = ModuleErrorModel.prepare(partial.compare.modules)
                partials.arrived.emit(run, PartialAnalysis(image_id, partial, len(paths), table, drawn))

            analysis = session.analyse(
                unit=unit, progress=per_image, cancel=cancel, keep_float=keep or None, on_image=on_image
            )
            tables[id(analysis.compare)] = ModuleErrorModel.prepare(analysis.compare.modules)
            return analysis

        return work

    def ended(self) -> bool:
        """The run is over; True when the evaluation set changed while it ran (evaluate again, once per change)."""
        self.running = False
        stale = self.wanted_paths is not None and self.ran_paths is not None and self.wanted_paths != self.ran_paths
        # Consumed: the set can shrink later without an announcement (a photo removed), and the
        # next run must not chase a set the session no longer has.
        self.wanted_paths = None
        return stale

    def forget(self) -> None:
        """Partial results still on their way are no longer wanted."""
        self.run += 1
        self.running = self.streamed = False

    def _deliver(self, run: int, part: PartialAnalysis) -> None:
        if run != self.run or not self.running:
            return
        # Drawn on a later pass of the event loop, not inside the batch of queued events it came
        # with: the window's timers and input get a turn in between, and a photo superseded before
        # it is drawn (by the next photo or the final result) is never drawn. Drawing it at once, beside
        # the final result's drawing, stalled the window 225-290 ms on e2b (bench/bench_gui.py).
        self._pending = (run, part)
        if not self._scheduled:
            self._scheduled = True
            QTimer.singleShot(1, self._draw_pending)  # a timer, not a posted event: see SessionRunner.later

    def _draw_pending(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != self.run or not self.running:
            return
        first, self.streamed = not self.streamed, True
        self._on_partial(pending[1], first)
