"""Issue 11.1: an export that fails or is cancelled at any stage leaves the earlier file byte-identical."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import core.export.pipeline as export_mod
from core.cancel import CancelToken
from core.data.images import ImagePreprocessor
from core.data.resources import resource_path, sample_images
from core.errors import CancelledError, ExportError, UnwritablePathError
from core.export.pipeline import export_circle
from core.io import StagedFile
from core.models import load_model
from core.ptq import calibrate, convert, prepare

EARLIER = b"earlier model, must survive"


@pytest.fixture(scope="module")
def qmodel():
    model = load_model("tiny")
    pre = ImagePreprocessor(model.config, max_soft_tokens=70)
    q = prepare(model)
    calibrate(q, [pre([p]) | {"image_ids": [p.name]} for p in sample_images()[:2]])
    convert(q)
    return q


@pytest.fixture(scope="module")
def example(qmodel):
    return ImagePreprocessor(qmodel.config, max_soft_tokens=70)([resource_path("samples/astronaut.jpg")])


@pytest.fixture(scope="module")
def circle_bytes(qmodel, example, tmp_path_factory) -> bytes:
    """A real conversion, done once; the stage tests below reuse its bytes instead of converting again."""
    out = tmp_path_factory.mktemp("good") / "good.circle"
    export_circle(qmodel, example, out, verify=False)
    return out.read_bytes()


@pytest.fixture
def earlier(tmp_path) -> Path:
    out = tmp_path / "m.circle"
    out.write_bytes(EARLIER)
    return out


@pytest.fixture
def converted(monkeypatch, circle_bytes):
    monkeypatch.setattr(export_mod, "convert_to_circle", lambda *a, **k: circle_bytes)


def _left_alone(out: Path) -> None:
    assert out.read_bytes() == EARLIER
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left either


def test_failed_conversion_keeps_the_earlier_file(qmodel, example, earlier, monkeypatch):
    def broken(*a, **k):
        raise ExportError("converter failed")

    monkeypatch.setattr(export_mod, "convert_to_circle", broken)
    with pytest.raises(ExportError):
        export_circle(qmodel, example, earlier)
    _left_alone(earlier)


def test_failed_write_keeps_the_earlier_file(qmodel, example, earlier, converted, monkeypatch):
    def disk_full(self, data):
        self.path.write_bytes(data[: len(data) // 2])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StagedFile, "write", disk_full)
    with pytest.raises(UnwritablePathError, match="No space left"):
        export_circle(qmodel, example, earlier)
    _left_alone(earlier)


def test_failed_verification_keeps_the_earlier_file(qmodel, example, earlier, converted, monkeypatch):
    def broken(data, *a, **k):
        assert data  # the staged file was written and read back before verification
        assert earlier.read_bytes() == EARLIER  # and the target not yet replaced
        raise ExportError("the written model does not run in TICO's reference runtime: boom")

    monkeypatch.setattr(export_mod, "verify_circle", broken)
    with pytest.raises(ExportError, match="reference runtime"):
        export_circle(qmodel, example, earlier)
    _left_alone(earlier)


def test_cancel_during_verification_keeps_the_earlier_file(qmodel, example, earlier, converted, monkeypatch):
    token = CancelToken()
    real = export_mod.verify_circle

    def cancelled_meanwhile(*a, **k):
        result = real(*a, **k)
        token.cancel()  # the user presses Cancel while the runtime runs the staged file
        return result

    monkeypatch.setattr(export_mod, "verify_circle", cancelled_meanwhile)
    with pytest.raises(CancelledError) as e:
        export_circle(qmodel, example, earlier, cancel=token)
    _left_alone(earlier)
    assert str(earlier) in str(e.value) and "\n" not in str(e.value)


def test_a_good_export_replaces_the_earlier_file_and_cleans_stale_temps(
    qmodel, example, earlier, converted, circle_bytes, dead_pid
):
    # What a `kill -9` during an earlier export left behind (a PID that no longer runs).
    stale = earlier.with_name(f".{earlier.name}.{dead_pid}-0badf00d.tmp")
    stale.write_bytes(b"half a model")
    seen = []
    result = export_circle(qmodel, example, earlier, progress=lambda d, t, m: seen.append((d, t, m)))
    assert earlier.read_bytes() == circle_bytes
    assert result.path == earlier and result.verify is not None
    assert sorted(p.name for p in earlier.parent.iterdir()) == [earlier.name]
    # The last tick comes after the rename (the conversion's own ticks are skipped by the stub).
    assert seen[-1][2] == f"verified, wrote {earlier.name}"



def test_failed_verdict_keeps_the_earlier_file(qmodel, example, earlier, converted, monkeypatch):
    """A file the verification judges broken (core.export.verdict 'failed') never replaces a good one."""
    from core.export.verdict import judge

    real = export_mod.verify_circle

    def broken(*args, **kwargs):
        v = real(*args, **kwargs)
        v.verdict = judge(mode="quant", within=0.5, max_steps=200.0, max_abs=1.0, floor=v.noise_floor)
        return v

    monkeypatch.setattr(export_mod, "verify_circle", broken)
    with pytest.raises(ExportError) as e:
        export_circle(qmodel, example, earlier)
    assert "verification failed" in str(e.value) and "left as it was" in str(e.value) and "\n" not in str(e.value)
    _left_alone(earlier)
