"""Session.events: each event fires exactly when its change happens, with the right payload (Qt-free)."""

from __future__ import annotations

import pytest

from core.cancel import CancelToken
from core.config import PTQConfig, QuantSpec
from core.errors import NoImagesError
from core.session import Session

MST = 70
EVENTS = ("images_changed", "config_changed", "calibrated", "evaluated", "exported", "analysed")


class Recorder:
    """Every emission of a session's events, in order, as (event name, args)."""

    def __init__(self, session: Session) -> None:
        self.calls: list[tuple] = []
        for name in EVENTS:
            getattr(session.events, name).connect(self._recorder(name))

    def _recorder(self, name: str):
        def record(*args) -> None:
            self.calls.append((name, *args))

        return record

    def take(self) -> list[tuple]:
        """The emissions since the last take."""
        calls, self.calls = self.calls, []
        return calls


def _cancel_after_first_batch() -> tuple[CancelToken, object]:
    token = CancelToken()

    def progress(done, total, msg):
        token.cancel()

    return token, progress


def test_image_events_fire_only_when_the_image_list_changes(sample_images, missing_image_path):
    s = Session("tiny", max_soft_tokens=MST)
    rec = Recorder(s)
    s.add_images(sample_images[:2])
    assert rec.take() == [("images_changed",)]
    s.add_images([missing_image_path])  # a rejected entry is listed too
    assert rec.take() == [("images_changed",)]
    s.add_images([])
    s.remove_images(["/nowhere/else.jpg"])
    s.include_images([sample_images[0]])  # not excluded: nothing to include
    assert rec.take() == []
    s.exclude_images([sample_images[0]])
    assert rec.take() == [("images_changed",)]
    s.exclude_images([sample_images[0]])
    assert rec.take() == []
    with pytest.raises(NoImagesError):
        s.exclude_images([sample_images[1]])  # would leave nothing: changes nothing
    assert rec.take() == []
    s.include_images([sample_images[0]])
    assert rec.take() == [("images_changed",)]
    s.remove_images([str(sample_images[1])])
    assert rec.take() == [("images_changed",)]
    s.clear_images()
    s.clear_images()
    assert rec.take() == [("images_changed",)]
    assert s.stats_version == 0


def test_calibrate_evaluate_export_and_config_events(sample_images, monkeypatch):
    import core.session

    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:2])
    rec = Recorder(s)
    with pytest.raises(NoImagesError):
        Session("tiny", max_soft_tokens=MST).calibrate()
    assert s.stats_version == 0 and s.state == "prepared"

    s.calibrate()
    assert rec.take() == [("calibrated", 1)] and s.stats_version == 1 and s.state == "calibrated"

    res = s.evaluate()
    assert rec.take() == [("evaluated", res)] and res is s.last_compare
    assert s.stats_version == 1  # evaluating changes no statistics

    ranked = s.sensitivity(images=sample_images[:1], unit="kind")
    assert rec.take() == [("analysed", "sensitivity", ranked)] and ranked and s.stats_version == 1

    sentinel = object()
    monkeypatch.setattr(core.session, "export_circle", lambda *a, **k: sentinel)
    assert s.export("unused.circle") is sentinel
    assert rec.take() == [("exported", sentinel)] and s.stats_version == 1

    s.calibrate()
    assert rec.take() == [("calibrated", 2)]

    config = PTQConfig(activation=QuantSpec(dtype="int16"))
    s.set_config(config)
    assert rec.take() == [("config_changed", config)]
    assert s.stats_version == 0 and s.state == "prepared"

    s.calibrate()
    assert rec.take() == [("calibrated", 3)]  # never a number earlier statistics had


def test_cancelled_recalibration_keeps_the_version_and_the_summary(sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:3])
    s.calibrate()
    summary = s.calibration
    rec = Recorder(s)

    token, progress = _cancel_after_first_batch()
    res = s.calibrate(progress=progress, cancel=token)
    assert res.cancelled
    assert rec.take() == [("calibrated", 1)] and s.stats_version == 1
    assert s.calibration is summary and s.state == "calibrated"

    statuses = [e.status for e in s.images]
    token, progress = _cancel_after_first_batch()
    res = s.recalibrate_without([sample_images[0]], progress=progress, cancel=token)
    assert res.cancelled
    # The earlier statistics are back: calibrated names their version; the images are as they were.
    assert rec.take() == [("calibrated", 1)] and s.stats_version == 1
    assert s.calibration is summary and s.calibration.images_done == 3 and not s.calibration.cancelled
    assert [e.status for e in s.images] == statuses

    s.recalibrate_without([sample_images[0]])
    assert rec.take() == [("images_changed",), ("calibrated", 2)]
    assert [e.status for e in s.images] == ["excluded", "used", "used"]


def test_a_cancelled_first_calibration_keeps_what_it_saw(sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:2])
    rec = Recorder(s)
    token, progress = _cancel_after_first_batch()
    assert s.calibrate(progress=progress, cancel=token).cancelled
    assert rec.take() == [("calibrated", 1)] and s.state == "calibrated"


def test_load_announces_its_statistics(sample_images, tmp_path):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:1])
    s.calibrate()
    s.calibrate()
    rec = Recorder(s)
    s.save(tmp_path / "s")
    assert rec.take() == []  # saving changes nothing
    loaded = Session.load(tmp_path / "s")
    assert loaded.stats_version == 1 and loaded.state == "calibrated"
