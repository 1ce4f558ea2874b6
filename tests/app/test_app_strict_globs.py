"""A keep-float glob that matches no module is refused in the GUI before the session changes."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget

from tests.app.test_app_window import _wait_idle


def test_keep_float_typo_is_refused_and_the_session_is_kept(make_window, sample_images, qtbot):
    window = make_window(sample_images[:1])
    session, config = window.session, window.session.config
    panel = window.findChild(QWidget, "modelPanel")
    panel.keep_float_edit.setPlainText("encoder.layers.0.mlp\nencoder.layerz.1.*")
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    text = panel.dirty_label.text()
    assert "'encoder.layerz.1.*' matches no module" in text and "closest modules:" in text
    assert window.session is session and window.session.config == config
