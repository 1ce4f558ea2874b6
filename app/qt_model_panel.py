"""The model panel: which model, how to quantize it, and the session summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from core.config import OBSERVERS, PTQConfig, build_config
from core.data.device import DEVICES, device_unavailable
from core.data.images import DEFAULT_SOFT_TOKENS, SUPPORTED_SOFT_TOKENS
from core.quant.dtypes import DTYPES

# The built-in weights are random (seeded); the names say so, so a low SQNR is not read as a broken quantizer.
MODEL_CHOICES = [
    ("Built-in tiny model (random weights)", "tiny"),
    ("Gemma 4 E2B-shaped model (random weights)", "e2b"),
    ("E2B-shaped, chaotic init (stress test)", "e2b-chaotic"),
    # Same float function, a few activation channels 20-100x larger (core.models.inject_outliers):
    # the case SmoothQuant and CLE are for.
    ("Built-in tiny model with activation outliers (random weights)", "tiny+outliers"),
    ("E2B-shaped model with activation outliers (random weights)", "e2b+outliers"),
]

def config_from_settings(settings: dict[str, Any], extra_overrides: dict[str, Any]) -> PTQConfig:
    """The PTQConfig the panel's values (QtModelPanel.settings) describe, plus per-module overrides."""
    return build_config(
        activation=settings["activation"],
        weight=settings["weight"],
        observer=settings["observer"],
        overrides=extra_overrides,
        keep_float=settings["keep_float"],
    )


class QtModelPanel(QWidget):
    """Which model, and how to quantize it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("modelPanel")
        self.checkpoint_folder: str | None = None

        self.model_combo = QComboBox()
        self.model_combo.setObjectName("modelCombo")
        for title, spec in MODEL_CHOICES:
            self.model_combo.addItem(title, spec)
            self.model_combo.setItemData(
                self.model_combo.count() - 1,
                "Weights drawn from a fixed seed, not trained: the shapes and cost are real, the accuracy is not. "
                "Open a checkpoint folder for a trained model.",
                Qt.ToolTipRole,
            )
        self.device_combo = QComboBox()
        self.device_combo.setObjectName("deviceCombo")
        self.device_combo.setToolTip("Where calibration and the analysis run (export runs on the same device)")
        for device in DEVICES:
            self.device_combo.addItem(device, device)
            why_not = device_unavailable(device)
            if why_not is not None:
                # Shown but not selectable: the user sees the choice exists and why it is off here.
                item = self.device_combo.model().item(self.device_combo.count() - 1)
                item.setEnabled(False)
                item.setToolTip(why_not)
        if device_unavailable("cuda") is not None:
            self.device_combo.setToolTip(f"{self.device_combo.toolTip()}; cuda: {device_unavailable('cuda')}")
        self.open_checkpoint_button = QPushButton("Open checkpoint folder…")
        self.model_info = QLabel("loading…")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.model_info.setStyleSheet("color: palette(dark);")

        model_box = QGroupBox("Model")
        ml = QVBoxLayout(model_box)
        ml.addWidget(self.model_combo)
        device_row = QFormLayout()
        device_row.addRow("Device:", self.device_combo)
        ml.addLayout(device_row)
        ml.addWidget(self.open_checkpoint_button)
        ml.addWidget(self.model_info)

        self.activation_combo = QComboBox()
        self.activation_combo.setObjectName("activationDtype")
        self.activation_combo.addItems(list(DTYPES))
        self.weight_combo = QComboBox()
        self.weight_combo.setObjectName("weightDtype")
        self.weight_combo.addItems(list(DTYPES))
        self.observer_combo = QComboBox()
        self.observer_combo.setObjectName("observerKind")
        self.observer_combo.addItems(list(OBSERVERS))
        self.tokens_combo = QComboBox()
        self.tokens_combo.setObjectName("maxSoftTokens")
        for n in SUPPORTED_SOFT_TOKENS:
            self.tokens_combo.addItem(str(n), n)
        self.tokens_combo.setCurrentIndex(SUPPORTED_SOFT_TOKENS.index(DEFAULT_SOFT_TOKENS))
        self.keep_float_edit = QPlainTextEdit()
        self.keep_float_edit.setObjectName("keepFloatGlobs")
        self.keep_float_edit.setPlaceholderText("one glob per line, e.g.\nencoder.layers.0.*\n*.mlp.down_proj")
        self.keep_float_edit.setMaximumHeight(90)
        self.apply_button = QPushButton("Apply settings")
        self.apply_button.setObjectName("applySettingsButton")
        self.apply_button.setEnabled(False)
        self.dirty_label = QLabel("")
        self.dirty_label.setWordWrap(True)
        self.dirty_label.setStyleSheet("color: #b26a00;")

        quant_box = QGroupBox("Quantization")
        form = QFormLayout(quant_box)
        form.addRow("Activations:", self.activation_combo)
        form.addRow("Weights:", self.weight_combo)
        form.addRow("Observer:", self.observer_combo)
        form.addRow("Max soft tokens:", self.tokens_combo)
        form.addRow(QLabel("Keep in float (globs):"))
        form.addRow(self.keep_float_edit)
        form.addRow(self.apply_button)
        form.addRow(self.dirty_label)

        summary_box = QGroupBox("Session")
        summary = QFormLayout(summary_box)
        self.summary: dict[str, QLabel] = {}
        for key, title in (
            ("state", "State"),
            ("images", "Images"),
            ("calibration", "Calibration"),
            ("end_to_end", "End-to-end"),
            ("overrides", "A/B overrides"),
            ("export", "Last export"),
        ):
            label = QLabel("—")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            self.summary[key] = label
            summary.addRow(title + ":", label)
        self.summary_form = summary
        summary.setRowVisible(self.summary["overrides"], False)  # shown once an A/B merge adds some

        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addWidget(quant_box)
        layout.addWidget(summary_box)
        layout.addStretch(1)

    def keep_float_globs(self) -> list[str]:
        """Non-empty lines of the keep-float box."""
        return [line.strip() for line in self.keep_float_edit.toPlainText().splitlines() if line.strip()]

    def model_spec(self) -> str:
        """tiny, e2b or the checkpoint folder."""
        return str(self.model_combo.currentData())

    def device(self) -> str:
        """The chosen device: cpu, cuda or auto (core.data.device.DEVICES)."""
        return str(self.device_combo.currentData())

    def set_device(self, device: str) -> None:
        """Select the device entry (cpu when the name is not offered)."""
        self.device_combo.setCurrentIndex(max(0, self.device_combo.findData(device)))

    def settings(self) -> dict[str, Any]:
        """Every setting as plain values."""
        return {
            "model_spec": self.model_spec(),
            "device": self.device(),
            "activation": self.activation_combo.currentText(),
            "weight": self.weight_combo.currentText(),
            "observer": self.observer_combo.currentText(),
            "max_soft_tokens": int(self.tokens_combo.currentData()),
            "keep_float": self.keep_float_globs(),
        }

    def set_model_spec(self, spec: str) -> None:
        """Select (or add) the model entry for spec."""
        index = self.model_combo.findData(spec)
        if index < 0:
            self.model_combo.addItem(f"Checkpoint: {Path(spec).name}", spec)
            index = self.model_combo.count() - 1
        self.model_combo.setCurrentIndex(index)

    def show_model_info(self, info: dict[str, Any], builtin: bool) -> None:
        """One line on the loaded model; built-in weights are said to be random."""
        parts = [str(info.get("name", "model"))]
        if isinstance(info.get("parameters"), (int, float)):
            parts.append(f"{info['parameters'] / 1e6:.2f} M parameters")
        if info.get("layers") is not None:
            parts.append(f"{info['layers']} layers")
        if info.get("hidden_size") is not None:
            parts.append(f"hidden {info['hidden_size']}")
        if builtin:
            # Built-in weights are drawn from a seed, not trained: low SQNR here says nothing of the quantizer.
            parts.append("random weights (seeded), not a trained model")
        self.model_info.setText(" · ".join(parts))

    def show_config(self, cfg) -> None:
        """Set the dtype and observer boxes and the keep-float globs from a PTQConfig."""
        if cfg is None:
            return
        for combo, value in (
            (self.activation_combo, getattr(getattr(cfg, "activation", None), "dtype", None)),
            (self.weight_combo, getattr(getattr(cfg, "weight", None), "dtype", None)),
            (self.observer_combo, getattr(cfg, "observer", None)),
        ):
            if value is not None and combo.findText(str(value)) >= 0:
                combo.setCurrentIndex(combo.findText(str(value)))
        overrides = getattr(cfg, "overrides", None) or {}
        globs = [
            g
            for g, spec in overrides.items()
            if spec == "float" or getattr(spec, "keep_float", False) or getattr(spec, "dtype", None) == "float"
        ]
        self.keep_float_edit.setPlainText("\n".join(globs))
