"""Errors tab: first divergence, per-module FP-vs-quant error, depth chart, patch heatmap, scatter,
keep-float, sensitivity.

The tab follows the Session's events itself (new statistics are evaluated, a new config clears it) and
keeps what it shows in an ``ErrorsState``; the table, the divergence banner and chart, the heatmap and the
scatter are pieces in their own files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.events import SessionSubscriptions
from app.qt_common import QtMessageLine, QtSteadyLabel, QtTaskProgress, error_text, fmt_float, plural
from app.qt_depth_chart import QtDepthChart
from app.qt_divergence_panel import QtDivergenceBanner, QtDivergenceChart
from app.qt_error_diagnostics import ErrorDiagnostics
from app.qt_error_scatter import QtErrorScatterPanel
from app.qt_errors_stream import ErrorsStream
from app.qt_heatmap import QtPatchHeatmap
from app.qt_module_errors_table import ModuleErrorModel, ModuleErrorProxy
from app.qt_sensitivity_table import QtSensitivityTable
from app.tab_state import SQNR_YARDSTICK, ErrorsState, ImageSnapshot, PartialAnalysis

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow


class QtErrorsTab(QWidget):
    """Find the module that hurts, look at its values, keep it in float, check again."""

    sigEvaluated = Signal(object)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self.session: Any = None
        self._subscriptions = SessionSubscriptions()
        self.state = ErrorsState()
        self.images = ImageSnapshot()
        self._eval_task = None
        self._sens_task = None
        self._image_task = None
        # Each photo's numbers come from the worker as that photo is done; drawn on this thread.
        self.stream = ErrorsStream(self._on_partial)
        self._heatmap_follows = True

        self.model = ModuleErrorModel(self)
        self.model.sigKeepFloatChanged.connect(self._on_keep_changed)
        self.proxy = ModuleErrorProxy(self.model, self)
        self._build_toolbar()
        self._build_table()
        self.depth_chart = QtDepthChart()
        self.depth_chart.sigModuleClicked.connect(self.select_module)

        self.scatter_panel = QtErrorScatterPanel()
        self.scatter_panel.sigImageChosen.connect(self._on_image_choice)
        # The panel's parts under the names the tab has always had.
        self.scatter, self.image_combo = self.scatter_panel.scatter, self.scatter_panel.image_combo
        self.scatter_title = self.scatter_panel.title

        # first divergence and its per-unit chart
        self.banner = QtDivergenceBanner()
        self.banner.sigShow.connect(self.show_unit)
        self.banner.sigLocate.connect(self.locate_divergence)
        self.banner.sigCancel.connect(self.cancel_diagnostics)
        self.divergence_plot = QtDivergenceChart()
        self.divergence_plot.sigUnitClicked.connect(self.show_unit)

        # patch heatmap
        self.heatmap = QtPatchHeatmap()
        self.heatmap.sigImageChosen.connect(self.request_maps)

        # sensitivity results
        self.sensitivity_table = QtSensitivityTable()
        self.sensitivity_table.sigUnitChosen.connect(self._on_sensitivity_selected)
        self.sensitivity_table.setVisible(False)  # the heatmap gets the height until a sweep has run

        self.message = QtMessageLine()
        self.message.show_message("Calibrate, then Evaluate to compare float and quantized outputs.")
        self.diagnostics = ErrorDiagnostics(
            self.state,
            self.banner,
            self.divergence_plot,
            self.heatmap,
            host.submit,
            lambda text: self.message.show_message(text, "error"),
        )
        self._build_layout()

    # -- building -----------------------------------------------------------------------
    def _build_toolbar(self) -> None:
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.setObjectName("evaluateButton")
        self.evaluate_button.setToolTip("Compare float and quantized outputs of every module on the evaluation photos (Calibration tab)")
        self.evaluate_button.clicked.connect(self.evaluate)
        self.sensitivity_button = QPushButton("Sensitivity…")
        self.sensitivity_button.setObjectName("sensitivityButton")
        self.sensitivity_button.setToolTip("Keep each layer in float in turn and measure the end-to-end gain")
        self.sensitivity_button.clicked.connect(self.run_sensitivity)
        self.to_settings_button = QPushButton("Use checked for export")
        self.to_settings_button.setObjectName("keepFloatToSettingsButton")
        self.to_settings_button.setToolTip(
            "Copy the modules checked 'Keep float' into the settings' keep-float list "
            "(Apply there re-prepares the model; calibrate again before exporting)"
        )
        self.to_settings_button.setEnabled(False)
        self.to_settings_button.clicked.connect(self.copy_keep_float_to_settings)
        self.end_to_end_label = QtSteadyLabel("End-to-end: not evaluated")
        self.end_to_end_label.setObjectName("endToEndLabel")
        self.end_to_end_label.setStyleSheet("font-weight: 600;")
        self.end_to_end_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.evaluation_label = self.stream.label  # "from 2 of 4 evaluation photos: …"
        self.progress = QtTaskProgress(cancel_name="errorsCancelButton")
        self.progress.setMinimumWidth(300)
        self.progress.setMaximumWidth(420)
        self.progress.cancel_button.clicked.connect(self.cancel)

    def _build_table(self) -> None:
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter modules")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)
        self.table = QTableView()
        self.table.setObjectName("errorsTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(3, Qt.AscendingOrder)  # worst SQNR on top
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self._apply_widths()
        self.table.selectionModel().currentRowChanged.connect(self._on_current_row)
        # Show the keep-float check beside the name, where the eye already is (visual order only).
        self.table.horizontalHeader().moveSection(ModuleErrorModel.KEEP_COL, 2)

    def _build_layout(self) -> None:
        bar = QHBoxLayout()
        bar.addWidget(self.evaluate_button)
        bar.addStretch(1)
        bar.addWidget(self.to_settings_button)
        bar.addWidget(self.sensitivity_button)
        bar.addWidget(self.progress)

        divergence_box = QWidget()
        dl = QVBoxLayout(divergence_box)
        dl.setContentsMargins(0, 0, 0, 0)
        div_title = QLabel(QtDivergenceChart.LEGEND_HTML)
        div_title.setToolTip(
            "input/output: SQNR where the unit reads and writes in the fully quantized run (error inherited and passed on); "
            "local: the unit quantized alone on the float model's input (the error it adds itself)"
        )
        div_title.setMinimumHeight(self.depth_chart.metric_combo.sizeHint().height())
        # Long one-line texts wrap instead of setting the window's minimum width (1280 px screens).
        for label in (div_title, self.end_to_end_label, self.evaluation_label):
            label.setWordWrap(True)
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        dl.addWidget(div_title)
        dl.addWidget(self.divergence_plot, 1)

        chart_box = QSplitter(Qt.Horizontal)
        chart_box.addWidget(self.depth_chart)
        chart_box.addWidget(divergence_box)
        chart_box.setSizes([640, 480])

        table_box = QWidget()
        tl = QVBoxLayout(table_box)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addWidget(self.filter_edit)
        tl.addWidget(self.table, 1)

        self.detail_tabs = QTabWidget()
        self.detail_tabs.setObjectName("errorsDetailTabs")
        self.detail_tabs.setDocumentMode(True)
        self.detail_tabs.addTab(self.heatmap, "Patch heatmap")
        self.detail_tabs.addTab(self.scatter_panel, "Scatter")

        right = QSplitter(Qt.Vertical)
        right.addWidget(self.detail_tabs)
        right.addWidget(self.sensitivity_table)
        right.setSizes([420, 140])
        self._detail_splitter = right

        lower = QSplitter(Qt.Horizontal)
        lower.addWidget(table_box)
        lower.addWidget(right)
        lower.setSizes([680, 440])

        self.splitter = QSplitter(Qt.Vertical)
        self.splitter.addWidget(chart_box)
        self.splitter.addWidget(lower)
        self.splitter.setSizes([200, 500])

        layout = QVBoxLayout(self)
        layout.addWidget(self.banner)
        layout.addLayout(bar)
        # The numbers get the tab's whole width: beside the buttons they wrapped to three lines.
        layout.addWidget(self.end_to_end_label)
        layout.addWidget(self.evaluation_label)
        layout.addWidget(self.splitter, 1)
        layout.addWidget(self.message)

    def _apply_widths(self) -> None:
        char = self.table.fontMetrics().horizontalAdvance("0")
        for col, chars in enumerate(ModuleErrorModel.WIDTHS):
            self.table.setColumnWidth(col, chars * char + 12)

    # -- what the tab shows (kept in self.state) ----------------------------------------
    @property
    def result(self):
        """The CompareResult on screen (None before an evaluation)."""
        return self.state.result

    @property
    def per_image(self) -> dict[str, Any]:
        """Image id -> CompareResult on that image alone (the scatter's one-image choice)."""
        return self.state.per_image

    @property
    def divergence(self):
        """The DivergenceResult of the last locate (None before one)."""
        return self.state.divergence

    @property
    def maps_cache(self) -> dict[str, tuple[Any, dict[str, Any]]]:
        """Image id -> (ImageErrorMaps, {module: Heatmap}) of the evaluation on screen."""
        return self.state.maps_cache

    # -- the session's events -----------------------------------------------------------
    def set_session(self, session) -> None:
        """Follow this session's events from now on (and forget what the previous one showed)."""
        self.session = session
        self._subscriptions.follow(
            session,
            calibrated=self._on_calibrated,
            config_changed=self._on_config_changed,
            images_changed=self._on_images_changed,
            evaluation_changed=self._on_evaluation_changed,
        )
        self.sensitivity_table.set_session(session)
        self.images = ImageSnapshot.of(session)
        self._forget()
        # Statistics the session already holds (a loaded one) are evaluated when the user asks.
        self.state.stats_version = getattr(session, "stats_version", None)

    def _on_images_changed(self) -> None:
        self.images = ImageSnapshot.of(self.session)

    def _on_evaluation_changed(self, paths: list) -> None:
        """Another evaluation set: the numbers on screen stay (their line names their photos) until the re-run replaces them."""
        self.images = ImageSnapshot.of(self.session)
        self.stream.wanted_paths = list(paths)
        if self._eval_task is None and self.state.stats_version and getattr(self.session, "state", "") == "calibrated":
            self.evaluate()  # a running one re-runs when it ends, if its photos differ (_on_evaluated)

    def _on_config_changed(self, _config) -> None:
        self._forget()
        self.state.stats_version = 0

    def _on_calibrated(self, stats_version: int) -> None:
        """New statistics are evaluated; the same ones again (a cancelled re-run restored them) change nothing."""
        self.images = ImageSnapshot.of(self.session)
        if stats_version == self.state.stats_version:
            return
        if not stats_version:
            self._forget()
            self.state.stats_version = 0
            return
        self.state.stats_version = stats_version
        self.evaluate()

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> None:
        """Run Session.evaluate with the checked keep-float modules, in the worker."""
        session = self.session
        if session is None or self._eval_task is not None:
            return
        keep = sorted(self.model.keep_float)
        if self.result is not None:
            self.state.previous_end_to_end = self.result.end_to_end
        self.evaluate_button.setEnabled(False)
        # The core reports evaluated images (one float and one quantized pass each), not modules.
        self.progress.begin(0, "images", "evaluating…")
        self.banner.set_waiting("waits for the evaluation, then locates itself…")
        self.message.show_message(
            "Evaluating" + (f" with {len(keep)} module(s) kept in float" if keep else "") + "…"
        )
        stats_version = session.stats_version
        unit = self.banner.unit() if self.banner.unit() in ("layer", "module") else "layer"
        self._eval_task = self._host.submit(
            "evaluate",
            self.stream.work(session, unit, keep),
            on_done=lambda analysis: self._on_evaluated(analysis.compare, stats_version, analysis),
            on_error=self._on_eval_error,
            on_progress=self.progress.update_progress,
        )

    def cancel(self) -> None:
        """Cancel the running evaluation or sensitivity sweep."""
        for task in (self._eval_task, self._sens_task):
            if task is not None:
                task.token.cancel()
        self.cancel_diagnostics()

    def cancel_diagnostics(self) -> None:
        """Cancel the divergence locator and the heatmaps being computed."""
        self.diagnostics.cancel()

    def _on_partial(self, part: PartialAnalysis, first: bool) -> None:
        """One more evaluation photo is done: draw the numbers of the photos so far (later ones refine them)."""
        if first:
            self.diagnostics.begin_stream()
        self.state.evaluation_total, self.state.complete = part.total, False
        self.set_result(part.analysis.compare, prepared=part.table)
        self.stream.show_line(self.state, self.images, running=True)
        self._host.later("drawing the photo's maps", lambda: self._show_partial_maps(part))

    def _show_partial_maps(self, part: PartialAnalysis) -> None:
        # Its divergence and heatmap on a later pass than its table, as the final result's (_on_evaluated).
        if self.state.result is part.analysis.compare:  # not when a newer photo or the final result came first
            self.diagnostics.show_partial(part)

    def _on_evaluated(self, result, stats_version: int | None = None, analysis=None) -> None:
        self._eval_task = None
        self.evaluate_button.setEnabled(True)
        self.evaluate_button.setText("Re-evaluate")
        self.state.complete, self.state.evaluation_total = True, len(getattr(result, "images", []) or [])
        self.progress.end(f"evaluated on {plural(self.state.evaluation_total, 'image')}")
        self.set_result(result, stats_version)
        self.stream.show_line(self.state, self.images, running=False)
        stale = self.stream.ended()
        # The table now; the divergence, charts and heatmap on a later pass the runner counts as busy, so
        # the window paints in between (together they stalled it 140 ms on e2b, bench/bench_gui.py).
        self._host.later("drawing the analysis", lambda: self._finish_evaluated(result, analysis, stale))

    def _finish_evaluated(self, result, analysis, stale: bool) -> None:
        if self.state.result is not result:
            return  # a newer evaluation (or a reset) came first: this one's diagnostics are not wanted
        self.diagnostics.start(self.session, self.images, analysis)
        if stale:
            self.evaluate()  # the evaluation set changed while this ran
        self.sigEvaluated.emit(result)

    def _on_eval_error(self, exc: BaseException) -> None:
        self._eval_task = None
        self.evaluate_button.setEnabled(True)
        self.progress.end("failed")
        self.stream.ended()
        if self.stream.streamed:
            # The photos drawn so far stay, and their line says the rest never came.
            self.diagnostics.end_stream()
            self.stream.show_line(self.state, self.images, running=False)
        else:
            self.banner.clear()  # nothing is being located any more: "evaluate to locate it" is true again
        self.message.show_message(error_text(exc), "error")

    def _forget(self) -> None:
        self.stream.forget()
        self.evaluation_label.setText("")
        self.diagnostics.forget()
        self.state.forget()
        self.banner.clear()
        self.divergence_plot.set_result(None)
        self.heatmap.clear()
        self.model.set_modules([], ())
        self.to_settings_button.setEnabled(False)
        self.evaluate_button.setText("Evaluate")
        self.end_to_end_label.setText("End-to-end: not evaluated")
        self.depth_chart.set_modules([])
        self.scatter_panel.clear()
        self.message.show_message("Calibrate, then Evaluate to compare float and quantized outputs.")

    def set_result(self, result, stats_version: int | None = None, prepared: tuple[list, list] | None = None) -> None:
        """Show a CompareResult: table, chart, end-to-end line, image choices (`prepared`: its table texts)."""
        selected = self.selected_module()
        self.state.show(result, stats_version if stats_version is not None else self.state.stats_version)
        keep = getattr(result, "keep_float", None) or self.model.keep_float
        if prepared is None:
            prepared = self.stream.tables.pop(id(result), None)
            self.stream.tables.clear()
        self.model.set_modules(result.modules, keep, prepared)
        self.to_settings_button.setEnabled(bool(self.model.keep_float))
        self._apply_widths()
        self.depth_chart.set_modules(self.model.forward)
        e2e = result.end_to_end
        text = f"End-to-end: SQNR {e2e.sqnr_db:.2f} dB · PEIR {fmt_float(e2e.peir)} (good: tens of dB on a trained model)"
        if self.state.previous_end_to_end is not None:
            old = self.state.previous_end_to_end
            delta = e2e.sqnr_db - old.sqnr_db
            text = (
                f"End-to-end SQNR: before {old.sqnr_db:.2f} dB → now {e2e.sqnr_db:.2f} dB ({delta:+.2f} dB) · "
                f"PEIR {fmt_float(old.peir)} → {fmt_float(e2e.peir)}"
            )
        self.end_to_end_label.setText(text)
        self.end_to_end_label.setToolTip(SQNR_YARDSTICK)
        self.scatter_panel.set_images(self.state.images)
        worst = sorted(result.modules, key=lambda m: m.sqnr_db)[:3]
        kept = list(getattr(result, "keep_float", []) or [])
        self.message.show_message(
            "Worst: " + ", ".join(f"{m.name} ({m.sqnr_db:.1f} dB)" for m in worst)
            + (f" · kept in float: {', '.join(kept)}" if kept else ""),
            "info",
        )
        names = [m.name for m in result.modules]
        # Streamed numbers (and their final total) re-select the row without moving the heatmap: only the user does.
        self._heatmap_follows = not self.stream.streamed
        try:
            self.select_module(selected if selected in names else (worst[0].name if worst else None))
        finally:
            self._heatmap_follows = True

    def copy_keep_float_to_settings(self) -> None:
        """Append the checked module names to the model panel's keep-float globs."""
        edit = self._host.model_panel.keep_float_edit
        current = self._host.model_panel.keep_float_globs()
        added = [name for name in sorted(self.model.keep_float) if name not in current]
        if added:
            edit.setPlainText("\n".join(current + added))
        self.message.show_message(
            f"Added {len(added)} module(s) to the keep-float settings; press Apply settings and calibrate again to export with them."
        )

    def _on_keep_changed(self) -> None:
        n = len(self.model.keep_float)
        self.to_settings_button.setEnabled(n > 0)
        self.evaluate_button.setText("Re-evaluate")
        self.message.show_message(
            f"{n} module(s) marked to keep in float — press Re-evaluate to see the end-to-end effect."
        )

    # -- selection ----------------------------------------------------------------------
    def selected_module(self) -> str | None:
        """Name of the module whose scatter is shown."""
        index = self.table.selectionModel().currentIndex()
        if not index.isValid():
            return None
        row = self.proxy.mapToSource(index).row()
        return self.model.modules[row].name if 0 <= row < len(self.model.modules) else None

    def select_module(self, name: str | None) -> None:
        """Select a module by name in the table (the scatter follows)."""
        for row, mod in enumerate(self.model.modules if name is not None else []):
            if mod.name == name:
                proxy_index = self.proxy.mapFromSource(self.model.index(row, 0))
                moved = proxy_index.isValid() and proxy_index.row() != self.table.selectionModel().currentIndex().row()
                if proxy_index.isValid():
                    self.table.selectionModel().setCurrentIndex(
                        proxy_index, QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows
                    )
                    self.table.scrollTo(proxy_index)
                self.state.selected_module = name
                if not moved:  # a moved row drew the scatter in _on_current_row already: once is enough
                    self._update_scatter()
                    self._follow_in_heatmap(name)
                return

    def _on_current_row(self, current, _previous) -> None:
        if current.isValid():
            self.state.selected_module = self.selected_module()
            self._update_scatter()
            self._follow_in_heatmap(self.state.selected_module)

    # -- scatter ------------------------------------------------------------------------
    def _update_scatter(self) -> None:
        name = self.selected_module()
        mod = next((m for m in self.model.modules if m.name == name), None)
        if mod is None:
            self.scatter_panel.clear()
            return
        self.depth_chart.set_cursor(self.model.forward.index(mod))
        image_id = self.scatter_panel.chosen_image()
        source = mod
        if image_id is not None:
            single = self.state.per_image.get(image_id)
            match = [m for m in getattr(single, "modules", []) if m.name == mod.name]
            if not match:
                self.scatter_panel.show_pending(mod.name, image_id)
                return
            source = match[0]
        self.scatter_panel.show_module(source, kept=mod.name in self.model.keep_float)

    def _on_image_choice(self, image_id: str) -> None:
        session = self.session
        if not image_id or image_id in self.state.per_image or session is None or self.result is None:
            self._update_scatter()
            return
        path = self.images.path_for(image_id)
        if path is None:
            self.message.show_message(f"{image_id} is no longer in the image set.", "error")
            return
        keep = list(getattr(self.result, "keep_float", []) or [])
        self._update_scatter()

        def work(progress, cancel):
            return session.evaluate(images=[path], progress=progress, cancel=cancel, keep_float=keep or None)

        def done(single):
            self._image_task = None
            self.state.per_image[image_id] = single
            self._update_scatter()

        def failed(exc):
            self._image_task = None
            self.message.show_message(error_text(exc), "error")

        self._image_task = self._host.submit("evaluate image", work, on_done=done, on_error=failed)

    # -- first divergence and patch heatmap ------------------------------------------------
    def locate_divergence(self, unit: str = "layer") -> None:
        """Locate the first divergence on the evaluated images, in the worker."""
        self.diagnostics.locate(self.session, unit)

    def show_unit(self, name: str) -> None:
        """Select a unit in the table and show its patch heatmap (the banner's click)."""
        self.detail_tabs.setCurrentWidget(self.heatmap)
        if self.heatmap.heatmaps:
            if not self.heatmap.show_module(name):
                self.message.show_message(
                    f"{name} has no per-patch map (its rows are neither patches nor soft tokens); "
                    f"the heatmap shows {self.heatmap.module_combo.currentText()}."
                )
        else:
            self.state.wanted_module = name  # applied when the maps arrive
        self.select_module(name)

    def _follow_in_heatmap(self, name: str | None) -> None:
        """The heatmap follows the table's module when that module has a map."""
        if name is not None and self._heatmap_follows and self.heatmap.has_heatmap(name):
            self.heatmap.show_module(name)

    def request_maps(self, image_id: str | None) -> None:
        """Show an image's error maps: from the cache, or computed once in the worker."""
        self.diagnostics.request_maps(self.session, self.images, image_id)

    # -- sensitivity --------------------------------------------------------------------
    def run_sensitivity(self) -> None:
        """Run the keep-one-in-float sweep in the worker, with progress."""
        session = self.session
        if session is None or self._sens_task is not None:
            return
        self.sensitivity_button.setEnabled(False)
        self.progress.begin(0, "layers", "sensitivity sweep…")
        self.message.show_message("Running the sensitivity sweep: one layer in float at a time…")

        def work(progress, cancel):
            return session.sensitivity(unit="layer", progress=progress, cancel=cancel)

        self._sens_task = self._host.submit(
            "sensitivity", work, on_done=self._on_sensitivity, on_error=self._on_sensitivity_error, on_progress=self.progress.update_progress
        )

    def _on_sensitivity(self, entries: list) -> None:
        self._sens_task = None
        self.sensitivity_button.setEnabled(True)
        self.progress.end(f"sensitivity: {len(entries)} entries")  # the table follows session.events.analysed
        if not self.sensitivity_table.isVisible():
            self.sensitivity_table.setVisible(True)
            # Header and a few rows: the heatmap or scatter above keeps most of the height.
            total = sum(self._detail_splitter.sizes())
            table = min(130, total // 3)
            self._detail_splitter.setSizes([total - table, table])
        if entries:
            best = entries[0]
            self.message.show_message(
                f"Keeping {best.name} in float gains the most: {float(best.improvement_db):+.2f} dB end to end.", "ok"
            )

    def _on_sensitivity_error(self, exc: BaseException) -> None:
        self._sens_task = None
        self.sensitivity_button.setEnabled(True)
        self.progress.end("failed")
        self.message.show_message(error_text(exc), "error")

    def _on_sensitivity_selected(self, name: str) -> None:
        if any(m.name == name for m in self.model.modules):
            self.select_module(name)
