"""Fix tab: apply remedies (SmoothQuant, CLE, GPTQ, AdaRound, mixed precision) to the session's model
in the worker, then compare before and after with the A/B charts per module and, below them, one
module's patch-error map before and after (a click on the chart chooses it), the first divergence
before -> after, and for mixed precision the Pareto curve of the configurations tried (a click
applies a point). The maps and the divergence come with the fix (its one analysis pass each side).

The tab follows the session's events: ``remedied`` shows a fix, new statistics or a new config
drop it, and a first-divergence search pre-fills the globs with the unit it located. The remedies
themselves run in the Session (``Session.apply_remedies``); a cancelled run leaves it as it was.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.fix_state import FixViewState
from app.qt_ab_charts import A_COLOR, B_COLOR, QtABCharts
from app.qt_common import QtMessageLine, QtSessionTab, QtTaskProgress, end_task_with_error, error_text, plural
from app.qt_fix_views import QtFixDivergenceLine, QtFixHeatmapPair, QtLocalSQNRChart
from app.qt_pareto_chart import QtParetoChart
from core.errors import ConfigError, PTQStudioError
from core.remedies.plan import RemedyStep

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow

# (kind, label, what it does) of the remedies that take module globs, in the order they run.
GLOB_REMEDIES = (
    ("smoothquant", "SmoothQuant", "moves activation outliers into the weights (alpha: how much)"),
    ("cle", "Cross-layer equalisation", "evens out weight ranges of consecutive linears"),
    ("gptq", "GPTQ", "rounds weights to the grid, correcting the error as it goes"),
    ("adaround", "AdaRound", "learns whether each weight rounds up or down"),
)
MIXED_TARGETS = (("target_sqnr_db", "target SQNR (dB)"), ("within_db_of_int16", "within dB of all-int16"))
_SPLIT = re.compile(r"[\s,]+")


def split_globs(text: str) -> tuple[str, ...]:
    """Globs typed with spaces or commas between them."""
    return tuple(g for g in _SPLIT.split(text.strip()) if g)


class QtFixTab(QtSessionTab):
    """Choose remedies and their modules, run them, and see what they changed."""

    sigFixed = Signal(object)  # FixResult

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__(host)
        self.view = FixViewState()
        self._prefilled = ""  # the glob last pre-filled: replaced by the next search, never the user's own

        box = QGroupBox("Remedies, applied in this order")
        box.setToolTip("Smoothing (SmoothQuant, CLE) is followed by a recalibration, then rounding (GPTQ, AdaRound), then mixed precision")
        grid = QGridLayout(box)
        self.checks: dict[str, QCheckBox] = {}
        self.globs: dict[str, QLineEdit] = {}
        for row, (kind, label, tip) in enumerate(GLOB_REMEDIES):
            check = QCheckBox(label)
            check.setObjectName(f"fix_{kind}_check")
            check.setToolTip(tip)
            edit = QLineEdit()
            edit.setObjectName(f"fix_{kind}_globs")
            edit.setPlaceholderText("module globs, e.g. encoder.layers.3 *.mlp.*")
            self.checks[kind], self.globs[kind] = check, edit
            grid.addWidget(check, row * 2, 0, 1, 2)
            grid.addWidget(edit, row * 2 + 1, 0, 1, 2)
        self.alpha_spin = QDoubleSpinBox()
        self.alpha_spin.setObjectName("fixAlpha")
        self.alpha_spin.setRange(0.05, 1.0)
        self.alpha_spin.setSingleStep(0.05)
        self.alpha_spin.setValue(0.5)
        self.alpha_spin.setPrefix("alpha ")
        grid.addWidget(self.alpha_spin, 0, 2)
        self.mixed_check = QCheckBox("Mixed precision")
        self.mixed_check.setObjectName("fix_mixed_check")
        self.mixed_check.setToolTip("the cheapest per-module dtypes that reach the target on the session's images")
        self.mixed_mode = QComboBox()
        self.mixed_mode.setObjectName("fixMixedMode")
        for key, label in MIXED_TARGETS:
            self.mixed_mode.addItem(label, key)
        self.mixed_value = QDoubleSpinBox()
        self.mixed_value.setObjectName("fixMixedValue")
        self.mixed_value.setRange(0.0, 120.0)
        self.mixed_value.setValue(30.0)
        self.mixed_value.setSuffix(" dB")
        base = len(GLOB_REMEDIES) * 2
        grid.addWidget(self.mixed_check, base, 0)
        grid.addWidget(self.mixed_mode, base + 1, 0)
        grid.addWidget(self.mixed_value, base + 1, 1)
        self.apply_button = QPushButton("Apply remedies")
        self.apply_button.setObjectName("fixApplyButton")
        self.progress = QtTaskProgress(cancel_name="fixCancelButton")
        self.applied_label = QLabel("Applied: none")
        self.applied_label.setObjectName("fixApplied")
        self.applied_label.setWordWrap(True)

        left = QWidget()
        left.setMaximumWidth(380)
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(box)
        ll.addWidget(self.apply_button)
        ll.addWidget(self.progress)
        ll.addWidget(self.applied_label)
        ll.addStretch(1)

        self.summary_label = QLabel()
        self.summary_label.setObjectName("fixSummary")
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary_label.setStyleSheet("font-size: 13px;")
        self.charts = QtABCharts(labels=("before", "after"), name="fix")
        self.charts.setToolTip("SQNR of every module before and after the fix; click a point to map that module below")
        self.charts.sigModuleClicked.connect(self._on_module_clicked)
        self.pareto = QtParetoChart()
        self.pareto.setToolTip("Each configuration the mixed-precision search tried; click one to apply it")
        self.pareto.sigPointClicked.connect(self.apply_point)
        self.heatmaps = QtFixHeatmapPair()
        self.heatmaps.sigPhotoChosen.connect(lambda photo: self._choose(photo=photo))
        self.heatmaps.sigModuleChosen.connect(lambda module: self._choose(module=module))
        self.divergence_line = QtFixDivergenceLine()
        self.local_chart = QtLocalSQNRChart()
        self.views = QTabWidget()
        self.views.setObjectName("fixViews")
        self.views.addTab(self.heatmaps, "Heatmap: before | after")
        self.views.addTab(self.local_chart, "First divergence: local SQNR")
        self.views.addTab(self.pareto, "Mixed precision")
        top_right = QWidget()
        rl = QVBoxLayout(top_right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.summary_label)
        rl.addWidget(self.divergence_line)
        rl.addWidget(self.charts, 1)
        top = QSplitter(Qt.Horizontal)
        top.addWidget(left)
        top.addWidget(top_right)
        top.setStretchFactor(1, 1)
        # The views span the tab's width below the form and the chart: two maps side by side need it,
        # and a click on the chart shows its module there without hiding the chart.
        body = QSplitter(Qt.Vertical)
        body.setObjectName("fixBody")
        body.addWidget(top)
        body.addWidget(self.views)
        body.setStretchFactor(0, 1)
        body.setStretchFactor(1, 1)
        self.message = QtMessageLine()
        layout = QVBoxLayout(self)
        layout.addWidget(body, 1)
        layout.addWidget(self.message)

        self.apply_button.clicked.connect(lambda: self.run_fix())
        self.progress.cancel_button.clicked.connect(self.cancel)
        self._show_view()

    # -- the session ---------------------------------------------------------------------------
    def set_session(self, session) -> None:
        """Follow this session (the main window's one call when it replaces the session)."""
        if session is self._session:
            return
        self._session = session
        self._subscriptions.follow(
            session,
            calibrated=self._on_calibrated,
            config_changed=self._on_config_changed,
            remedied=self._on_remedied,
            analysed=self._on_analysed,
        )
        self.view = FixViewState(stats_version=getattr(session, "stats_version", None))
        self._show_view()

    def _on_calibrated(self, stats_version: int) -> None:
        if self.view.statistics_changed(stats_version):
            self._show_view()

    def _on_config_changed(self, _config) -> None:
        self.view.statistics_changed(None)
        self._show_view()

    def _on_remedied(self, result) -> None:
        self.view.fixed(result, getattr(self._session, "stats_version", 0))
        self._show_view()
        self.sigFixed.emit(result)

    def _on_analysed(self, name: str, result) -> None:
        if name != "divergence":
            return
        unit = self.view.located(result)
        if not unit:
            return
        for edit in self.globs.values():
            if not edit.text().strip() or edit.text() == self._prefilled:
                edit.setText(unit)
        self._prefilled = unit
        self.message.show_message(f"The first divergence is at {unit}: its globs are filled in above.")

    # -- the before/after views -------------------------------------------------------------
    def _on_module_clicked(self, index: int) -> None:
        """A click on the per-module chart: that module's maps before and after, if it has any."""
        result = self.view.result
        if result is None or not 0 <= index < len(result.comparison.modules):
            return
        name = result.comparison.modules[index].name
        if self._choose(module=name):
            self.views.setCurrentWidget(self.heatmaps)
        else:
            self.message.show_message(f"{name} has no patch- or token-level output to map; choose another module.")

    def _choose(self, photo: str | None = None, module: str | None = None) -> bool:
        """Show another photo or module in the heatmap pair (False when it has no map there)."""
        if not self.view.choose(photo=photo, module=module):
            return False
        self._show_heatmaps()
        return True

    def _show_heatmaps(self) -> None:
        view = self.view
        self.heatmaps.set_choices(view.photos(), view.photo, view.modules(), view.module)
        self.heatmaps.show_pair(view.heatmap_pair())
        names = [m.name for m in view.result.comparison.modules] if view.result is not None else []
        if view.module in names:
            self.charts.mark(names.index(view.module))  # the chart's cursor on the mapped module

    # -- running remedies ----------------------------------------------------------------------
    def steps(self) -> list[RemedyStep]:
        """The remedy steps the form asks for (ConfigError when a chosen one has no module)."""
        steps = []
        for kind, label, _tip in GLOB_REMEDIES:
            if not self.checks[kind].isChecked():
                continue
            globs = split_globs(self.globs[kind].text())
            if not globs:
                raise ConfigError(f"{label}: name the modules to fix (globs), or untick it")
            params = {"alpha": self.alpha_spin.value()} if kind == "smoothquant" else {}
            steps.append(RemedyStep(kind, globs, params))
        if self.mixed_check.isChecked():
            steps.append(RemedyStep("mixed", params={self.mixed_mode.currentData(): self.mixed_value.value()}))
        return steps

    def run_fix(self, steps: list[RemedyStep] | None = None) -> None:
        """Apply the form's remedies (or `steps`) in the worker."""
        session = self._session
        if session is None or self._task is not None:
            return
        if getattr(session, "state", "") != "calibrated":
            self.message.show_message("Calibrate first (Calibration tab), then fix.", "error")
            return
        try:
            steps = self.steps() if steps is None else steps
            if not steps:
                raise ConfigError("tick at least one remedy")
        except PTQStudioError as exc:
            self.message.show_message(error_text(exc), "error")
            return
        self.apply_button.setEnabled(False)
        self.progress.begin(0, "steps", "fixing…")
        self.message.show_message(f"Applying {', '.join(s.kind for s in steps)}…")

        def work(progress, cancel):
            return session.apply_remedies(steps, progress=progress, cancel=cancel)

        self._task = self._host.submit(
            "fix", work, on_done=self._on_fixed, on_error=self._on_error, on_progress=self.progress.update_progress
        )

    def apply_point(self, point) -> None:
        """Apply one point of the Pareto curve (its per-module dtypes) to the session."""
        params = {"overrides": dict(point.overrides), "cost_bytes": point.cost_bytes, "sqnr_db": point.sqnr_db, "origin": point.origin}
        self.run_fix([RemedyStep("mixed", params=params)])

    def cancel(self) -> None:
        """Stop the fix; the session stays as it was before it."""
        self.progress.cancel_task(self._task)

    def _on_fixed(self, result) -> None:
        self._task = None
        self.apply_button.setEnabled(True)
        self.progress.end(f"fixed in {result.seconds:.1f} s")
        self.message.show_message("Fixed; the session keeps the remedies (save it to keep them on disk).", "ok")

    def _on_error(self, exc: BaseException) -> None:
        self._task = None
        self.apply_button.setEnabled(True)
        end_task_with_error(exc, self.progress, self.message, self._host, "Cancelled; the session is exactly as it was before the fix.")

    # -- showing the view state -------------------------------------------------------------
    def _show_view(self) -> None:
        """Show the fix in self.view, or what the tab does (saying when the session changed)."""
        remedies = list(getattr(self._session, "remedies", []) or [])
        self.applied_label.setText(
            "Applied: " + ("; ".join(f"{r.step.kind} ({', '.join(r.step.globs)})" for r in remedies) or "none")
        )
        result = self.view.result
        # Empty charts and maps say nothing: the results appear with a fix, the curve with a mixed-precision search.
        self.charts.setVisible(result is not None)
        self.views.setVisible(result is not None)
        self.divergence_line.show_lines(self.view.divergence_lines())
        if result is None:
            self.charts.clear()
            self.pareto.clear_points()
            self.heatmaps.clear()
            self.local_chart.clear()
            first = "The session changed since the last fix, so it was cleared. " if self.view.stale else ""
            self.summary_label.setText(
                f"{first}Tick remedies, name their modules (the first divergence fills them in) and press "
                "“Apply remedies”: the SQNR before and after is charted per module and end to end."
            )
            return
        self.charts.show_modules(result.comparison.modules)
        self._show_heatmaps()
        self.local_chart.show_changes(self.view.unit_changes(), getattr(result.divergence, "before", None))
        search = result.mixed
        points = self.view.pareto_points()
        self.views.setTabVisible(self.views.indexOf(self.pareto), bool(points))
        self.pareto.show_points(points, getattr(search, "chosen", None))
        self.views.setCurrentWidget(self.pareto if points else self.heatmaps)
        steps = ", ".join(f"{r.step.kind} ({plural(len(r.modules), 'module')})" for r in result.reports)
        self.summary_label.setText(
            f"<b>End-to-end SQNR</b> on {plural(len(result.after.images), 'evaluation photo')}: "
            f"<span style='color:{A_COLOR}'><b>{result.sqnr_before_db:.2f} dB</b></span> → "
            f"<span style='color:{B_COLOR}'><b>{result.sqnr_after_db:.2f} dB</b></span> "
            f"(Δ {result.comparison.end_to_end_delta_db:+.2f} dB) after {steps}."
        )
