"""Resolve files bundled in the top-level ``resources`` package."""

from __future__ import annotations

from pathlib import Path

import resources as _resources_pkg

_ROOT = Path(_resources_pkg.__file__).resolve().parent
_SAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class UnknownResourceError(KeyError):
    """A resource name that is not shipped with PTQ Studio."""


def resources_root() -> Path:
    """Return the folder of the installed ``resources`` package."""
    return _ROOT


def resource_path(name: str) -> Path:
    """Return the path of the bundled resource ``name`` (e.g. ``"samples/chelsea.jpg"``)."""
    relative = Path(name)
    # Refuse absolute paths and '..' so a name can never escape the package.
    if relative.is_absolute() or ".." in relative.parts:
        raise UnknownResourceError(f"{name!r} is not a resource name (use a path relative to resources/)")
    path = _ROOT / relative
    if not path.exists():
        raise UnknownResourceError(f"unknown resource {name!r}: no file {path}")
    return path


def sample_images() -> list[Path]:
    """Return the bundled sample photographs, sorted by name."""
    folder = resource_path("samples")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _SAMPLE_SUFFIXES)
