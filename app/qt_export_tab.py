"""Export tab: one click to a verified Circle file, then open it in Netron."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import (
    SORT_KEY_ROLE,
    QtMessageLine,
    QtSessionTab,
    QtTaskProgress,
    SortKeyItem,
    calibration_text,
    error_text,
    fmt_bytes,
    fmt_float,
    results_table,
    scalar,
)
from core.errors import CancelledError

BAD_BG = QColor(255, 193, 7, 80)

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow


# verdict level -> (mark, colour)
_VERDICT_LOOK = {"verified": ("✓", "#1b7f3b"), "check": ("⚠", "#b26a00"), "failed": ("✗", "#b3261e")}


@dataclass
class ExportViewState:
    """What the Export tab knows beside its widgets (Qt-free)."""

    stats_version: int = 0  # the statistics the tab shows as exportable (0: none)
    auto_path: str = ""  # the output path the tab chose itself (it follows the model; a typed one stays)
    # image path -> (rows, cols) of its patch grid at the session's soft tokens
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)


class QtExportTab(QtSessionTab):
    """Static fully-integer Circle export with verification; failures keep the old file."""

    sigExported = Signal(object)
    sigOpenInNetron = Signal(str)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__(host)
        self.state = ExportViewState()
        self.result = None

        self.path_edit = QLineEdit()
        self.path_edit.setObjectName("exportPath")
        self.path_edit.setPlaceholderText("Output .circle file")
        self.input_combo = QComboBox()
        self.input_combo.setObjectName("exportInputCombo")
        # (label, export_circle input_dtype): integer input by default, a fully integer file.
        for label, value in (("integer pixels (quantized input)", "integer"), ("float pixels + QUANTIZE op", "float")):
            self.input_combo.addItem(label, value)
        self.input_combo.setToolTip(
            "Integer: the caller feeds round(pixel / scale) + zero point (8-bit pixels as they are for scale 1/255, zp 0). "
            "Float: the file quantizes its float input itself."
        )
        self.browse_button = QPushButton("Browse…")
        self.export_button = QPushButton("Export Circle")
        self.export_button.setObjectName("exportButton")
        self.export_button.setStyleSheet("QPushButton#exportButton { font-weight: 600; padding: 4px 14px; }")
        self.export_button.setToolTip("Export the quantized model to Circle and verify it (Ctrl+E)")
        self.progress = QtTaskProgress(cancel_name="exportCancelButton")
        self.message = QtMessageLine()
        self.message.show_message(self.NOT_CALIBRATED)
        # A static Circle file is traced for one image's patch grid (its positions, mask and
        # pooling are baked in); the user picks which calibration image's layout it is built for.
        self.layout_combo = QComboBox()
        self.layout_combo.setObjectName("exportLayoutImage")
        self.layout_combo.setToolTip(
            "The static file is fixed to this image's patch grid; images with another aspect ratio need their own export"
        )
        self.layout_combo.setMinimumContentsLength(18)
        self.layout_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.layout_label = QLabel("")
        self.layout_label.setObjectName("exportLayoutLabel")
        self.layout_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.verify_labels: dict[str, QLabel] = {}
        verify_box = QGroupBox("Verification (Circle runtime vs fake-quant torch)")
        # The rows wrap; in a scroll area each keeps the height its text needs instead of being
        # squeezed (and cut mid-line) when the splitter gives the box less room.
        verify_body = QWidget()
        form = QFormLayout(verify_body)
        form.setContentsMargins(0, 0, 0, 0)
        verify_scroll = QScrollArea()
        verify_scroll.setWidgetResizable(True)
        verify_scroll.setFrameShape(QFrame.NoFrame)
        verify_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        verify_scroll.setWidget(verify_body)
        QVBoxLayout(verify_box).addWidget(verify_scroll)
        for key, title in (
            ("verdict", "Result"),
            ("advice", "What to do"),
            ("noise_floor", "Torch vs itself"),
            ("max_abs_diff", "Max |diff| (PEIR)"),
            ("within_one_step", "Within one step"),
            ("runtime", "Runtime"),
            ("onert", "ONE runtime (onert)"),
            ("input", "Input"),
            ("path", "File"),
            ("bytes", "Size, time"),
        ):
            label = QLabel("—")
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            label.setWordWrap(True)
            self.verify_labels[key] = label
            form.addRow(title + ":", label)
        self.netron_button = QPushButton("Open in Netron")
        self.netron_button.setObjectName("openInNetronButton")
        self.netron_button.setEnabled(False)
        form.addRow("", self.netron_button)

        self.ops_table = QTableWidget(0, 2)
        self.ops_table.setObjectName("opCountsTable")
        self.ops_table.setHorizontalHeaderLabels(["Operator", "Count"])
        self.ops_table.verticalHeader().setVisible(False)
        self.ops_table.horizontalHeader().setStretchLastSection(True)
        self.ops_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.ops_table.setSortingEnabled(True)
        ops_box = QGroupBox("Operators")
        QVBoxLayout(ops_box).addWidget(self.ops_table)

        self.float_list = QListWidget()
        self.float_list.setObjectName("tensorsWithoutQparams")
        self.float_box = QGroupBox("Tensors without quantization parameters (expected: none)")
        QVBoxLayout(self.float_box).addWidget(self.float_list)

        self._build_threeway()

        path_row = QHBoxLayout()
        path_row.addWidget(QLabel("Output:"))
        path_row.addWidget(self.path_edit, 2)
        path_row.addWidget(self.browse_button)
        # On the path's row: a row of its own would push the window past a 768 px screen.
        path_row.addWidget(QLabel("Input layout of:"))
        path_row.addWidget(self.layout_combo)
        path_row.addWidget(self.layout_label, 1)
        self.layout_label.setWordWrap(True)
        self.layout_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        action_row = QHBoxLayout()
        action_row.addWidget(QLabel("Input:"))
        action_row.addWidget(self.input_combo)
        action_row.addWidget(self.export_button)
        action_row.addWidget(self.progress, 1)

        left = QSplitter(Qt.Vertical)
        left.addWidget(verify_box)
        left.addWidget(self.float_box)
        left.setStretchFactor(0, 0)
        left.setStretchFactor(1, 1)
        left.setSizes([320, 300])
        body = QSplitter(Qt.Horizontal)
        body.addWidget(left)
        body.addWidget(ops_box)
        body.setSizes([620, 420])
        self.body_splitter = QSplitter(Qt.Vertical)
        self.body_splitter.addWidget(body)
        self.body_splitter.addWidget(self.threeway_box)
        self.body_splitter.setSizes([420, 330])

        layout = QVBoxLayout(self)
        layout.addLayout(path_row)
        layout.addLayout(action_row)
        layout.addWidget(self.message)
        layout.addWidget(self.body_splitter, 1)

        self.browse_button.clicked.connect(self.choose_path)
        self.export_button.clicked.connect(self.export)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.netron_button.clicked.connect(self._on_open_netron)
        self.layout_combo.currentIndexChanged.connect(self._on_layout_image)

    NOT_CALIBRATED = "Calibrate first, then export a fully integer Circle model."

    def set_session(self, session) -> None:
        """Follow this session: exportable while it holds statistics."""
        self._session = session
        path = self.path_edit.text()
        self.state = ExportViewState(auto_path=self.state.auto_path)
        if not path or path == self.state.auto_path:
            self.state.auto_path = self._host.default_export_path(str(session.model_spec))
            self.path_edit.setText(self.state.auto_path)
        handlers = {"calibrated": self._on_statistics, "config_changed": self._on_statistics}
        self._subscriptions.replace(getattr(session, "events", None), handlers)
        self._on_statistics(force=True)

    def _on_statistics(self, *_args, force: bool = False) -> None:
        session = self._session
        calibrated = getattr(session, "state", "") == "calibrated"
        version = int(getattr(session, "stats_version", 0)) if calibrated else 0
        if version == self.state.stats_version and not force:
            return  # the same statistics (a cancelled run put them back): the choices still hold
        self.state.stats_version = version
        if not calibrated:
            self.set_calibration(None)
            return
        used = [e.path for e in tuple(session.images) if e.status == "used"]
        self.set_calibration(calibration_text(session.calibration), used)

    def set_calibration(self, text: str | None, images: list[str] | None = None) -> None:
        """Say whether the session can be exported (text: its calibration; None: not calibrated)
        and list the calibration images whose patch grid the file can be built for."""
        self.state.grids = {}
        self.layout_combo.blockSignals(True)
        self.layout_combo.clear()
        for path in images or []:
            self.layout_combo.addItem(Path(path).name, path)
            self.layout_combo.setItemData(self.layout_combo.count() - 1, path, Qt.ToolTipRole)
        self.layout_combo.blockSignals(False)
        self.layout_combo.setEnabled(bool(images))
        if text is None:
            self.message.show_message(self.NOT_CALIBRATED)
            self.layout_label.setText("")
            return
        self.message.show_message(f"Ready to export: calibrated on {text}. Choose the output file and press Export Circle.")
        self._on_layout_image()

    def layout_image(self) -> str | None:
        """Path of the image whose patch grid the exported file is built for."""
        data = self.layout_combo.currentData()
        return None if data is None else str(data)

    def _on_layout_image(self, *_args) -> None:
        path = self.layout_image()
        session = self._session
        if path is None or session is None:
            self.layout_label.setText("")
            return
        if path in self.state.grids:
            self._show_grid(path)
            return
        self.layout_label.setText(f"reading the patch grid of {Path(path).name}…")

        def work():
            return path, session.patch_grid(path)

        def done(payload) -> None:
            shown, grid = payload
            self.state.grids[shown] = grid
            if shown == self.layout_image():
                self._show_grid(shown)

        def failed(exc: BaseException) -> None:
            self.layout_label.setText(error_text(exc))

        self._host.submit("reading patch grid", work, takes_progress=False, on_done=done, on_error=failed)

    def _show_grid(self, path: str) -> None:
        rows, cols = self.state.grids[path]
        self.layout_label.setText(f"the file is fixed to {rows}×{cols} patches of {Path(path).name}")

    def choose_path(self) -> None:
        """Pick the output file."""
        start = self.path_edit.text() or str(Path(self._host.last_folder("export")) / "model.circle")
        path, _ = QFileDialog.getSaveFileName(self, "Export Circle model", start, "Circle models (*.circle)")
        if path:
            if not path.endswith(".circle"):
                path += ".circle"
            self.path_edit.setText(path)
            self._host.remember_folder("export", str(Path(path).parent))

    def export(self) -> None:
        """Export to the path in the box, in the worker."""
        session = self._session
        if session is None or self._task is not None:
            return
        text = self.path_edit.text().strip()
        if not text:
            self.message.show_message("Choose an output file first.", "error")
            return
        out = Path(text).expanduser()
        self.export_button.setEnabled(False)
        self.progress.begin(0, "steps", "exporting…")
        self.message.show_message(f"Exporting to {out}…")

        input_dtype = self.input_combo.currentData()
        image = self.layout_image()

        def work(progress, cancel):
            # In a child process: TICO's pure-Python converter would otherwise starve the UI thread.
            return session.export(out, image=image, progress=progress, cancel=cancel, input_dtype=input_dtype, in_process=False)

        self._task = self._host.submit(
            "export", work, on_done=self._on_exported, on_error=self._on_error, on_progress=self.progress.update_progress
        )

    def cancel(self) -> None:
        """Cancel the export; the earlier file stays as it was."""
        if self._task is not None:
            self._task.token.cancel()

    def _on_exported(self, result) -> None:
        self._task = None
        self.result = result
        self.export_button.setEnabled(True)
        self.progress.end(f"exported in {float(result.seconds):.1f} s")
        verify = result.verify
        # The verdict is core's (core.export.verdict): the file against torch's own rounding noise, measured
        # on this machine, so it means the same on every CPU.
        verdict = verify.verdict
        mark, colour = _VERDICT_LOOK[verdict.level]
        headline = {"verified": "verified", "check": "check", "failed": "failed"}[verdict.level]
        reason = f" — {verdict.reason}" if verdict.reason else ""
        self.verify_labels["verdict"].setText(f"{headline} {mark} — {verdict.summary}{reason}")
        self.verify_labels["verdict"].setStyleSheet(f"color: {colour}; font-weight: 600;")
        self.verify_labels["advice"].setText(verdict.advice or "nothing: the file computes what the inspected model computes")
        floor = verify.noise_floor
        if floor is not None:
            share = f"{100 * floor.within_one_step:.2f}% within one step, " if floor.within_one_step is not None else ""
            self.verify_labels["noise_floor"].setText(
                f"{share}max |diff| {fmt_float(floor.max_abs)} under {floor.rel:.2g} relative rounding noise "
                f"(this machine's float32 GEMM error), worst of {floor.draws} runs"
            )
        self.verify_labels["max_abs_diff"].setText(f"{fmt_float(verify.max_abs_diff)} (PEIR {fmt_float(verify.peir)})")
        self.verify_labels["within_one_step"].setText(
            f"{100 * float(verify.within_one_step):.2f}% (at most {fmt_float(verify.max_steps, 3)} steps off)"
        )
        self.verify_labels["runtime"].setText(str(verify.runtime))
        self.verify_labels["onert"].setText(verify.onert.summary() if verify.onert is not None else "not run")
        # The verdict above names any op that changes dtype silently (core.export.pipeline.structural_problems).
        self.verify_labels["input"].setText(next((t for t in result.io_tensors if t.startswith("input")), "?"))
        self.verify_labels["path"].setText(str(result.path))
        self.verify_labels["bytes"].setText(
            f"{fmt_bytes(int(result.bytes))} ({int(result.bytes):,} bytes), exported and verified in {float(result.seconds):.1f} s"
        )
        self.ops_table.setSortingEnabled(False)
        ops = sorted(result.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.ops_table.setRowCount(len(ops))
        for row, (name, count) in enumerate(ops):
            self.ops_table.setItem(row, 0, QTableWidgetItem(str(name)))
            item = QTableWidgetItem()
            item.setData(Qt.DisplayRole, int(count))
            self.ops_table.setItem(row, 1, item)
        self.ops_table.setSortingEnabled(True)
        self.ops_table.sortItems(1, Qt.DescendingOrder)
        self.ops_table.resizeColumnsToContents()
        self.float_list.clear()
        if result.tensors_without_qparams:
            modules = dict(getattr(result, "unquantized", None) or [])
            for tensor in result.tensors_without_qparams:
                module = modules.get(tensor) or getattr(result, "tensor_modules", {}).get(tensor, "")
                item = QListWidgetItem(f"{tensor}    ← {module}" if module else str(tensor))
                item.setData(Qt.UserRole, (str(tensor), str(module)))
                detail = getattr(result, "unquantized_details", {}).get(tensor, "")
                item.setToolTip(f"tensor: {tensor}\nmodule: {module or '?'}" + (f"\n{detail}" if detail else ""))
                self.float_list.addItem(item)
        else:
            self.float_list.addItem("none ✓")
        self.float_box.setTitle(
            f"Tensors without quantization parameters: {len(result.tensors_without_qparams)} (expected: none)"
        )
        self.netron_button.setEnabled(True)
        self.threeway_button.setEnabled(True)
        self.threeway_table.setRowCount(0)
        self.threeway_note.setText("Press “Run three-way check” to compare float, fake-quant and Circle tensor by tensor.")
        self.threeway_note.setStyleSheet("color: palette(dark);")
        self.message.show_message(f"Exported {result.path} ({fmt_bytes(int(result.bytes))}).", "ok")
        self.sigExported.emit(result)

    def _on_error(self, exc: BaseException) -> None:
        self._task = None
        self.export_button.setEnabled(True)
        self.progress.end("failed")
        # A cancel's own message already says the earlier file was kept.
        kept = "" if isinstance(exc, CancelledError) else " The earlier file, if any, was left untouched."
        self.message.show_message(error_text(exc) + kept, "error")
        self._host.show_error(exc)

    def _on_open_netron(self) -> None:
        if self.result is not None:
            self.sigOpenInNetron.emit(str(self.result.path))

    # -- three-way check ------------------------------------------------------------------------
    # The verdict columns come first: the Circle tensor names are long and go last.
    THREEWAY_COLUMNS = (
        "#", "Module", "FP vs fake-quant PEIR", "Fake-quant vs Circle PEIR", "Within one step", "Max steps",
        "FP vs Circle PEIR", "dtype", "Scale", "Zero point", "Shape", "Tensor",
    )
    NUMERIC_COLUMNS = frozenset({0, 2, 3, 4, 5, 6, 8, 9})
    # Column names above are the keys; the header shows two short lines and the tooltip the full meaning,
    # because the one-line names were cut off ("vs fake-quant PI") at any usable column width.
    _PEIR = "PEIR = max|a − b| / (max a − min a), a the reference: the peak error over the reference's range."
    THREEWAY_HEADERS = {
        "#": ("#", "Forward (Circle operator) order."),
        "Module": ("Module", "The torch module whose output this Circle tensor is."),
        "FP vs fake-quant PEIR": ("PEIR\nfloat→fake-quant", f"FP vs fake-quant PEIR: fake-quant torch against float, "
                                  f"the quantization error itself. {_PEIR}"),
        "Fake-quant vs Circle PEIR": ("PEIR\nfake-quant→Circle", f"Fake-quant vs Circle PEIR: the Circle file against "
                                      f"fake-quant torch, what export and the runtime add. {_PEIR}"),
        "Within one step": ("Within\none step", "Share of the Circle tensor's values within one quantization step "
                            "(its scale) of fake-quant torch."),
        "Max steps": ("Max\nsteps", "The largest Circle vs fake-quant difference, in quantization steps (scale)."),
        "FP vs Circle PEIR": ("PEIR\nfloat→Circle", f"FP vs Circle PEIR: the Circle file against float, "
                              f"everything together. {_PEIR}"),
        "dtype": ("dtype", "The Circle tensor's dtype."),
        "Scale": ("Scale", "The Circle tensor's quantization scale."),
        "Zero point": ("Zero\npoint", "The Circle tensor's quantization zero point."),
        "Shape": ("Shape", "The Circle tensor's shape."),
        "Tensor": ("Circle tensor", "The tensor's name in the Circle file."),
    }

    def _build_threeway(self) -> None:
        self._threeway_task = None
        self.threeway = None
        self.threeway_button = QPushButton("Run three-way check")
        self.threeway_button.setObjectName("threeWayButton")
        self.threeway_button.setToolTip(
            "Run float, fake-quant torch and the Circle file on the same image and compare every tensor"
        )
        self.threeway_button.setEnabled(False)
        self.threeway_progress = QtTaskProgress(cancel_name="threeWayCancelButton")
        self.threeway_note = QLabel("Export first; then compare float, fake-quant and Circle tensor by tensor.")
        self.threeway_note.setObjectName("threeWayNote")
        self.threeway_note.setWordWrap(True)
        self.threeway_note.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.threeway_note.setStyleSheet("color: palette(dark);")
        self.threeway_table = results_table(self.THREEWAY_COLUMNS, "threeWayTable")
        self.threeway_table.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.threeway_table.horizontalHeader().setSectionResizeMode(QHeaderView.Interactive)
        self.threeway_table.horizontalHeader().setStretchLastSection(True)
        for c, name in enumerate(self.THREEWAY_COLUMNS):
            text, tip = self.THREEWAY_HEADERS[name]
            header = QTableWidgetItem(text)
            header.setToolTip(tip)
            self.threeway_table.setHorizontalHeaderItem(c, header)
        self.threeway_table.resizeColumnsToContents()  # empty: every column as wide as its header
        self.threeway_box = QGroupBox("Three-way check: float vs fake-quant torch vs Circle, per tensor")
        tl = QVBoxLayout(self.threeway_box)
        row = QHBoxLayout()
        row.addWidget(self.threeway_button)
        row.addWidget(self.threeway_progress, 1)
        tl.addLayout(row)
        tl.addWidget(self.threeway_note)
        tl.addWidget(self.threeway_table, 1)
        self.threeway_button.clicked.connect(self.run_threeway)
        self.threeway_progress.cancel_button.clicked.connect(self.cancel_threeway)

    def run_threeway(self) -> None:
        """Compare float, fake-quant and the exported Circle file tensor by tensor (in the worker)."""
        session = self._session
        result = self.result
        if session is None or result is None or self._threeway_task is not None:
            return
        self.threeway_button.setEnabled(False)
        self.threeway_progress.begin(0, "steps", "three-way check…")
        self.threeway_note.setText(f"Running {Path(str(result.path)).name} beside the float and fake-quant models…")

        def work(progress, cancel):
            return session.three_way(result, progress=progress, cancel=cancel)

        self._threeway_task = self._host.submit(
            "three-way check",
            work,
            on_done=self._on_threeway,
            on_error=self._on_threeway_error,
            on_progress=self.threeway_progress.update_progress,
        )

    def cancel_threeway(self) -> None:
        """Stop the three-way check; the table keeps its earlier rows."""
        self.threeway_progress.cancel_task(self._threeway_task)

    def _on_threeway(self, three) -> None:
        self._threeway_task = None
        self.threeway_button.setEnabled(True)
        self.threeway = three
        rows = list(three.rows)
        self.threeway_progress.end(f"{len(rows)} tensors compared")
        note = str(getattr(three, "note", "") or "")
        unmatched = list(getattr(three, "unmatched", []) or [])
        self.threeway_note.setToolTip(
            "\n".join(f"{module}: {why}" for module, why in unmatched[:40]) if unmatched else ""
        )
        if getattr(three, "intermediates_available", True):
            image = getattr(three, "image", None)
            self.threeway_note.setText((f"On {image}: " if image else "") + (note or f"{len(rows)} tensors compared."))
            self.threeway_note.setStyleSheet("color: palette(text);")
        else:
            # Plain words: the runtime could not give the inner tensors, so only some rows have a Circle column.
            self.threeway_note.setText(f"⚠ Circle intermediates are not available: {note}")
            self.threeway_note.setStyleSheet("color: #b26a00; font-weight: 600;")
        table = self.threeway_table
        table.setSortingEnabled(False)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            fq_circle = _peir(row.fq_vs_circle)
            within = _field(row, "within_one_step")
            steps = _field(row, "max_steps", "steps")
            fp_circle = _peir(row.fp_vs_circle)
            cells = [
                (str(r), float(r)),
                (str(row.module), str(row.module)),
                (fmt_float(_peir(row.fp_vs_fq)), scalar(_peir(row.fp_vs_fq))),
                (fmt_float(fq_circle) if fq_circle is not None else "n/a", scalar(fq_circle)),
                (f"{100 * float(within):.2f}%" if within is not None else "n/a", scalar(within)),
                (fmt_float(steps, 3) if steps is not None else "n/a", scalar(steps)),
                (fmt_float(fp_circle) if fp_circle is not None else "n/a", scalar(fp_circle)),
                (str(row.dtype), str(row.dtype)),
                (fmt_float(row.scale), scalar(row.scale)),
                (fmt_float(row.zero_point, 6), scalar(row.zero_point)),
                ("×".join(str(int(d)) for d in row.shape) if row.shape is not None else "", str(row.shape)),
                (str(row.tensor), str(row.tensor)),
            ]
            # Marked by core's verdict for the row: beyond torch's own rounding noise for that tensor.
            verdict = getattr(row, "verdict", "")
            off = verdict not in ("", "verified")
            tip = f"{row.module}\nCircle tensor: {row.tensor}"
            floor = getattr(row, "noise_floor", None)
            if floor is not None and floor.within_one_step is not None:
                tip += f"\ntorch vs itself under rounding noise: {100 * floor.within_one_step:.2f}% within one step"
            if verdict:
                tip += f"\nverdict: {verdict}"
            for c, (text, key) in enumerate(cells):
                item = SortKeyItem(text)
                item.setData(SORT_KEY_ROLE, key)
                item.setToolTip(tip)
                if c in self.NUMERIC_COLUMNS:
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                if off and c in (4, 5):
                    item.setBackground(BAD_BG)
                table.setItem(r, c, item)
        table.setSortingEnabled(True)
        table.sortItems(0, Qt.AscendingOrder)  # forward (Circle operator) order, as the core gives them
        table.resizeColumnsToContents()
        table.setColumnWidth(1, min(table.columnWidth(1), 300))

    def _on_threeway_error(self, exc: BaseException) -> None:
        self._threeway_task = None
        self.threeway_button.setEnabled(self.result is not None)
        if isinstance(exc, CancelledError):
            self.threeway_progress.end("cancelled")
            self.threeway_note.setText("Three-way check cancelled.")
            return
        self.threeway_progress.end("failed")
        self.threeway_note.setText(error_text(exc))
        self.threeway_note.setStyleSheet("color: #b00020; font-weight: 600;")
        self._host.show_error(exc)


def _peir(value):
    """A PEIR from a comparison field: a number, or an object with .peir (None when absent)."""
    if value is None:
        return None
    peir = getattr(value, "peir", value)
    try:
        return float(peir)
    except (TypeError, ValueError):
        return None


def _field(row, *names):
    """A per-row number that may sit on the row or on its fake-quant-vs-Circle comparison."""
    for holder in (row, getattr(row, "fq_vs_circle", None)):
        for name in names:
            value = getattr(holder, name, None)
            if value is not None:
                try:
                    return float(value)
                except (TypeError, ValueError):
                    continue
    return None
