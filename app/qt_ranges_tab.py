"""Ranges tab: observer table, [min, max] chart in forward order, histogram of the selection, the image
that set an extreme (and excluding it), the image ranking.

The tab follows the Session's events itself (new statistics are read, a new config clears it) and keeps
what it shows in a ``RangesState``; the table model, the source panel and the ranking are pieces in their
own files.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QRadioButton,
    QSizePolicy,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.events import SessionSubscriptions
from app.qt_common import QtMessageLine, error_text, fmt_float
from app.qt_extreme_source_panel import QtExtremeSourcePanel
from app.qt_image_ranking_panel import QtImageRankingPanel
from app.qt_observer_table import SORT_ROLE, ObserverFilterProxy, ObserverTableModel, grid_limits
from app.tab_state import ImageSnapshot, RangesState

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow


class QtRangesTab(QWidget):
    """Where are the ranges wide, and which image made them so."""

    sigObserverSelected = Signal(int)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self.session: Any = None
        self._subscriptions = SessionSubscriptions()
        self.state = RangesState()
        self.images = ImageSnapshot()
        self._recal_task = None
        self._excluding = ""
        self._after_note = ""  # said again when the refreshed ranges arrive
        # (stats_version, observer name -> (min, max)) before the last remedy: the "Before fix" column
        self._before: tuple[int, dict] = (0, {})

        self.model = ObserverTableModel(self)
        self.proxy = ObserverFilterProxy(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.proxy.setFilterKeyColumn(1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseInsensitive)

        self.filter_edit = QLineEdit()
        self.filter_edit.setObjectName("rangesFilter")
        self.filter_edit.setPlaceholderText("Filter observers by name (e.g. layers.3 or mlp)")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self.proxy.setFilterFixedString)
        self.outliers_only = QCheckBox("Outliers only")
        self.outliers_only.toggled.connect(self.proxy.set_outliers_only)
        self.summary = QLabel("")
        self.summary.setStyleSheet("color: palette(dark);")

        self.table = QTableView()
        self.table.setObjectName("rangesTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(0, Qt.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(22)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.Interactive)
        header.setStretchLastSection(True)
        self._apply_widths()
        self.table.setColumnHidden(len(ObserverTableModel.COLUMNS) - 1, True)  # "Before fix": shown after a remedy
        # Min and max beside the name, where the eye already is (visual order only).
        header.moveSection(6, 2)
        header.moveSection(7, 3)
        self.table.selectionModel().currentRowChanged.connect(self._on_current_row)

        # range chart, built once
        self.plot = pg.PlotWidget()
        self.plot.setObjectName("rangesPlot")
        self.plot.setBackground("w")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "observer (forward order)")
        self.plot.setLabel("left", "range")
        self.plot.addLegend(offset=(10, 5))
        self._max_curve = self.plot.plot([], [], pen=pg.mkPen("#d62728", width=1.2), name="max")
        self._min_curve = self.plot.plot([], [], pen=pg.mkPen("#1f77b4", width=1.2), name="min")
        self._fill = pg.FillBetweenItem(self._min_curve, self._max_curve, brush=pg.mkBrush(31, 119, 180, 40))
        self.plot.addItem(self._fill)
        self._outlier_points = pg.ScatterPlotItem(size=7, pen=None, brush=pg.mkBrush(255, 152, 0, 220), name="outlier")
        self.plot.addItem(self._outlier_points)
        self._cursor = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#444", width=1, style=Qt.DashLine))
        self._cursor.setVisible(False)
        self.plot.addItem(self._cursor)
        self.plot.scene().sigMouseClicked.connect(self._on_plot_clicked)

        self.linear_radio = QRadioButton("Linear")
        self.log_radio = QRadioButton("Log |range|")
        self.linear_radio.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.linear_radio)
        group.addButton(self.log_radio)
        self.log_radio.toggled.connect(lambda _checked: self._update_chart())

        # histogram of the selected observer, built once
        self.hist = pg.PlotWidget()
        self.hist.setObjectName("rangesHistogram")
        self.hist.setBackground("w")
        self.hist.showGrid(x=True, y=True, alpha=0.25)
        self.hist.setLabel("left", "count")
        self._hist_curve = self.hist.plot([], [], stepMode="center", fillLevel=0, brush=(31, 119, 180, 120), pen=pg.mkPen("#1f77b4"))
        self._qmin_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#d62728", width=2), label="qmin", labelOpts={"position": 0.9, "color": "#d62728"})
        self._qmax_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen("#d62728", width=2), label="qmax", labelOpts={"position": 0.9, "color": "#d62728"})
        for line in (self._qmin_line, self._qmax_line):
            line.setVisible(False)
            self.hist.addItem(line)

        self.hist_log = QCheckBox("Log counts")
        self.hist_log.setToolTip("log10(count + 1): shows the sparse tails that set the range")
        self.hist_log.setChecked(True)  # activation histograms are heavy-tailed: the tails set the range
        self.hist_log.toggled.connect(lambda _on: self._show_detail(self.state.detail_row))
        self.detail_title = QLabel("Select an observer")
        self.detail_title.setStyleSheet("font-weight: 600;")
        self.detail_title.setWordWrap(True)
        self.detail_text = QLabel("")
        self.detail_text.setWordWrap(True)
        self.detail_text.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.source_panel = QtExtremeSourcePanel(self.state, host.submit)
        self.source_panel.sigExcludeImage.connect(lambda path, label: self.exclude_and_recalibrate([path], label))
        self.source_panel.recal_progress.cancel_button.clicked.connect(self.cancel_recalibration)
        # The captions sit in the source panel; the tab has always shown them under these names.
        self.min_caption, self.max_caption = self.source_panel.min_caption, self.source_panel.max_caption
        self.ranking = QtImageRankingPanel()
        self.ranking.sigExclude.connect(self.exclude_and_recalibrate)
        self.ranking.sigInclude.connect(self.include_and_recalibrate)
        self.ranking.sigCountChanged.connect(
            lambda n: self.table_tabs.setTabText(1, f"Image ranking ({n})" if n else "Image ranking")
        )
        self.message = QtMessageLine()
        self.message.show_message("Calibrate to see the observers' ranges.")

        # layout
        filter_row = QHBoxLayout()
        filter_row.addWidget(self.filter_edit, 1)
        filter_row.addWidget(self.outliers_only)
        self.summary.setWordWrap(True)
        self.summary.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        table_box = QWidget()
        tl = QVBoxLayout(table_box)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addLayout(filter_row)
        tl.addWidget(self.summary)
        tl.addWidget(self.table, 1)
        self.table_tabs = QTabWidget()
        self.table_tabs.setObjectName("rangesTableTabs")
        self.table_tabs.setDocumentMode(True)
        self.table_tabs.addTab(table_box, "Observers")
        self.table_tabs.addTab(self.ranking, "Image ranking")

        chart_box = QWidget()
        cl = QVBoxLayout(chart_box)
        cl.setContentsMargins(0, 0, 0, 0)
        mode_row = QHBoxLayout()
        mode_row.addWidget(QLabel("Observer ranges"))
        mode_row.addStretch(1)
        mode_row.addWidget(self.linear_radio)
        mode_row.addWidget(self.log_radio)
        cl.addLayout(mode_row)
        cl.addWidget(self.plot, 1)

        detail = QWidget()
        dl = QVBoxLayout(detail)
        dl.setContentsMargins(0, 0, 0, 0)
        title_row = QHBoxLayout()
        title_row.addWidget(self.detail_title, 1)
        title_row.addWidget(self.hist_log)
        dl.addLayout(title_row)
        dl.addWidget(self.hist, 1)
        dl.addWidget(self.detail_text)

        lower = QSplitter(Qt.Horizontal)
        lower.addWidget(self.table_tabs)
        lower.addWidget(detail)
        lower.addWidget(self.source_panel)
        lower.setStretchFactor(0, 4)
        lower.setStretchFactor(1, 2)
        lower.setStretchFactor(2, 2)
        lower.setSizes([640, 280, 300])
        self.splitter = QSplitter(Qt.Vertical)
        self.splitter.addWidget(chart_box)
        self.splitter.addWidget(lower)
        self.splitter.setStretchFactor(0, 2)
        self.splitter.setStretchFactor(1, 3)
        self.splitter.setSizes([260, 420])

        layout = QVBoxLayout(self)
        layout.addWidget(self.splitter, 1)
        layout.addWidget(self.message)
        self.ranking.sigMessage.connect(self.message.show_message)
        # Long names (one unbreakable word) would widen their pane on every selection: the texts
        # wrap within the width the user gave the pane instead of setting it.
        for label in (self.detail_title, self.detail_text):
            label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
            label.setMinimumWidth(1)

    # -- what the tab shows (kept in self.state) ----------------------------------------
    @property
    def records(self) -> list:
        """The ObserverRecords on screen, forward order."""
        return self.state.records

    @property
    def recalibrating(self) -> bool:
        """Whether an exclude-and-recalibrate run is in progress."""
        return self._recal_task is not None

    # -- the session's events -----------------------------------------------------------
    def set_session(self, session) -> None:
        """Follow this session's events from now on; show its statistics if it has some (a loaded one)."""
        self.session = session
        self._subscriptions.follow(
            session, calibrated=self._on_calibrated, config_changed=self._on_config_changed,
            images_changed=self._on_images_changed, remedied=self._on_remedied,
        )
        self._before = (0, {})
        self._on_images_changed()
        self._forget()
        if getattr(session, "stats_version", 0):
            self.refresh()

    def _on_images_changed(self) -> None:
        self.images = ImageSnapshot.of(self.session)
        self.source_panel.set_context(self.session, self.images)
        self.ranking.show_excluded(self.images)

    def _on_config_changed(self, _config) -> None:
        self._forget()

    def _on_calibrated(self, stats_version: int) -> None:
        """New statistics are shown; the same ones again (a cancelled re-run restored them) change nothing."""
        self._on_images_changed()  # a calibration turns "ok" images into "used" ones
        if not stats_version:
            self._forget()
        elif stats_version != self.state.stats_version:
            self.refresh()

    def _on_remedied(self, result) -> None:
        """After a remedy the table shows, beside each range it changed, the range before it."""
        before = {r.name: (r.min, r.max) for r in getattr(result, "observers_before", [])}
        self._before = (getattr(self.session, "stats_version", 0), before)
        if self.records and self.state.stats_version == self._before[0]:
            self.set_records(self.records)

    # -- data in ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Ask the session for its observer table and ranking (in the worker), once per statistics version."""
        session = self.session
        if session is None or self.state.stats_version == session.stats_version:
            return  # asked for already (by the event and by the window)
        self.state.stats_version = session.stats_version
        self.state.new_statistics()
        self.message.show_message("Reading observer statistics…")

        def work():
            records = session.observer_table()
            return records, ObserverTableModel.prepare(records)

        self._host.submit(
            "observer table", work, takes_progress=False, on_done=lambda out: self.set_records(*out), on_error=self._on_error
        )
        self.refresh_ranking()

    def set_records(self, records: list, prepared: tuple[list, list] | None = None) -> None:
        """Show these ObserverRecords (forward order)."""
        shown = self.state.selected_record()
        keep = shown.name if shown is not None else None
        self.state.locations.clear()
        self.state.wanted = None  # the selection below asks again
        self.state.records = list(records)
        self.state.detail_row = -1
        header = self.table.horizontalHeader()
        if header.sortIndicatorSection() == 0 and header.sortIndicatorOrder() == Qt.AscendingOrder:
            # Rows already arrive in forward order: skip a sort that calls data() thousands of times.
            self.proxy.sort(-1)
        version, before = self._before
        before = before if version and version == self.state.stats_version else {}
        # Only the ranges the remedy moved (a recalibration after smoothing moves many, rounding none).
        before = {
            r.name: before[r.name] for r in self.records
            if r.name in before and not (np.array_equal(before[r.name][0], r.min) and np.array_equal(before[r.name][1], r.max))
        }
        self.model.set_records(self.records, ObserverTableModel.prepare(self.records, before) if before else prepared)
        self.table.setColumnHidden(len(ObserverTableModel.COLUMNS) - 1, not before)
        self._apply_widths()
        n_out = sum(bool(getattr(r, "outlier", False)) for r in self.records)
        # "Outlier" is the core's per-observer test (a few values far beyond that observer's own
        # bulk); a range far wider than its neighbours' is something else, so the widest is named
        # beside the count instead of being hidden behind "0 outliers".
        from core.analysis.metrics import OUTLIER_PERCENTILE, OUTLIER_RATIO_THRESHOLD  # noqa: PLC0415 -- torch stays off the GUI's start

        self.summary.setText(f"{len(self.records)} observers · {n_out} with outlier values" + self._widest_text())
        self.summary.setToolTip(
            f"An observer has outlier values when its largest |value| is over {OUTLIER_RATIO_THRESHOLD:g}× "
            f"the {OUTLIER_PERCENTILE:g}th percentile of its own values (highlighted rows, orange points). "
            "A range that is simply wider than the others' is not counted; the widest is named here."
        )
        self._update_chart()
        note, self._after_note = self._after_note, ""
        if note and self.records:
            self.message.show_message(f"{note} {len(self.records)} observers; {n_out} with outlier ranges.", "ok")
        else:
            self.message.show_message(
                f"{len(self.records)} observers; {n_out} with outlier ranges (highlighted)." if self.records else "No observers yet."
            )
        if self.records:
            names = [r.name for r in self.records]
            # After an exclude-and-recalibrate the user wants to see the same observer again.
            self.select_observer(names.index(keep) if keep in names else 0)
        else:
            self.source_panel.clear_source("Calibrate to see which image set each range.")

    def _widest_text(self) -> str:
        if not self.records:
            return ""
        mins, maxs = self.model.extremes()
        mags = np.nan_to_num(np.maximum(np.abs(mins), np.abs(maxs)), nan=-1.0)  # NaN (an empty observer) never wins
        i = int(np.argmax(mags))
        return f" · widest: #{i} {self.records[i].name} [{fmt_float(mins[i])}, {fmt_float(maxs[i])}]"

    def _apply_widths(self) -> None:
        char = self.table.fontMetrics().horizontalAdvance("0")
        for col, chars in enumerate(ObserverTableModel.WIDTHS):
            self.table.setColumnWidth(col, chars * char + 12)

    def _forget(self) -> None:
        self.state.stats_version = None
        self.state.new_statistics()
        self.set_records([])
        self.show_ranking([])
        self.message.show_message("Calibrate to see the observers' ranges.")

    def _on_error(self, exc: BaseException) -> None:
        self.message.show_message(error_text(exc), "error")

    # -- chart --------------------------------------------------------------------------
    def _update_chart(self) -> None:
        n = len(self.records)
        x = np.arange(n, dtype=float)
        mins, maxs = self.model.extremes()
        log = self.log_radio.isChecked()
        self.plot.setLogMode(x=False, y=log)
        if log:
            # Both ends as magnitudes, each as measured; a zero end has no logarithm, so it is a gap.
            def magnitude(v: np.ndarray) -> np.ndarray:
                v = np.abs(v)
                return np.where(v > 0, v, np.nan)

            self._max_curve.setData(x, magnitude(maxs), connect="finite")
            self._min_curve.setData(x, magnitude(mins), connect="finite")
            self.plot.setLabel("left", "|min| and |max| (log)")
        else:
            self._max_curve.setData(x, maxs)
            self._min_curve.setData(x, mins)
            self.plot.setLabel("left", "range")
        self._fill.setVisible(not log)  # a band between |min| and |max| would mean nothing
        out = np.array([bool(getattr(r, "outlier", False)) for r in self.records], dtype=bool)
        if n and out.any():
            ys = np.maximum(np.abs(mins), np.abs(maxs)) if log else maxs
            ys = np.log10(np.maximum(ys, 1e-30)) if log else ys
            self._outlier_points.setData(x[out], ys[out])
        else:
            self._outlier_points.setData([], [])
        self.plot.enableAutoRange()

    def _on_plot_clicked(self, event) -> None:
        if not self.records:
            return
        vb = self.plot.getPlotItem().vb
        if not vb.sceneBoundingRect().contains(event.scenePos()):
            return
        x = vb.mapSceneToView(event.scenePos()).x()
        self.select_observer(int(np.clip(round(x), 0, len(self.records) - 1)))

    # -- selection ----------------------------------------------------------------------
    def select_observer(self, source_row: int) -> None:
        """Select an observer by its forward index (table row follows)."""
        src = self.model.index(source_row, 0)
        proxy_index = self.proxy.mapFromSource(src)
        if proxy_index.isValid():
            self.table.selectionModel().setCurrentIndex(
                proxy_index, QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows
            )
            self.table.scrollTo(proxy_index)
        else:
            self._show_detail(source_row)

    def _on_current_row(self, current, _previous) -> None:
        if not current.isValid():
            return
        self._show_detail(self.proxy.mapToSource(current).row())

    def _show_detail(self, row: int) -> None:
        if not (0 <= row < len(self.records)):
            return
        rec = self.records[row]
        self.state.detail_row = row
        self._cursor.setValue(row)
        self._cursor.setVisible(True)
        self.detail_title.setText(f"{row}: {rec.name}")
        counts = np.asarray(getattr(rec, "hist_counts", []), dtype=float)
        edges = np.asarray(getattr(rec, "hist_edges", []), dtype=float)
        if counts.size and edges.size == counts.size + 1:
            log = self.hist_log.isChecked()
            self._hist_curve.setData(edges, np.log10(counts + 1.0) if log else counts)
            self.hist.setLabel("left", "log10(count + 1)" if log else "count")
        else:
            self._hist_curve.setData([], [])
        limits = grid_limits(rec)
        if limits is not None and getattr(rec, "enabled", True):
            self._qmin_line.setValue(limits[0])
            self._qmax_line.setValue(limits[1])
            self._qmin_line.setVisible(True)
            self._qmax_line.setVisible(True)
            grid = f"grid [{fmt_float(limits[0])}, {fmt_float(limits[1])}]"
        else:
            self._qmin_line.setVisible(False)
            self._qmax_line.setVisible(False)
            grid = "kept in float" if not getattr(rec, "enabled", True) else "no grid yet"
        self.hist.enableAutoRange()
        self.hist.setLabel("bottom", f"{rec.kind} value")
        pc = " per-channel" if getattr(rec, "per_channel", False) else ""
        self.detail_text.setText(
            f"{rec.dtype} {rec.scheme}{pc} · min {fmt_float(rec.min)} · max {fmt_float(rec.max)} · "
            f"scale {fmt_float(rec.scale)} · zp {self.model.data(self.model.index(row, 9))} · {grid}"
        )
        self.source_panel.show_record(rec)
        self.sigObserverSelected.emit(row)

    # -- exclude / include and recalibrate -------------------------------------------------
    def _recalibrate(self, total: int, text: str, label: str, work, on_done) -> None:
        """Run a recalibration in the worker, the exclude buttons off until it ends."""
        self.source_panel.busy = True
        self.source_panel.exclude_button.setEnabled(False)
        self.ranking.set_busy(True)
        self.source_panel.recal_progress.begin(total, "images", "recalibrating…")
        self.message.show_message(text)
        self._excluding = label
        # Locations looked up before this run finishes describe the old statistics.
        self.state.new_statistics()
        self._recal_task = self._host.submit(
            "recalibrating",
            work,
            on_done=on_done,
            on_error=self._on_recalibrate_error,
            on_progress=self.source_panel.recal_progress.update_progress,
        )

    def _end_recalibration(self) -> None:
        self._recal_task = None
        self.source_panel.busy = False
        self.ranking.set_busy(False)

    def exclude_and_recalibrate(self, paths_or_ids: list[str], label: str) -> None:
        """Run Session.recalibrate_without in the worker, with progress and cancel."""
        session = self.session
        if session is None or self._recal_task is not None:
            return
        usable = self.images.usable_count()
        if usable - len(paths_or_ids) < 1:
            self.message.show_message(f"Excluding {label} would leave no image to calibrate on.", "error")
            return
        remaining = usable - len(paths_or_ids)

        def work(progress, cancel):
            result = session.recalibrate_without(list(paths_or_ids), progress=progress, cancel=cancel)
            return result, [copy.copy(e) for e in session.images]

        text = f"Excluding {label} and recalibrating on {remaining} image(s)…"
        self._recalibrate(remaining, text, label, work, self._on_recalibrated)

    def include_and_recalibrate(self, paths_or_ids: list[str], label: str) -> None:
        """Undo an exclusion: include the image again and calibrate on the full set."""
        session = self.session
        if session is None or self._recal_task is not None:
            return
        total = self.images.usable_count() + len(paths_or_ids)

        def work(progress, cancel):
            session.include_images(list(paths_or_ids))
            result = session.calibrate(progress=progress, cancel=cancel)
            return result, [copy.copy(e) for e in session.images]

        self._recalibrate(total, f"Including {label} again and recalibrating…", label, work, self._on_included)

    def cancel_recalibration(self) -> None:
        """Stop the recalibration; the core restores the earlier statistics and statuses."""
        self.source_panel.recal_progress.cancel_task(self._recal_task)

    def _on_recalibrated(self, payload) -> None:
        result, _ = payload  # the window's status follows the session's events
        self._end_recalibration()
        self.state.locations.clear()
        if getattr(result, "cancelled", False):
            self.source_panel.recal_progress.end("cancelled: the earlier statistics were restored")
            self.message.show_message(f"Cancelled; {self._excluding} is included again and the earlier ranges are kept.")
            self.source_panel.request_location()
            return
        secs = float(getattr(result, "seconds", 0.0) or 0.0)
        self.source_panel.recal_progress.end(f"done: {result.images_done} images in {secs:.1f} s")
        self._after_note = (
            f"Excluded {self._excluding}; recalibrated on {result.images_done} image(s) in {secs:.1f} s; "
            "ranges and errors refreshed."
        )
        self.message.show_message(self._after_note, "ok")

    def _on_included(self, payload) -> None:
        result, _ = payload
        self._end_recalibration()
        self.state.locations.clear()
        label = self._excluding
        secs = float(getattr(result, "seconds", 0.0) or 0.0)
        self.source_panel.recal_progress.end(
            "cancelled: the earlier statistics were kept" if result.cancelled else f"done: {result.images_done} images in {secs:.1f} s"
        )
        if result.cancelled:
            self.message.show_message(
                f"Included {label} again, but the calibration was cancelled: the ranges are still those without it."
            )
            self.source_panel.request_location()
            return
        self._after_note = f"Included {label} again; recalibrated on {result.images_done} image(s)."
        self.message.show_message(self._after_note, "ok")

    def _on_recalibrate_error(self, exc: BaseException) -> None:
        self._end_recalibration()
        self.source_panel.recal_progress.end("failed")
        self.message.show_message(error_text(exc), "error")
        self._host.show_error(exc)
        self.source_panel.request_location()

    # -- image ranking -----------------------------------------------------------------------
    def refresh_ranking(self) -> None:
        """Ask the core which images set the most extremes (in the worker)."""
        session = self.session
        if session is None:
            return
        self._host.submit(
            "image ranking",
            session.rank_images,
            takes_progress=False,
            on_done=self.show_ranking,
            on_error=lambda exc: self.ranking.show_error(error_text(exc)),
        )

    def show_ranking(self, ranks: list) -> None:
        """Fill the ranking with ImageRanks in the core's order (most extremes first)."""
        self.state.ranks = list(ranks)
        self.ranking.show_ranking(self.state.ranks, self.images)
