"""Issue 13.5: calibration and the analysis run on the session's device (checked on CPU; no CUDA is faked)."""

from __future__ import annotations

import pytest
import torch

import core.session as session_mod
from core.data.device import DEVICES, batches_to_device, device_unavailable, resolve_device
from core.errors import ConfigError
from core.session import Session

MST = 70


def test_device_choices_and_reasons():
    assert DEVICES == ("cpu", "cuda", "auto")
    assert device_unavailable("cpu") is None
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert "no CUDA device" in device_unavailable("cuda")
        assert device_unavailable("auto") is not None
        with pytest.raises(ConfigError):
            resolve_device("cuda")


def test_calibrate_and_evaluate_move_every_batch_to_the_session_device(sample_images, monkeypatch):
    moved: list[str] = []

    def recording(batches, device):
        moved.append(device)
        yield from batches_to_device(batches, device)

    monkeypatch.setattr(session_mod, "batches_to_device", recording)
    session = Session("tiny", max_soft_tokens=MST, device="auto")
    device = session.device
    assert device == resolve_device("auto")
    assert {p.device.type for p in session.qmodel.parameters()} == {torch.device(device).type}
    session.add_images(sample_images[:1])
    session.calibrate()
    result = session.evaluate()
    assert moved == [device, device]  # calibrate, then evaluate: both through batches_to_device
    assert result.modules and session.state == "calibrated"
