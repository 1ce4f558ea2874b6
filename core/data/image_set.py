"""A session's image bookkeeping: entries with their status, probing new files, exclude / include.

An entry's status is "ok" (accepted), "used" (in the current statistics), "excluded" (listed
but left out of calibration and evaluation until included again) or "rejected" (with the reason).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.data.images import LoadedImage
from core.errors import NoImagesError, UnknownImageError, one_line
from core.io import file_sha256

USABLE = ("ok", "used")


@dataclass
class ImageEntry:
    """One image of the session's set: status "ok" (accepted), "used" (calibrated on),
    "excluded" (kept in the list but left out of calibration and evaluation until included
    again) or "rejected"."""

    path: str
    image_id: str = ""
    sha256: str = ""
    status: str = "ok"
    reason: str = ""


@dataclass
class AddImagesResult:
    """What add_images accepted and rejected (with the reason)."""

    accepted: list[ImageEntry]
    rejected: list[ImageEntry]


def probe_paths(preprocessor, paths, known: set[str]) -> AddImagesResult:
    """Open paths (folders expanded) with `preprocessor`; duplicates of the hashes in `known` are rejected."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    known = set(known)
    accepted: list[ImageEntry] = []
    rejected: list[ImageEntry] = []
    # Each image is decoded to be checked and then dropped (only its path, id and hash are
    # kept), so memory does not grow with the image count; steps decode again when they run.
    for img in preprocessor.iter_load(list(paths)):
        if not isinstance(img, LoadedImage):
            rejected.append(ImageEntry(str(img.path), status="rejected", reason=one_line(img.reason)))
        elif img.sha256 in known:
            rejected.append(ImageEntry(str(img.path), img.image_id, img.sha256, "rejected", "already in the image set"))
        else:
            known.add(img.sha256)
            accepted.append(ImageEntry(str(img.path), img.image_id, img.sha256, "ok", ""))
        del img
    return AddImagesResult(accepted, rejected)


def usable(images: Iterable[ImageEntry]) -> list[ImageEntry]:
    """The images that can be fed to the model (neither rejected nor excluded)."""
    return [e for e in images if e.status in USABLE]


def match_images(images: list[ImageEntry], paths_or_ids) -> list[ImageEntry]:
    """The non-rejected entries named by path or image id; an unknown name raises UnknownImageError."""
    if isinstance(paths_or_ids, (str, os.PathLike)):
        paths_or_ids = [paths_or_ids]
    out: list[ImageEntry] = []
    for item in paths_or_ids:
        key = str(item)
        keys = {key, str(Path(key)), _resolved(key)}
        found = [
            e for e in images
            if e.status != "rejected"
            and (e.image_id == key or e.path in keys or _resolved(e.path) in keys)
        ]
        if not found:
            raise UnknownImageError(key)
        out.extend(e for e in found if not any(e is o for o in out))
    return out


def exclude(images: list[ImageEntry], paths_or_ids, memory: dict[str, str]) -> list[ImageEntry]:
    """Mark the named images "excluded", remembering each one's status in `memory`; the newly excluded.

    Excluding every usable image raises NoImagesError and changes nothing."""
    chosen = [e for e in match_images(images, paths_or_ids) if e.status != "excluded"]
    remaining = [e for e in usable(images) if not any(e is c for c in chosen)]
    if not remaining:
        raise NoImagesError(None, "excluding these would leave no image to calibrate on; keep at least one")
    for e in chosen:
        memory[e.path] = e.status
        e.status = "excluded"
    return chosen


def include(images: list[ImageEntry], paths_or_ids, memory: dict[str, str]) -> list[ImageEntry]:
    """Undo exclude: each named image gets back the status `memory` holds for it (else "ok")."""
    chosen = [e for e in match_images(images, paths_or_ids) if e.status == "excluded"]
    for e in chosen:
        e.status = memory.pop(e.path, "ok")
    return chosen


def mark_used(images: list[ImageEntry], used: Iterable[ImageEntry]) -> None:
    """New statistics: exactly the `used` entries are "used" (earlier "used" ones become "ok")."""
    for e in images:
        if e.status == "used":
            e.status = "ok"
    for e in used:
        e.status = "used"


def recheck_images(images: list[ImageEntry]) -> list[ImageEntry]:
    """Mark images that vanished or changed since the save as rejected (the rest stay usable)."""
    out = []
    for e in images:
        if e.status != "rejected":
            p = Path(e.path)
            if not p.is_file():
                e = ImageEntry(e.path, e.image_id, e.sha256, "rejected", "missing since the session was saved")
            elif e.sha256 and file_sha256(p) != e.sha256:
                e = ImageEntry(e.path, e.image_id, e.sha256, "rejected", "changed since the session was saved")
        out.append(e)
    return out


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return path
