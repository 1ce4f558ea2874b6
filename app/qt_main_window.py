"""PTQ Studio main window: model panel, five tabs, status bar, File menu."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import psutil
from PySide6.QtCore import QSettings, QSize, QStandardPaths, Qt, QTimer, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QMainWindow,
    QMenu,
    QPlainTextEdit,
    QPushButton,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.qt_ab_tab import QtABTab
from app.qt_calibration_tab import QtCalibrationTab
from app.qt_common import error_text, fmt_bytes
from app.qt_errors_tab import QtErrorsTab
from app.qt_export_tab import QtExportTab
from app.qt_netron_tab import QtNetronTab
from app.qt_ranges_tab import QtRangesTab
from app.workers import SessionRunner, Task
from core.models import SPECS

DTYPES = ["uint8", "int8", "int16", "uint4", "int4"]
OBSERVERS = ["minmax", "ema", "percentile"]
SOFT_TOKENS = [70, 140, 280, 560, 1120]
# The built-in weights are random (seeded); the names say so, so a low SQNR is not read as a broken quantizer.
MODEL_CHOICES = [
    ("Built-in tiny model (random weights)", "tiny"),
    ("Gemma 4 E2B-shaped model (random weights)", "e2b"),
    ("E2B-shaped, chaotic init (stress test)", "e2b-chaotic"),
]
MAX_RECENT = 8


def _check_keep_float(session, config) -> None:
    """ConfigError naming a keep-float or override glob that matches no module of the session's model."""
    qmodel = getattr(session, "qmodel", None)
    if qmodel is None:  # stand-in sessions of the tests have no wrapped model
        return
    from core.analysis.abtest import owner_modules  # noqa: PLC0415

    config.check_globs(owner_modules(qmodel), "keep-float")


def _default_session_factory(model_spec: str, config, max_soft_tokens: int):
    from core.session import Session  # noqa: PLC0415 - the core is imported once the UI is up

    return Session(model_spec=model_spec, config=config, max_soft_tokens=max_soft_tokens)


def _default_session_loader(folder: str):
    from core.session import Session  # noqa: PLC0415

    return Session.load(folder)


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
        self.open_checkpoint_button = QPushButton("Open checkpoint folder…")
        self.model_info = QLabel("loading…")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.model_info.setStyleSheet("color: palette(dark);")

        model_box = QGroupBox("Model")
        ml = QVBoxLayout(model_box)
        ml.addWidget(self.model_combo)
        ml.addWidget(self.open_checkpoint_button)
        ml.addWidget(self.model_info)

        self.activation_combo = QComboBox()
        self.activation_combo.setObjectName("activationDtype")
        self.activation_combo.addItems(DTYPES)
        self.weight_combo = QComboBox()
        self.weight_combo.setObjectName("weightDtype")
        self.weight_combo.addItems(DTYPES)
        self.observer_combo = QComboBox()
        self.observer_combo.setObjectName("observerKind")
        self.observer_combo.addItems(OBSERVERS)
        self.tokens_combo = QComboBox()
        self.tokens_combo.setObjectName("maxSoftTokens")
        for n in SOFT_TOKENS:
            self.tokens_combo.addItem(str(n), n)
        self.tokens_combo.setCurrentIndex(SOFT_TOKENS.index(280))
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

    def settings(self) -> dict[str, Any]:
        """Every setting as plain values."""
        return {
            "model_spec": self.model_spec(),
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


class QtMainWindow(QMainWindow):
    """The window; it owns the Session and the worker that runs it."""

    def __init__(
        self,
        model_spec: str = "tiny",
        images: list[Path] | None = None,
        max_soft_tokens: int = 280,
        settings: QSettings | None = None,
        session_factory: Callable[..., Any] | None = None,
        session_loader: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__()
        self._ready = False
        self.setWindowTitle("PTQ Studio")
        self.settings = settings if settings is not None else QSettings("PTQ Studio", "PTQ Studio")
        self._session_factory = session_factory or _default_session_factory
        self._session_loader = session_loader or _default_session_loader
        self.session = None
        self._deferred: list[Callable[[], None]] = []
        self._applied: dict[str, Any] = {}
        # Per-module overrides that came from an A/B comparison ("Apply merged config"); the
        # panel cannot show them, so they are kept here and added to every config it builds.
        self.extra_overrides: dict[str, Any] = {}
        self.runner = SessionRunner(self)
        self.runner.sigBusyChanged.connect(self._on_busy_changed)
        self.runner.sigQueueChanged.connect(self.refresh_status)

        # tabs
        self.calibration_tab = QtCalibrationTab(self)
        self.ranges_tab = QtRangesTab(self)
        self.errors_tab = QtErrorsTab(self)
        self.ab_tab = QtABTab(self)
        self.export_tab = QtExportTab(self)
        self.netron_tab = QtNetronTab(self)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("mainTabs")
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.calibration_tab, "Calibration")
        self.tabs.addTab(self.ranges_tab, "Ranges")
        self.tabs.addTab(self.errors_tab, "Errors")
        self.tabs.addTab(self.ab_tab, "A/B")
        self.tabs.addTab(self.export_tab, "Export")
        self.tabs.addTab(self.netron_tab, "Netron")
        self.setCentralWidget(self.tabs)
        self.calibration_tab.sigCalibrated.connect(self._on_calibrated)
        self.errors_tab.sigEvaluated.connect(self._on_evaluated)
        self.export_tab.sigExported.connect(self._on_exported)
        self.export_tab.sigOpenInNetron.connect(self.open_in_netron)

        # model panel
        self.model_panel = QtModelPanel()
        self.dock = QDockWidget("Model && settings", self)
        self.dock.setObjectName("modelPanelDock")
        self.dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.dock.setWidget(self.model_panel)
        self.addDockWidget(Qt.LeftDockWidgetArea, self.dock)
        self.model_panel.set_model_spec(model_spec)
        self.model_panel.tokens_combo.setCurrentIndex(SOFT_TOKENS.index(max_soft_tokens) if max_soft_tokens in SOFT_TOKENS else 2)
        for widget in (
            self.model_panel.model_combo,
            self.model_panel.activation_combo,
            self.model_panel.weight_combo,
            self.model_panel.observer_combo,
            self.model_panel.tokens_combo,
        ):
            widget.currentIndexChanged.connect(self._on_settings_edited)
        self.model_panel.keep_float_edit.textChanged.connect(self._on_settings_edited)
        self.model_panel.apply_button.clicked.connect(self.apply_settings)
        self.model_panel.open_checkpoint_button.clicked.connect(self.choose_checkpoint)

        self._build_menu()
        self._build_status_bar()
        self._restore_window()
        self._ready = True

        self._auto_export_path = self.default_export_path(model_spec)
        self.export_tab.path_edit.setText(self._auto_export_path)
        self._load_session(self.model_panel.settings(), images=list(images or []))

    # -- menu and status ----------------------------------------------------------------
    def _build_menu(self) -> None:
        menu = self.menuBar().addMenu("&File")

        def action(text: str, slot, shortcut=None) -> QAction:
            act = QAction(text, self)
            if shortcut is not None:
                act.setShortcut(QKeySequence(shortcut))
            act.triggered.connect(slot)
            menu.addAction(act)
            return act

        self.open_session_action = action("&Open session…", self.choose_session_to_open, QKeySequence.Open)
        self.save_session_action = action("&Save session…", self.choose_session_to_save, QKeySequence.Save)
        self.recent_menu = QMenu("Recent sessions", self)
        menu.addMenu(self.recent_menu)
        menu.addSeparator()
        self.add_images_action = action("&Add images…", self.calibration_tab.choose_images, "Ctrl+I")
        self.export_action = action("&Export Circle", self._export_from_menu, "Ctrl+E")
        menu.addSeparator()
        self.quit_action = action("&Quit", self.close, QKeySequence.Quit)
        self._rebuild_recent_menu()

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.status_model = QLabel()
        self.status_params = QLabel()
        self.status_images = QLabel()
        self.status_mode = QLabel()
        self.status_memory = QLabel()
        for label in (self.status_model, self.status_params, self.status_images, self.status_mode, self.status_memory):
            label.setContentsMargins(6, 0, 6, 0)
            bar.addPermanentWidget(label)
        self._memory_timer = QTimer(self)
        self._memory_timer.setInterval(2000)
        self._memory_timer.timeout.connect(self._update_memory)
        self._memory_timer.start()
        self._process = psutil.Process(os.getpid())
        self._update_memory()
        self.refresh_status()

    def _update_memory(self) -> None:
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            return
        self.status_memory.setText(f"memory {fmt_bytes(rss)}")

    def refresh_status(self) -> None:
        """Update the model, parameters, images and mode fields."""
        if not getattr(self, "_ready", False):
            return
        s = self.session
        info = getattr(s, "model_info", None) or {}
        self.status_model.setText(f"model: {info.get('name', self.model_panel.model_spec())}")
        params = info.get("parameters")
        self.status_params.setText(f"{params / 1e6:.2f} M params" if isinstance(params, (int, float)) else "")
        statuses = list(self.calibration_tab.entries_by_status().values())
        self.status_images.setText(
            f"images: {len(statuses)} ({statuses.count('rejected')} rejected)" if statuses else "images: 0"
        )
        state = getattr(s, "state", "loading") if s is not None else "loading"
        # The task the worker runs now, not the one submitted last; what waits is named apart.
        running = self.runner.running()
        queued = self.runner.queued()
        mode = f"{running}…" if running else state
        if queued:
            mode += f" (queued: {', '.join(queued)})"
        self.status_mode.setText(f"mode: {mode}")
        summary = self.model_panel.summary
        summary["state"].setText(mode)
        summary["images"].setText(
            f"{len(statuses)} listed · {statuses.count('used')} used · {statuses.count('rejected')} rejected"
        )

    def show_error(self, exc: BaseException) -> None:
        """Put a failure in the status bar; the tabs show it in place as well."""
        self.statusBar().showMessage(error_text(exc), 15000)

    def _on_busy_changed(self, _busy: bool) -> None:
        self.refresh_status()

    # -- settings persistence -----------------------------------------------------------
    def last_folder(self, key: str) -> str:
        """The folder a dialog of this kind opened last (home by default)."""
        home = QStandardPaths.writableLocation(QStandardPaths.HomeLocation) or str(Path.home())
        value = self.settings.value(f"folders/{key}", home)
        return str(value) if value and Path(str(value)).is_dir() else home

    def default_export_path(self, model_spec: str) -> str:
        """Where an export goes unless the user chose: named for the model, in the folder of the
        last export, else Documents, else the folder the app was started from (home last)."""
        name = model_spec if model_spec in SPECS else (Path(model_spec).name or "model")
        folder = self.settings.value("folders/export")
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

    def _follow_model_in_export_path(self, model_spec: str) -> None:
        # Only a path the window chose itself follows the model; one the user typed stays.
        if self.export_tab.path_edit.text() == self._auto_export_path:
            self._auto_export_path = self.default_export_path(model_spec)
            self.export_tab.path_edit.setText(self._auto_export_path)

    def remember_folder(self, key: str, folder: str) -> None:
        """Remember the folder of a dialog for next time."""
        self.settings.setValue(f"folders/{key}", folder)

    def _restore_window(self) -> None:
        geometry = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(self.default_size())
        if state is not None:
            self.restoreState(state)
        self.dock.setMinimumWidth(250)

    def default_size(self) -> QSize:
        """1360x860, or less: what the screen's free area holds (a 1280x800 or 1366x768 laptop)."""
        screen = self.screen() or QApplication.primaryScreen()
        if screen is None:
            return QSize(1360, 860)
        free = screen.availableGeometry()
        # Leave room for the window frame and title bar, which the size does not include.
        return QSize(min(1360, free.width() - 16), min(860, free.height() - 40))

    def _save_window(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.sync()

    def recent_sessions(self) -> list[str]:
        """Saved or opened session folders, newest first."""
        value = self.settings.value("recentSessions", [])
        if isinstance(value, str):
            value = [value]
        return [str(v) for v in (value or [])]

    def _add_recent(self, folder: str) -> None:
        items = [folder] + [f for f in self.recent_sessions() if f != folder]
        self.settings.setValue("recentSessions", items[:MAX_RECENT])
        self._rebuild_recent_menu()

    def _rebuild_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.recent_sessions()
        if not recent:
            empty = self.recent_menu.addAction("(none)")
            empty.setEnabled(False)
            return
        for i, folder in enumerate(recent):
            act = self.recent_menu.addAction(f"&{i + 1} {folder}")
            act.triggered.connect(lambda _checked=False, f=folder: self.open_session(f))

    # -- session lifecycle --------------------------------------------------------------
    def submit(self, name: str, fn: Callable[..., Any], **kwargs) -> Task:
        """Run a Session call on the worker thread (see SessionRunner.submit)."""
        return self.runner.submit(name, fn, **kwargs)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run fn once a session exists."""
        self._deferred.append(fn)

    def build_config(self, settings: dict[str, Any]):
        """A core.config.PTQConfig from the panel's values."""
        from core.config import PTQConfig, QuantSpec  # noqa: PLC0415

        config = PTQConfig(
            activation=QuantSpec(dtype=settings["activation"]),
            weight=QuantSpec(dtype=settings["weight"], per_channel=True),
            observer=settings["observer"],
        )
        if self.extra_overrides:
            config = replace(config, overrides={**dict(config.overrides), **self.extra_overrides})
        if settings["keep_float"]:
            config = config.with_keep_float(settings["keep_float"])
        return config

    def _load_session(self, settings: dict[str, Any], images: list[Path]) -> None:
        self.model_panel.model_info.setText(f"loading {settings['model_spec']}…")
        self.model_panel.apply_button.setEnabled(False)
        factory = self._session_factory

        def work():
            config = self.build_config(settings)
            session = factory(settings["model_spec"], config, settings["max_soft_tokens"])
            _check_keep_float(session, config)
            if images:
                session.add_images(images)
            return session, [e for e in session.images]

        self.submit(
            "loading model",
            work,
            takes_progress=False,
            on_done=lambda payload: self._on_session_ready(payload, settings),
            on_error=self._on_session_failed,
        )

    def _on_session_ready(self, payload, settings: dict[str, Any]) -> None:
        session, entries = payload
        self.session = session
        self.ab_tab.set_session(session)  # it follows the session's events from here on
        self._applied = dict(settings)
        self._reset_summary()
        self._show_model_info()
        self._follow_model_in_export_path(str(getattr(session, "model_spec", settings["model_spec"])))
        self.calibration_tab.show_entries(entries)
        self.ranges_tab.clear()
        self.errors_tab.clear()
        self._on_config_changed()
        if getattr(session, "state", "") == "calibrated":
            self.ranges_tab.refresh()
            self._show_calibration(getattr(session, "calibration", None))
        self._on_settings_edited()
        self.refresh_status()
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()

    def _reset_summary(self) -> None:
        for key in ("calibration", "end_to_end", "export"):
            self.model_panel.summary[key].setText("—")
        self.export_tab.set_calibration(None)

    def _show_calibration(self, calibration) -> None:
        """The summary line and the Export tab for the calibration now in force."""
        if calibration is None:
            text = "a loaded session"
        else:
            secs = float(getattr(calibration, "seconds", 0.0) or 0.0)
            tail = " (cancelled)" if calibration.cancelled else ""
            text = f"{calibration.images_done}/{calibration.total_images} images in {secs:.1f} s{tail}"
            self.model_panel.summary["calibration"].setText(text)
        used = [p for p, status in self.calibration_tab.entries_by_status().items() if status == "used"]
        self.export_tab.set_calibration(text, used)

    def _on_session_failed(self, exc: BaseException) -> None:
        text = error_text(exc)
        if self.session is not None:
            # Keep working with the model that was loaded; say why the new one was not.
            self._show_model_info()
            self.model_panel.set_model_spec(self._applied.get("model_spec", "tiny"))
            text = f"{text} — still using {self._applied.get('model_spec')}"
        self.model_panel.dirty_label.setText(text)
        self.model_panel.dirty_label.setStyleSheet("color: #b00020;")
        if self.session is None:
            self.model_panel.model_info.setText(f"<span style='color:#b00020'>{error_text(exc)}</span>")
        self.show_error(exc)
        self._on_settings_edited(keep_message=True)
        self.refresh_status()

    def _show_model_info(self) -> None:
        info = getattr(self.session, "model_info", None) or {}
        parts = [str(info.get("name", "model"))]
        if isinstance(info.get("parameters"), (int, float)):
            parts.append(f"{info['parameters'] / 1e6:.2f} M parameters")
        if info.get("layers") is not None:
            parts.append(f"{info['layers']} layers")
        if info.get("hidden_size") is not None:
            parts.append(f"hidden {info['hidden_size']}")
        spec = str(getattr(self.session, "model_spec", self.model_panel.model_spec()))
        if spec in SPECS:
            # Built-in weights are drawn from a seed, not trained: low SQNR here says nothing of the quantizer.
            parts.append("random weights (seeded), not a trained model")
        self.model_panel.model_info.setText(" · ".join(parts))

    def _on_settings_edited(self, *_args, keep_message: bool = False) -> None:
        if not self._ready:
            return
        if keep_message:
            current = self.model_panel.settings()
            self.model_panel.apply_button.setEnabled(bool(self._applied) and current != self._applied or self.session is None)
            self.refresh_calibrate_enabled()
            return
        self.model_panel.dirty_label.setStyleSheet("color: #b26a00;")
        current = self.model_panel.settings()
        dirty = bool(self._applied) and current != self._applied
        self.model_panel.apply_button.setEnabled(dirty or (self.session is None and not self.runner.busy))
        self.refresh_calibrate_enabled()
        calibrated = getattr(self.session, "state", "") == "calibrated"
        if dirty and calibrated:
            self.model_panel.dirty_label.setText("Applying re-prepares the model and drops the calibration statistics.")
        elif dirty:
            self.model_panel.dirty_label.setText("Settings changed; press Apply.")
        else:
            self.model_panel.dirty_label.setText("")

    def settings_pending(self) -> bool:
        """Whether the panel shows settings that are not applied to the session yet."""
        return bool(self._applied) and self.model_panel.settings() != self._applied

    def refresh_calibrate_enabled(self) -> None:
        """Calibrate only when it would calibrate what the panel shows, and is not running already."""
        button = self.calibration_tab.calibrate_button
        if self.calibration_tab.running:
            button.setEnabled(False)
            return
        pending = self.settings_pending()
        button.setEnabled(self.session is not None and not pending)
        button.setToolTip(
            "Apply the changed settings first: Calibrate would calibrate the model as it was"
            if pending
            else "Calibrate on the usable images"
        )

    def apply_settings(self) -> None:
        """Apply the panel: reload the model if it changed, else re-prepare with the new config."""
        settings = self.model_panel.settings()
        images = [Path(p) for p in self.calibration_tab.entries_by_status()]
        reload = (
            self.session is None
            or settings["model_spec"] != self._applied.get("model_spec")
            or settings["max_soft_tokens"] != self._applied.get("max_soft_tokens")
        )
        self.model_panel.apply_button.setEnabled(False)
        if reload:
            # The current session stays in place until the new one has loaded.
            self._load_session(settings, images)
            return
        session = self.session

        def work():
            config = self.build_config(settings)
            _check_keep_float(session, config)
            session.set_config(config)
            return [e for e in session.images]

        def done(entries):
            self._applied = dict(settings)
            self._reset_summary()
            self.calibration_tab.show_entries(entries)
            self.ranges_tab.clear()
            self.errors_tab.clear()
            self._on_config_changed()
            self._on_settings_edited()
            self.statusBar().showMessage("Settings applied; calibrate again.", 8000)
            self.refresh_status()

        def failed(exc):
            self.model_panel.dirty_label.setText(error_text(exc))
            self.model_panel.dirty_label.setStyleSheet("color: #b00020;")
            self.show_error(exc)
            # keep_message: the reason stays beside the settings it is about (a mistyped glob).
            self._on_settings_edited(keep_message=True)

        self.submit("applying settings", work, takes_progress=False, on_done=done, on_error=failed)

    def choose_checkpoint(self) -> None:
        """Pick a checkpoint folder and load it."""
        folder = QFileDialog.getExistingDirectory(self, "Open checkpoint folder", self.last_folder("checkpoint"))
        if folder:
            self.remember_folder("checkpoint", folder)
            self.model_panel.set_model_spec(folder)
            self.apply_settings()

    @Slot(object)
    def _on_evaluated(self, result) -> None:
        e2e = result.end_to_end
        kept = len(getattr(result, "keep_float", []) or [])
        note = f" ({kept} kept in float)" if kept else ""
        self.model_panel.summary["end_to_end"].setText(f"SQNR {float(e2e.sqnr_db):.2f} dB · PEIR {float(e2e.peir):.4g}{note}")

    @Slot(object)
    def _on_exported(self, result) -> None:
        self.model_panel.summary["export"].setText(f"{Path(str(result.path)).name} · {fmt_bytes(int(result.bytes))}")
        self.model_panel.summary["export"].setToolTip(str(result.path))

    @Slot(object)
    def _on_calibrated(self, result) -> None:
        if result.cancelled and self.calibration_tab.restored:
            # The core put the earlier statistics back: the summary, ranges and errors shown
            # still describe them, so nothing is redrawn or re-evaluated.
            self.statusBar().showMessage("Calibration cancelled; the earlier calibration is restored.", 8000)
            self.refresh_status()
            return
        self.refresh_status()
        # The worker has finished, so reading the state here races with nothing.
        if getattr(self.session, "state", "") == "calibrated":
            self._show_calibration(result)
            self.ranges_tab.refresh()
            self.errors_tab.evaluate()
        else:
            self.model_panel.summary["calibration"].setText(
                f"none ({result.images_done}/{result.total_images} images, cancelled)"
            )

    def after_recalibration(self, result, entries: list) -> None:
        """Show a recalibration started outside the Calibration tab (exclude / include an image)."""
        self.calibration_tab.show_entries(entries)
        if result.cancelled:
            # The core put the earlier statistics and statuses back: nothing else to redraw.
            self.refresh_status()
            return
        self._on_calibrated(result)

    def _on_config_changed(self) -> None:
        n = len(self.extra_overrides)
        label = self.model_panel.summary["overrides"]
        label.setText(f"{n} per-module override(s)" if n else "—")
        label.setToolTip("\n".join(self.extra_overrides))
        self.model_panel.summary_form.setRowVisible(label, bool(n))

    def apply_config_and_calibrate(self, config) -> None:
        """Make config the session's (e.g. A/B's merged config), then calibrate on the same images."""
        session = self.session
        if session is None:
            return
        extra = {glob: o for glob, o in dict(config.overrides).items() if not getattr(o, "keep_float", False)}

        def work():
            session.set_config(config)
            return [e for e in session.images]

        def done(entries):
            self.extra_overrides = extra
            self._apply_config_to_panel(config)
            self._applied = dict(self.model_panel.settings())
            self._reset_summary()
            self.calibration_tab.show_entries(entries)
            self.ranges_tab.clear()
            self.errors_tab.clear()
            self._on_config_changed()
            self._on_settings_edited()
            self.tabs.setCurrentWidget(self.calibration_tab)
            self.calibration_tab.calibrate()

        def failed(exc):
            self.show_error(exc)
            self.ab_tab.message.show_message(error_text(exc), "error")

        self.submit("applying merged config", work, takes_progress=False, on_done=done, on_error=failed)

    def _export_from_menu(self) -> None:
        self.tabs.setCurrentWidget(self.export_tab)
        self.export_tab.export()

    @Slot(str)
    def open_in_netron(self, path: str) -> None:
        """Show an exported file in the Netron tab."""
        self.tabs.setCurrentWidget(self.netron_tab)
        self.netron_tab.show_model(path)

    # -- session files ------------------------------------------------------------------
    def choose_session_to_open(self) -> None:
        """Pick a saved session folder and open it."""
        folder = QFileDialog.getExistingDirectory(self, "Open session", self.last_folder("session"))
        if folder:
            self.remember_folder("session", str(Path(folder).parent))
            self.open_session(folder)

    def open_session(self, folder: str) -> None:
        """Load a saved session in the worker; the current one stays until it succeeds."""
        loader = self._session_loader

        def work():
            session = loader(folder)
            return session, [e for e in session.images]

        def done(payload):
            session = payload[0]
            cfg = getattr(session, "config", None)
            settings = dict(self.model_panel.settings())
            settings["model_spec"] = str(getattr(session, "model_spec", settings["model_spec"]))
            settings["max_soft_tokens"] = int(getattr(session, "max_soft_tokens", settings["max_soft_tokens"]))
            self._applied = {}
            overrides = dict(getattr(cfg, "overrides", None) or {})
            self.extra_overrides = {g: o for g, o in overrides.items() if not getattr(o, "keep_float", False)}
            self.model_panel.set_model_spec(settings["model_spec"])
            if settings["max_soft_tokens"] in SOFT_TOKENS:
                self.model_panel.tokens_combo.setCurrentIndex(SOFT_TOKENS.index(settings["max_soft_tokens"]))
            self._apply_config_to_panel(cfg)
            self._add_recent(folder)
            self._on_session_ready(payload, self.model_panel.settings())
            self.statusBar().showMessage(f"Opened session {folder}", 8000)

        self.submit("opening session", work, takes_progress=False, on_done=done, on_error=self.show_error)

    def _apply_config_to_panel(self, cfg) -> None:
        if cfg is None:
            return
        panel = self.model_panel
        for combo, value in (
            (panel.activation_combo, getattr(getattr(cfg, "activation", None), "dtype", None)),
            (panel.weight_combo, getattr(getattr(cfg, "weight", None), "dtype", None)),
            (panel.observer_combo, getattr(cfg, "observer", None)),
        ):
            if value is not None and combo.findText(str(value)) >= 0:
                combo.setCurrentIndex(combo.findText(str(value)))
        overrides = getattr(cfg, "overrides", None) or {}
        globs = [
            g
            for g, spec in overrides.items()
            if spec == "float" or getattr(spec, "keep_float", False) or getattr(spec, "dtype", None) == "float"
        ]
        panel.keep_float_edit.setPlainText("\n".join(globs))

    def choose_session_to_save(self) -> None:
        """Pick a folder and save the session there."""
        folder = QFileDialog.getExistingDirectory(self, "Save session into folder", self.last_folder("session"))
        if folder:
            self.remember_folder("session", str(Path(folder).parent))
            self.save_session(folder)

    def save_session(self, folder: str) -> None:
        """Save the session in the worker."""
        session = self.session
        if session is None:
            return

        def done(_result):
            self._add_recent(folder)
            self.statusBar().showMessage(f"Saved session to {folder}", 8000)

        self.submit("saving session", lambda: session.save(folder), takes_progress=False, on_done=done, on_error=self.show_error)

    # -- shutdown -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel work, stop the worker thread, the thumbnail pool and the netron server."""
        if getattr(self, "_shut_down", False):
            return
        self._shut_down = True
        self._memory_timer.stop()
        self._save_window()
        self.runner.shutdown()
        self.calibration_tab._pool.clear()
        self.calibration_tab._pool.waitForDone(5000)
        self.netron_tab.shutdown()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
