"""core.errors messages are one line and name the file; CancelToken works across threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from core import errors
from core.cancel import CancelToken


def test_every_error_is_one_line_and_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "x\ny.jpg"
    cases = [
        errors.ModelLoadError(p, "missing config.json", "save it with save_pretrained()"),
        errors.BadImageError(p, "not an image\nat all"),
        errors.NoImagesError(p),
        errors.ConfigError("bad glob", p),
        errors.SessionFileError(p, "corrupt"),
        errors.ExportError("conversion failed", p),
        errors.UnwritablePathError(p, "read-only"),
    ]
    for exc in cases:
        assert isinstance(exc, errors.PTQStudioError)
        assert "\n" not in str(exc)
        assert "x y.jpg" in str(exc)
        assert exc.path == p
    assert errors.BadImageError(p, "bad").reason == "bad"
    for exc in (errors.NotCalibratedError(), errors.CancelledError()):
        assert isinstance(exc, errors.PTQStudioError) and "\n" not in str(exc) and str(exc)


def test_cancel_token_is_seen_from_another_thread() -> None:
    token = CancelToken()
    assert not token.cancelled
    token.raise_if_cancelled()
    worker_saw = threading.Event()

    def worker() -> None:
        while not token.cancelled:
            pass
        worker_saw.set()

    thread = threading.Thread(target=worker)
    thread.start()
    token.cancel()
    thread.join(timeout=10)
    assert worker_saw.is_set()
    with pytest.raises(errors.CancelledError):
        token.raise_if_cancelled()
