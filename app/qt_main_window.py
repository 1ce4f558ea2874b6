"""PTQ Studio main window: model panel, five tabs, status bar, File menu."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QSettings, QSize, Qt, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QMainWindow,
    QMenu,
    QTabWidget,
)

from app.events import SessionSubscriptions
from app.qt_ab_tab import QtABTab
from app.qt_calibration_tab import QtCalibrationTab
from app.qt_common import calibration_text, error_text, fmt_bytes
from app.qt_errors_tab import QtErrorsTab
from app.qt_export_tab import QtExportTab
from app.qt_fix_tab import QtFixTab
from app.qt_model_panel import QtModelPanel, config_from_settings
from app.qt_netron_tab import QtNetronTab
from app.qt_ranges_tab import QtRangesTab
from app.qt_status_bar import QtStatusFields
from app.qt_window_settings import WindowSettings
from app.workers import SessionRunner, Task
from core.analysis.abtest import owner_modules
from core.config import PTQConfig
from core.data.images import DEFAULT_SOFT_TOKENS, SUPPORTED_SOFT_TOKENS
from core.models import SPECS
from core.session import Session


def _check_keep_float(session, config) -> None:
    """ConfigError naming a keep-float or override glob that matches no module of the session's model."""
    qmodel = getattr(session, "qmodel", None)
    if qmodel is None:  # stand-in sessions of the tests have no wrapped model
        return
    config.check_globs(owner_modules(qmodel), "keep-float")


def _default_session_factory(model_spec: str, config, max_soft_tokens: int, device: str = "cpu") -> Session:
    return Session(model_spec=model_spec, config=config, max_soft_tokens=max_soft_tokens, device=device)


def _default_session_loader(folder: str, device: str = "cpu") -> Session:
    return Session.load(folder, device=device)


class QtMainWindow(QMainWindow):
    """The window; it owns the Session and the worker that runs it."""

    def __init__(
        self,
        model_spec: str = "tiny",
        images: list[Path] | None = None,
        max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
        settings: QSettings | None = None,
        session_factory: Callable[..., Any] | None = None,
        session_loader: Callable[[str], Any] | None = None,
    ) -> None:
        super().__init__()
        self._ready = False
        self.setWindowTitle("PTQ Studio")
        self.settings = settings if settings is not None else QSettings("PTQ Studio", "PTQ Studio")
        self.memory = WindowSettings(self.settings)
        self._session_factory = session_factory or _default_session_factory
        self._session_loader = session_loader or _default_session_loader
        self.session = None
        self._subscriptions = SessionSubscriptions()
        # The statistics the summary and the analysis tabs describe (Session.stats_version).
        self._shown_stats_version = 0
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
        self.fix_tab = QtFixTab(self)
        self.ab_tab = QtABTab(self)
        self.export_tab = QtExportTab(self)
        self.netron_tab = QtNetronTab(self)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("mainTabs")
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.calibration_tab, "Calibration")
        self.tabs.addTab(self.ranges_tab, "Ranges")
        self.tabs.addTab(self.errors_tab, "Errors")
        self.tabs.addTab(self.fix_tab, "Fix")
        self.tabs.addTab(self.ab_tab, "A/B")
        self.tabs.addTab(self.export_tab, "Export")
        self.tabs.addTab(self.netron_tab, "Netron")
        self.setCentralWidget(self.tabs)
        self.calibration_tab.sigCalibrated.connect(self._on_calibration_run)
        self.export_tab.sigOpenInNetron.connect(self.open_in_netron)

        # model panel
        self.model_panel = QtModelPanel()
        self.dock = QDockWidget("Model && settings", self)
        self.dock.setObjectName("modelPanelDock")
        self.dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        self.dock.setWidget(self.model_panel)
        self.addDockWidget(Qt.LeftDockWidgetArea, self.dock)
        self.model_panel.set_model_spec(model_spec)
        self.model_panel.tokens_combo.setCurrentIndex(SUPPORTED_SOFT_TOKENS.index(max_soft_tokens) if max_soft_tokens in SUPPORTED_SOFT_TOKENS else SUPPORTED_SOFT_TOKENS.index(DEFAULT_SOFT_TOKENS))
        for widget in (
            self.model_panel.model_combo,
            self.model_panel.activation_combo,
            self.model_panel.weight_combo,
            self.model_panel.observer_combo,
            self.model_panel.tokens_combo,
            self.model_panel.device_combo,
        ):
            widget.currentIndexChanged.connect(self._on_settings_edited)
        self.model_panel.keep_float_edit.textChanged.connect(self._on_settings_edited)
        self.model_panel.apply_button.clicked.connect(self.apply_settings)
        self.model_panel.open_checkpoint_button.clicked.connect(self.choose_checkpoint)

        self._build_menu()
        self._build_status_bar()
        self._restore_window()
        self._ready = True

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
        self.status_fields = QtStatusFields(self.statusBar())
        # The fields by their old names, which the tests read.
        self.status_model, self.status_images = self.status_fields.model, self.status_fields.images
        self.status_mode, self.status_memory = self.status_fields.mode, self.status_fields.memory
        self.refresh_status()

    def refresh_status(self, *_args) -> None:
        """Update the model, parameters, images and mode fields."""
        if not getattr(self, "_ready", False):
            return
        s = self.session
        statuses = [e.status for e in tuple(getattr(s, "images", ()))]
        state = getattr(s, "state", "loading") if s is not None else "loading"
        # The task the worker runs now, not the one submitted last; what waits is named apart.
        running = self.runner.running()
        queued = self.runner.queued()
        mode = f"{running}…" if running else state
        if queued:
            mode += f" (queued: {', '.join(queued)})"
        self.status_fields.show(getattr(s, "model_info", None) or {}, self.model_panel.model_spec(), statuses, mode)
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
        return self.memory.last_folder(key)

    def remember_folder(self, key: str, folder: str) -> None:
        """Remember the folder of a dialog for next time."""
        self.memory.remember_folder(key, folder)

    def default_export_path(self, model_spec: str) -> str:
        """Where an export goes unless the user chose (see WindowSettings.default_export_path)."""
        return self.memory.default_export_path(model_spec)

    def _restore_window(self) -> None:
        if not self.memory.restore_window(self):
            self.resize(self.default_size())
        self.dock.setMinimumWidth(250)

    def default_size(self) -> QSize:
        """1360x860, or less: what the screen's free area holds (a 1280x800 or 1366x768 laptop)."""
        screen = self.screen() or QApplication.primaryScreen()
        if screen is None:
            return QSize(1360, 860)
        free = screen.availableGeometry()
        # Leave room for the window frame and title bar, which the size does not include.
        return QSize(min(1360, free.width() - 16), min(860, free.height() - 40))

    def recent_sessions(self) -> list[str]:
        """Saved or opened session folders, newest first."""
        return self.memory.recent_sessions()

    def _add_recent(self, folder: str) -> None:
        self.memory.add_recent(folder)
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

    def later(self, name: str, fn: Callable[[], None]) -> None:
        """Run fn on the GUI thread on a later event-loop pass, the runner busy until then (SessionRunner.later)."""
        self.runner.later(name, fn)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run fn once a session exists."""
        self._deferred.append(fn)

    def build_config(self, settings: dict[str, Any]) -> PTQConfig:
        """A core.config.PTQConfig from the panel's values plus the A/B overrides."""
        return config_from_settings(settings, self.extra_overrides)

    def _load_session(self, settings: dict[str, Any], images: list[Path]) -> None:
        self.model_panel.model_info.setText(f"loading {settings['model_spec']}…")
        self.model_panel.apply_button.setEnabled(False)
        factory = self._session_factory

        def work():
            config = self.build_config(settings)
            session = factory(settings["model_spec"], config, settings["max_soft_tokens"], device=settings["device"])
            _check_keep_float(session, config)
            if images:
                session.add_images(images)
            return session

        self.submit(
            "loading model",
            work,
            takes_progress=False,
            on_done=lambda session: self._on_session_ready(session, settings),
            on_error=self._on_session_failed,
        )

    def _on_session_ready(self, session, settings: dict[str, Any]) -> None:
        # The one thing the window tells the tabs about a new session: here it is; they subscribe.
        self.session = session
        self._applied = dict(settings)
        self._subscriptions.replace(
            session.events,
            {
                "images_changed": self.refresh_status,
                "config_changed": self._on_config_changed,
                "calibrated": self._on_statistics,
                "evaluated": self._on_evaluated,
                "exported": self._on_exported,
                "remedied": self._on_remedied,
            },
        )
        for tab in (self.calibration_tab, self.ranges_tab, self.errors_tab, self.fix_tab, self.ab_tab, self.export_tab):
            tab.set_session(session)  # each follows the session's events from here on
        self._reset_summary()
        self._show_model_info()
        self._show_overrides()
        self._shown_stats_version = session.stats_version
        if session.state == "calibrated":
            self._show_calibration(session.calibration)
        self._on_settings_edited()
        self.refresh_status()
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            fn()

    # -- the session's events -------------------------------------------------------------
    def _reset_summary(self) -> None:
        for key in ("calibration", "end_to_end", "export"):
            self.model_panel.summary[key].setText("—")

    def _show_calibration(self, calibration) -> None:
        """The summary line for the calibration now in force."""
        if calibration is not None:
            self.model_panel.summary["calibration"].setText(calibration_text(calibration))

    def _on_session_failed(self, exc: BaseException) -> None:
        text = error_text(exc)
        if self.session is not None:
            # Keep working with the model that was loaded; say why the new one was not.
            self._show_model_info()
            self.model_panel.set_model_spec(self._applied.get("model_spec", "tiny"))
            self.model_panel.set_device(self._applied.get("device", "cpu"))
            text = f"{text} — still using {self._applied.get('model_spec')}"
        self.model_panel.dirty_label.setText(text)
        self.model_panel.dirty_label.setStyleSheet("color: #b00020;")
        if self.session is None:
            self.model_panel.model_info.setText(f"<span style='color:#b00020'>{error_text(exc)}</span>")
        self.show_error(exc)
        self._on_settings_edited(keep_message=True)
        self.refresh_status()

    def _show_model_info(self) -> None:
        spec = str(getattr(self.session, "model_spec", self.model_panel.model_spec()))
        self.model_panel.show_model_info(getattr(self.session, "model_info", None) or {}, spec in SPECS)

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
        # A snapshot taken here, on the GUI thread: the worker gets a list nobody else mutates.
        images = [Path(e.path) for e in tuple(getattr(self.session, "images", ()))]
        reload = (
            self.session is None
            or settings["model_spec"] != self._applied.get("model_spec")
            or settings["max_soft_tokens"] != self._applied.get("max_soft_tokens")
            or settings["device"] != self._applied.get("device")  # the model is built on its device
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

        def done(_result):
            # The tabs and the summary followed session.events.config_changed already.
            self._applied = dict(settings)
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
    def _on_calibration_run(self, result) -> None:
        if result.cancelled and self.calibration_tab.restored:
            self.statusBar().showMessage("Calibration cancelled; the earlier calibration is restored.", 8000)
        self.refresh_status()

    def _on_statistics(self, version: int) -> None:
        self.refresh_status()
        if version and version == self._shown_stats_version:
            # The same statistics (a cancelled run put them back): the summary, ranges and
            # errors shown still describe them, so nothing is redrawn or re-evaluated.
            return
        self._shown_stats_version = version
        session = self.session
        if version:
            self._show_calibration(session.calibration)
            self.model_panel.summary["end_to_end"].setText("—")
        else:
            cal = session.calibration
            self.model_panel.summary["calibration"].setText(
                f"none ({cal.images_done}/{cal.total_images} images, cancelled)" if cal is not None else "—"
            )

    def _on_config_changed(self, config) -> None:
        self._shown_stats_version = 0
        self._reset_summary()
        self._show_overrides()

    def _on_remedied(self, _result) -> None:
        # Mixed precision may have given modules other dtypes: later configs the panel builds keep them.
        config = self.session.config
        self.extra_overrides = {g: o for g, o in dict(config.overrides).items() if not getattr(o, "keep_float", False)}
        self._show_overrides()

    def _show_overrides(self) -> None:
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

        def done(_result):
            self.extra_overrides = extra
            self._show_overrides()
            self.model_panel.show_config(config)
            self._applied = dict(self.model_panel.settings())
            self._on_settings_edited()
            self.tabs.setCurrentWidget(self.calibration_tab)
            self.calibration_tab.calibrate()

        def failed(exc):
            self.show_error(exc)
            self.ab_tab.message.show_message(error_text(exc), "error")

        self.submit("applying merged config", lambda: session.set_config(config), takes_progress=False, on_done=done, on_error=failed)

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
        device = self.model_panel.device()

        def done(session):
            cfg = getattr(session, "config", None)
            settings = dict(self.model_panel.settings())
            settings["model_spec"] = str(getattr(session, "model_spec", settings["model_spec"]))
            settings["max_soft_tokens"] = int(getattr(session, "max_soft_tokens", settings["max_soft_tokens"]))
            self._applied = {}
            overrides = dict(getattr(cfg, "overrides", None) or {})
            self.extra_overrides = {g: o for g, o in overrides.items() if not getattr(o, "keep_float", False)}
            self.model_panel.set_model_spec(settings["model_spec"])
            if settings["max_soft_tokens"] in SUPPORTED_SOFT_TOKENS:
                self.model_panel.tokens_combo.setCurrentIndex(SUPPORTED_SOFT_TOKENS.index(settings["max_soft_tokens"]))
            self.model_panel.show_config(cfg)
            self._add_recent(folder)
            self._on_session_ready(session, self.model_panel.settings())
            self.statusBar().showMessage(f"Opened session {folder}", 8000)

        self.submit("opening session", lambda: loader(folder, device), takes_progress=False, on_done=done, on_error=self.show_error)

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
        self.status_fields.stop()
        self.memory.save_window(self)
        self._subscriptions.clear()
        self.runner.shutdown()
        self.calibration_tab.shutdown()
        self.netron_tab.shutdown()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
