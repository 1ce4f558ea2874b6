"""Exceptions a user can cause; each ``str()`` is one line naming the file and the fix."""

from __future__ import annotations

from pathlib import Path


def one_line(text) -> str:
    """The text (or exception) on one line, whitespace runs collapsed: how every error is shown."""
    # The CLI prints errors on one line and the GUI shows them in a status bar.
    return " ".join(str(text).split())


def exception_line(exc: BaseException) -> str:
    """A third-party exception as "<type>: <first line>": torch's and tico's messages run to pages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class PTQStudioError(Exception):
    """Base class of every error a user can cause and fix."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self.args[0]) if self.args else ""


class ModelLoadError(PTQStudioError):
    """A model spec or checkpoint folder cannot be loaded."""

    def __init__(self, path: str | Path | None, problem: str, fix: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path is not None else ""
        tail = f" ({fix})" if fix else ""
        super().__init__(f"cannot load model from {where}{problem}{tail}")


class BadImageError(PTQStudioError):
    """A file is not a usable image."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason} (remove it or replace it with a JPEG/PNG photo)")


class NoImagesError(PTQStudioError):
    """A folder or selection holds no usable images."""

    def __init__(self, path: str | Path | None, detail: str = "") -> None:
        self.path = Path(path) if path is not None else None
        where = str(self.path) if self.path is not None else "the selection"
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{where}: no usable images found{extra}; add JPEG/PNG photos or pick another folder")


class ConfigError(PTQStudioError):
    """A quantization config is invalid."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        prefix = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{prefix}{message}")


class SessionFileError(PTQStudioError):
    """A saved session file cannot be read or written."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ExportError(PTQStudioError):
    """Export to Circle or its verification failed."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        prefix = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{prefix}{message}")


class UnwritablePathError(PTQStudioError):
    """An output path cannot be written."""

    def __init__(self, path: str | Path, reason: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        extra = f" ({reason})" if reason else ""
        super().__init__(f"{self.path}: cannot write here{extra}; choose a writable folder")


class NotCalibratedError(PTQStudioError):
    """A step needs calibration statistics that do not exist yet."""

    def __init__(self, message: str = "the model is not calibrated; run calibration on some images first") -> None:
        super().__init__(message)


class CancelledError(PTQStudioError):
    """The user cancelled a long-running step."""

    def __init__(self, message: str = "cancelled by the user; completed work was kept, run it again to continue") -> None:
        super().__init__(message)


class NoLocationError(PTQStudioError):
    """An observer's extreme has no image location (weights, per-channel ranges, older sessions)."""


class UnknownImageError(NoImagesError):
    """A path or image id that names no usable image of the session."""

    def __init__(self, key: str) -> None:
        self.path = Path(str(key))
        PTQStudioError.__init__(
            self,
            f"{key}: not an image of this session (or it was rejected); "
            "list the session's images with 'ptq-studio images SESSION' or in the Calibration tab",
        )
