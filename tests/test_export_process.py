"""Issue 13.4: the export in a child process gives the same file, result, cancel and errors as in-process."""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from pathlib import Path

import pytest

import core.export.process as process_mod
from core.cancel import CancelToken
from core.errors import CancelledError, ExportError, UnwritablePathError
from tests.conftest import calibrated_tiny

EARLIER = b"earlier model, must survive"
# Timings differ between any two runs; everything else must match.
RUN_DEPENDENT = {"path", "seconds", "timings", "verify"}


@pytest.fixture(scope="module")
def session(sample_images):
    return calibrated_tiny(sample_images[:2])


@pytest.fixture(scope="module")
def in_process(session, tmp_path_factory):
    out = tmp_path_factory.mktemp("in") / "m.circle"
    steps: list[tuple[int, int, str]] = []
    result = session.export(out, progress=lambda *a: steps.append(a))
    return out, result, steps


def _fields(result, skip=frozenset()) -> dict:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in skip}


def test_the_child_writes_the_same_file_and_result(session, in_process, tmp_path):
    out_in, expected, steps_in = in_process
    out = tmp_path / "m.circle"
    steps: list[tuple[int, int, str]] = []
    got = session.export(out, progress=lambda *a: steps.append(a), in_process=False)
    assert out.read_bytes() == out_in.read_bytes()
    assert got.path == out
    assert _fields(got, RUN_DEPENDENT) == _fields(expected, RUN_DEPENDENT)
    assert [s[:2] for s in steps] == [s[:2] for s in steps_in]  # the same progress ticks, streamed back
    assert steps[-1][2] == f"verified, wrote {out.name}"
    # The verdict, the noise floor and the onert result came back with it.
    assert got.verify is not None and expected.verify is not None
    verify_skip = {"seconds", "onert"}
    assert _fields(got.verify, verify_skip) == _fields(expected.verify, verify_skip)
    assert got.verify.verdict == expected.verify.verdict and got.verify.noise_floor == expected.verify.noise_floor
    assert (got.verify.onert is None) == (expected.verify.onert is None)
    if got.verify.onert is not None:
        assert _fields(got.verify.onert, {"seconds"}) == _fields(expected.verify.onert, {"seconds"})
    assert pickle.loads(pickle.dumps(expected)).tensor_modules == expected.tensor_modules
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.circle"]  # no temporary, no session copy


def _cancel_after_first_step(token: CancelToken):
    def progress(done, total, message):
        token.cancel()

    return progress


@pytest.mark.parametrize("grace_s", [process_mod.CANCEL_GRACE_S, 0.0], ids=["child-stops", "child-terminated"])
def test_cancel_keeps_the_earlier_file(session, tmp_path, monkeypatch, grace_s):
    # child-stops: the child reaches its next cancel check; child-terminated: it is killed mid-export.
    monkeypatch.setattr(process_mod, "CANCEL_GRACE_S", grace_s)
    out = tmp_path / "m.circle"
    out.write_bytes(EARLIER)
    token = CancelToken()
    with pytest.raises(CancelledError) as info:
        session.export(out, progress=_cancel_after_first_step(token), cancel=token, in_process=False)
    assert str(info.value) == f"export cancelled; {out} was left as it was; export again to write it"
    assert out.read_bytes() == EARLIER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.circle"]  # no half file, no temporary


def test_a_child_error_is_the_same_error(session, tmp_path, monkeypatch):
    copies: list[Path] = []

    class Recording(tempfile.TemporaryDirectory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            copies.append(Path(self.name))

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Recording)
    out = tmp_path / "m.circle"
    errors = []
    for in_process in (True, False):
        with pytest.raises(ExportError) as info:
            session.export(out, input_dtype="int4", in_process=in_process)
        errors.append((type(info.value), str(info.value), info.value.path))
    assert errors[0] == errors[1]
    assert "\n" not in errors[1][1]
    assert copies and not any(p.exists() for p in copies)  # the session copy the child read is gone


def test_a_child_path_error_keeps_its_class_and_fields(session, tmp_path):
    out = tmp_path / "missing" / "m.circle"
    with pytest.raises(UnwritablePathError) as here:
        session.export(out)
    with pytest.raises(UnwritablePathError) as there:
        session.export(out, in_process=False)
    assert str(there.value) == str(here.value)
    assert (there.value.path, there.value.reason) == (here.value.path, here.value.reason)


def test_the_child_does_not_load_qt():
    # The spawned child re-imports only what the export needs; Qt would cost seconds and memory.
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        loaded = pool.apply(_qt_modules)
    assert loaded == []


def _qt_modules() -> list[str]:
    import sys

    import core.export.process  # noqa: F401, PLC0415 -- what the child imports

    return sorted(m for m in sys.modules if m.split(".")[0] in ("PySide6", "shiboken6", "pyqtgraph", "app"))
