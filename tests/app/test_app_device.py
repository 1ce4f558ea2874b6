"""Issue 13.5: the model panel's device choice reaches the Session (CPU-only checks; no CUDA is faked)."""

from __future__ import annotations

import pytest
import torch
from PySide6.QtCore import Qt

import app.qt_model_panel
from core.data.device import DEVICES
from core.session import Session

LONG = 180_000


def _wait_idle(qtbot, window):
    qtbot.waitUntil(lambda: window.session is not None and not window.runner.busy, timeout=LONG)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda and auto are offered")
def test_cuda_and_auto_are_shown_disabled_with_the_reason(make_window):
    panel = make_window().model_panel
    combo = panel.device_combo
    assert [combo.itemData(i) for i in range(combo.count())] == list(DEVICES)
    items = {combo.itemData(i): combo.model().item(i) for i in range(combo.count())}
    assert items["cpu"].isEnabled() and panel.device() == "cpu"
    for name in ("cuda", "auto"):
        assert not items[name].isEnabled()
        assert "sees no CUDA device" in items[name].toolTip() or "sees none" in items[name].toolTip()


def test_the_chosen_device_reaches_the_session(make_window, qtbot, monkeypatch):
    # Every choice offered, as on a machine with a GPU; "auto" resolves to what this torch has.
    monkeypatch.setattr(app.qt_model_panel, "device_unavailable", lambda device: None)
    asked: list[str] = []

    def factory(spec, cfg, mst, device="cpu"):
        asked.append(device)
        return Session(spec, cfg, mst, device=device)

    window = make_window(session_factory=factory)
    assert asked == ["cpu"] and window.session.device == "cpu"
    panel = window.model_panel
    panel.set_device("auto")
    assert panel.apply_button.isEnabled()  # a new device is a change to apply: the model is rebuilt there
    qtbot.mouseClick(panel.apply_button, Qt.LeftButton)
    _wait_idle(qtbot, window)
    assert asked == ["cpu", "auto"]
    assert window.session.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(window.session.qmodel.parameters()).device.type == window.session.device
