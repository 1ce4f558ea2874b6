"""The Errors tab's diagnostics of an evaluation: the first-divergence locator and the per-image patch error
maps, run in the worker and drawn into the banner, the per-unit chart and the heatmap. After the automatic
analysis (Session.analyse: one pass gives the table, the divergence and every image's maps) nothing is run
again: the divergence is shown as it came, and each image's heatmaps are drawn from its maps. While the
analysis runs, each photo's partial divergence and maps are drawn as they arrive (show_partial)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.qt_common import error_text
from app.qt_divergence_panel import QtDivergenceBanner, QtDivergenceChart
from app.qt_heatmap import QtPatchHeatmap
from app.tab_state import ErrorsState, ImageSnapshot, PartialAnalysis
from core.errors import CancelledError


class ErrorDiagnostics:
    """Runs and cancels the locator and the map computations of the evaluation in ``state``; results of an
    older evaluation (an older ``state.generation``) are dropped when they arrive."""

    def __init__(
        self,
        state: ErrorsState,
        banner: QtDivergenceBanner,
        chart: QtDivergenceChart,
        heatmap: QtPatchHeatmap,
        submit: Callable[..., Any],
        show_error: Callable[[str], None],
    ) -> None:
        self.state = state
        self.banner = banner
        self.chart = chart
        self.heatmap = heatmap
        self._submit = submit
        self._show_error = show_error
        self._div_task = None
        self._maps_tasks: dict[str, Any] = {}
        self._analysed_maps: dict[str, Any] = {}  # image id -> ImageErrorMaps of the last analysis
        self.streaming = False  # an analysis is drawing its photos as they arrive

    def cancel(self) -> None:
        """Cancel the divergence locator and the heatmaps being computed."""
        for task in [self._div_task, *self._maps_tasks.values()]:
            if task is not None:
                task.token.cancel()

    def forget(self) -> None:
        """Cancel everything and let go of the tasks (their late results are dropped by generation)."""
        self.cancel()
        self._div_task = None
        self._maps_tasks = {}
        self._analysed_maps = {}
        self.streaming = False

    def start(self, session, images: ImageSnapshot, analysis=None) -> None:
        """After an evaluation: locate the first divergence (or show the AnalysisResult's) and map the chosen image's errors.

        The maps drawn while the analysis streamed its photos (show_partial) are kept: they are its own."""
        if not self.streaming:
            self.state.new_generation()
            self.forget()
        self.streaming = False
        self.heatmap.set_images(self.state.images, self.heatmap.current_image())
        if analysis is None:
            self.locate(session, self.banner.unit())
        else:
            # Its maps ran with the what-if's modules kept float; the heatmap shows the model as configured.
            kept = analysis.compare.keep_float
            self._analysed_maps = {} if kept else {k: m for k, m in analysis.maps.items() if k not in self.state.maps_cache}
            self._show_divergence(analysis.divergence)
        self.request_maps(session, images, self.heatmap.current_image())

    def begin_stream(self) -> None:
        """A new analysis drew its first photo: what the older evaluation computed no longer holds."""
        self.state.new_generation()
        self.forget()
        self.streaming = True

    def show_partial(self, part: PartialAnalysis) -> None:
        """One more photo of the running analysis: its divergence so far, and its heatmaps (drawn by the
        worker for the first photo; the others' maps wait until chosen, the what-if's are not shown)."""
        if part.maps is not None:
            self.state.maps_cache[part.image_id] = part.maps
        elif not part.analysis.compare.keep_float and part.image_id in part.analysis.maps:
            self._analysed_maps[part.image_id] = part.analysis.maps[part.image_id]
        self._show_divergence(part.analysis.divergence)
        self.heatmap.set_images(self.state.images, self.heatmap.current_image())
        current = self.heatmap.current_image()
        if current in self.state.maps_cache and (self.heatmap.image_id != current or self.heatmap.heatmap is None):
            self._show_maps(current)

    def end_stream(self) -> None:
        """The analysis stopped early: photos chosen from now on are computed on demand."""
        self.streaming = False

    def _show_divergence(self, found) -> None:
        self.banner.set_done()
        self.state.divergence = found
        self.banner.set_result(found)
        self.chart.set_result(found)

    def locate(self, session, unit: str = "layer") -> None:
        """Locate the first divergence on the evaluated images, in the worker."""
        result = self.state.result
        if session is None or result is None:
            self.banner.set_error("evaluate first, then locate")
            return
        if self._div_task is not None:
            self._div_task.token.cancel()
        unit = unit if unit in ("layer", "module") else "layer"
        index = self.banner.unit_combo.findData(unit)
        if index >= 0 and index != self.banner.unit_combo.currentIndex():
            self.banner.unit_combo.setCurrentIndex(index)
        generation = self.state.generation
        self.banner.set_busy(unit)
        # The what-if of the last evaluation (modules ticked to stay float) applies here too.
        keep = list(getattr(result, "keep_float", None) or [])

        def work(progress, cancel):
            return session.locate_divergence(unit=unit, progress=progress, cancel=cancel, keep_float=keep or None)

        def current(task) -> bool:
            return generation == self.state.generation and task is self._div_task

        def done(found) -> None:
            if not current(task):
                return
            self._div_task = None
            self._show_divergence(found)

        def failed(exc: BaseException) -> None:
            if not current(task):
                return
            self._div_task = None
            self.banner.set_done()
            if isinstance(exc, CancelledError):
                self.banner.set_error("locating was cancelled — press Locate divergence to run it again")
            else:
                self.banner.set_error(error_text(exc))
                self._show_error(error_text(exc))

        task = self._submit("locating divergence", work, on_done=done, on_error=failed, on_progress=self.banner.set_progress)
        self._div_task = task

    def request_maps(self, session, images: ImageSnapshot, image_id: str | None) -> None:
        """Show an image's error maps: from the cache, or computed once in the worker."""
        if image_id is None:
            return
        if image_id in self.state.maps_cache:
            self._show_maps(image_id)
            return
        self.heatmap.show_pending(image_id)
        if image_id in self._maps_tasks or (self.streaming and image_id not in self._analysed_maps):
            return  # a streaming analysis hands its maps on when that photo is done
        path = images.path_for(image_id)
        if session is None or path is None:
            self.heatmap.title.setText(f"{image_id} is no longer in the image set.")
            return
        generation = self.state.generation
        analysed = self._analysed_maps.pop(image_id, None)

        def work(progress, cancel):
            maps = analysed or session.image_error_maps(path, progress=progress, cancel=cancel)
            # Every module's grid is made here too, so switching modules never computes on the UI thread.
            return maps, {name: maps.heatmap(name) for name in maps.modules()}

        def done(payload) -> None:
            if generation != self.state.generation:
                return
            self._maps_tasks.pop(image_id, None)
            self.state.maps_cache[image_id] = payload
            if self.heatmap.current_image() == image_id:
                self._show_maps(image_id)

        def failed(exc: BaseException) -> None:
            if generation != self.state.generation:
                return
            self._maps_tasks.pop(image_id, None)
            self.heatmap.title.setText(f"No heatmap for {image_id}: {error_text(exc)}")

        self._maps_tasks[image_id] = self._submit("patch errors", work, on_done=done, on_error=failed)

    def _show_maps(self, image_id: str) -> None:
        _maps, heatmaps = self.state.maps_cache[image_id]
        wanted, self.state.wanted_module = self.state.wanted_module, None
        module = wanted if wanted in heatmaps else None
        self.heatmap.set_heatmaps(image_id, heatmaps, module)
