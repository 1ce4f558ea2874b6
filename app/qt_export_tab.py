"""Export tab: one click to a verified Circle file, then open it in Netron."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.qt_common import QtMessageLine, QtTaskProgress, error_text, fmt_bytes, fmt_float

if TYPE_CHECKING:
    from app.qt_main_window import QtMainWindow


class QtExportTab(QWidget):
    """Static fully-integer Circle export with verification; failures keep the old file."""

    sigExported = Signal(object)
    sigOpenInNetron = Signal(str)

    def __init__(self, host: "QtMainWindow") -> None:
        super().__init__()
        self._host = host
        self._task = None
        self.result = None

        self.path_edit = QLineEdit()
        self.path_edit.setObjectName("exportPath")
        self.path_edit.setPlaceholderText("Output .circle file")
        self.browse_button = QPushButton("Browse…")
        self.export_button = QPushButton("Export Circle")
        self.export_button.setObjectName("exportButton")
        self.export_button.setStyleSheet("QPushButton#exportButton { font-weight: 600; padding: 4px 14px; }")
        self.export_button.setToolTip("Export the quantized model to Circle and verify it (Ctrl+E)")
        self.progress = QtTaskProgress(cancel_name="exportCancelButton")
        self.message = QtMessageLine()
        self.message.show_message("Calibrate first, then export a fully integer Circle model.")

        self.verify_labels: dict[str, QLabel] = {}
        verify_box = QGroupBox("Verification (Circle runtime vs fake-quant torch)")
        form = QFormLayout(verify_box)
        for key, title in (
            ("verdict", "Result"),
            ("max_abs_diff", "Max |diff|"),
            ("peir", "PEIR"),
            ("within_one_step", "Within one step"),
            ("max_steps", "Max steps off"),
            ("runtime", "Runtime"),
            ("path", "File"),
            ("bytes", "Size"),
            ("seconds", "Time"),
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

        path_row = QHBoxLayout()
        path_row.addWidget(QLabel("Output:"))
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(self.browse_button)
        action_row = QHBoxLayout()
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

        layout = QVBoxLayout(self)
        layout.addLayout(path_row)
        layout.addLayout(action_row)
        layout.addWidget(self.message)
        layout.addWidget(body, 1)

        self.browse_button.clicked.connect(self.choose_path)
        self.export_button.clicked.connect(self.export)
        self.progress.cancel_button.clicked.connect(self.cancel)
        self.netron_button.clicked.connect(self._on_open_netron)

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
        session = self._host.session
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

        def work(progress, cancel):
            return session.export(out, progress=progress, cancel=cancel)

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
        ok = not result.tensors_without_qparams and float(verify.within_one_step) >= 0.99
        within = f"{100 * float(verify.within_one_step):.2f}% of outputs within one quantization step"
        self.verify_labels["verdict"].setText(f"verified ✓ — {within}" if ok else f"check the numbers below ⚠ — {within}")
        self.verify_labels["verdict"].setStyleSheet("color: #1b7f3b; font-weight: 600;" if ok else "color: #b26a00; font-weight: 600;")
        self.verify_labels["max_abs_diff"].setText(fmt_float(verify.max_abs_diff))
        self.verify_labels["peir"].setText(fmt_float(verify.peir))
        self.verify_labels["within_one_step"].setText(f"{100 * float(verify.within_one_step):.2f}%")
        self.verify_labels["max_steps"].setText(fmt_float(verify.max_steps, 3))
        self.verify_labels["runtime"].setText(str(verify.runtime))
        self.verify_labels["path"].setText(str(result.path))
        self.verify_labels["bytes"].setText(f"{fmt_bytes(int(result.bytes))} ({int(result.bytes):,} bytes)")
        self.verify_labels["seconds"].setText(f"{float(result.seconds):.1f} s")
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
            self.float_list.addItems([str(t) for t in result.tensors_without_qparams])
        else:
            self.float_list.addItem("none ✓")
        self.float_box.setTitle(
            f"Tensors without quantization parameters: {len(result.tensors_without_qparams)} (expected: none)"
        )
        self.netron_button.setEnabled(True)
        self.message.show_message(f"Exported {result.path} ({fmt_bytes(int(result.bytes))}).", "ok")
        self.sigExported.emit(result)

    def _on_error(self, exc: BaseException) -> None:
        self._task = None
        self.export_button.setEnabled(True)
        self.progress.end("failed")
        kept = " The earlier file, if any, was left untouched."
        self.message.show_message(error_text(exc) + kept, "error")
        self._host.show_error(exc)

    def _on_open_netron(self) -> None:
        if self.result is not None:
            self.sigOpenInNetron.emit(str(self.result.path))
