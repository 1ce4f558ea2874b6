"""A session's evaluation set: the few photos the analysis runs on (not every calibration image).

The set is kept as the chosen images' paths, or None for the default (the first usable images). It
is resolved against the session's images each time it is used, so an image that was removed,
excluded or rejected since simply drops out; when none of the chosen ones is left, the default
applies again rather than an empty evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError, UnknownImageError

if TYPE_CHECKING:
    from core.data.image_set import ImageEntry

# Each evaluation photo costs one float and one quantized pass plus the divergence search (about
# three float forwards on e2b, issue 13), so evaluating every calibration image made the first
# numbers wait minutes. Four photos of different content already rank the worst modules; issue
# 14's benchmarks evaluate on four too. The user can choose more (or others).
DEFAULT_EVAL_COUNT = 4


def evaluation_entries(images: Sequence[ImageEntry], chosen: Sequence[str] | None) -> list[ImageEntry]:
    """The usable images of the evaluation set, in the session's order (the default when none is chosen or left)."""
    from core.data.image_set import usable  # noqa: PLC0415 -- image_set loads numpy; the CLI's --help reads DEFAULT_EVAL_COUNT here

    pool = usable(images)
    if chosen:
        keys = set(chosen)
        picked = [e for e in pool if e.path in keys]
        if picked:
            return picked
    return pool[:DEFAULT_EVAL_COUNT]


def choose_paths(images: Sequence[ImageEntry], paths_or_ids) -> list[str]:
    """The paths of the named images, checked: each must be a usable image of the session.

    Raises a one-line ConfigError naming the first bad image and what to do."""
    from core.data.image_set import USABLE, match_images  # noqa: PLC0415 -- image_set loads numpy; the CLI's --help reads DEFAULT_EVAL_COUNT here

    if isinstance(paths_or_ids, (str, os.PathLike)):
        paths_or_ids = [paths_or_ids]
    names = [str(p) for p in paths_or_ids]
    if not names:
        raise ConfigError("the evaluation set is empty: choose at least one photo (or reset it to the default)")
    chosen: list[ImageEntry] = []
    for name in names:
        try:
            found = match_images(list(images), [name])
        except UnknownImageError:
            raise ConfigError(
                f"evaluation image {name}: not an image of this session (or it was rejected); "
                "add it in the Calibration tab first or choose one of the session's photos"
            ) from None
        for e in found:
            if e.status not in USABLE:
                raise ConfigError(
                    f"evaluation image {Path(e.path).name}: it is {e.status}; include it again or choose another photo"
                )
            if not any(e is c for c in chosen):
                chosen.append(e)
    order = {id(e): i for i, e in enumerate(images)}
    return [e.path for e in sorted(chosen, key=lambda e: order[id(e)])]


def saved_paths(value) -> list[str] | None:
    """A manifest's evaluation set (a list of paths), or None for the default (absent, null or malformed)."""
    if isinstance(value, list) and value and all(isinstance(p, str) and p for p in value):
        return list(value)
    return None
