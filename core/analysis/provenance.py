"""Provenance actions: where an observer's extreme came from, which images set most ranges.

Observers record, for their min and max, the image (``min_source``), the flat index of the
element in that image's tensor and the tensor's shape (see ``core.quant.observers``).
``locate_extreme`` turns that into the image file, the tensor row and the patches behind it
(with pixel boxes in the resized image the model saw); ``rank_images`` counts, per image,
how many activation ranges it set, so outlier images can be excluded
(``Session.recalibrate_without``).

Which axis is "the row": tensors on the static path hold one image with patches or soft
tokens along one axis, the others being batch (size 1), heads, or features. The row axis is
the first axis after a leading batch axis (for 3-D and 4-D tensors) whose size is the
image's number of valid patches or of soft tokens, so ``(1, N, C)`` and ``(N, C)`` give
``index // C`` and ``(1, N, H, D)`` (q/k after RoPE) gives the N axis. Attention scores and
probabilities ``(1, H, N, N)`` give the *query* row (axis -2): the patch whose attention
row holds the extreme; the key is left in ``coords[-1]``. A tensor with no such axis (none
today) gets ``row=None`` and ``level=None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.data.grid import PatchLayout, patch_layout
from core.errors import BadImageError, ConfigError, NoImagesError, NoLocationError, NotCalibratedError
from core.io import file_sha256
from core.quant.observers import WEIGHT_SOURCE

__all__ = ["ExtremeLocation", "ImageRank", "NoLocationError", "locate_extreme", "rank_images", "row_axis"]


@dataclass
class ExtremeLocation:
    """Where one observer's min or max occurred: image, tensor row, patches and pixel boxes."""

    observer: str
    which: str  # "min" | "max"
    value: float  # the element's value (for EMA the raw extreme, not the averaged range end)
    image_id: str
    path: str
    index: int  # flat index (C order) into the observed tensor
    shape: tuple[int, ...]  # the observed tensor's shape for that image
    coords: tuple[int, ...]  # the index unravelled over shape
    row: int | None  # row along the patch / soft-token axis (query row for attention)
    level: str | None  # "patch" | "token" | None
    patches: np.ndarray  # indices of the valid patches behind the row (empty when row is None)
    boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) in the resized image
    image: np.ndarray  # uint8 (H, W, 3): the resized image the model saw
    layout: PatchLayout
    pixel: tuple[int, int] | None = None  # (x, y) of the exact pixel, for the pixel-input observer
    tied: bool = False  # a later image reached the same value (this is the earliest)


@dataclass
class ImageRank:
    """How many activation ranges (min or max ends) one image set."""

    image_id: str
    path: str | None  # None when the image is no longer in the session
    extremes: int
    min_count: int
    max_count: int
    observers: list[str] = field(default_factory=list)  # observers whose min or max it set
    status: str = ""  # the session entry's status ("used", "excluded", ...); "" when not listed


def _observer(session, name: str):
    for obs in session.qmodel.observers():
        if obs.name == name:
            return obs
    raise ConfigError(f"no observer named {name!r} in this model; pick one from the observer table")


def row_axis(shape: tuple[int, ...], layout: PatchLayout) -> int | None:
    """The axis of `shape` that runs over patches or soft tokens (see the module docstring)."""
    sizes = {layout.num_patches, layout.num_tokens}
    nd = len(shape)
    if nd == 4 and shape[-1] == shape[-2] and shape[-1] in sizes:
        return nd - 2  # attention scores / probabilities: the query row
    start = 1 if nd >= 3 else 0  # a leading batch axis of one image
    for axis in range(start, nd):
        if shape[axis] in sizes:
            return axis
    return None


def _pixel_of(layout: PatchLayout, patch: int, channel_index: int, channels: int) -> tuple[int, int] | None:
    p = layout.patch_size
    if channels % (p * p):
        return None
    c = channels // (p * p)
    r, col = divmod(channel_index // c, p)  # the processor's (row, col, channel) order
    x, y = (int(v) for v in layout.positions[patch])
    return x * p + col, y * p + r


def locate_extreme(session, observer_name: str, which: str = "max") -> ExtremeLocation:
    """Map an observer's recorded min or max to its image, tensor row, patches and pixel boxes."""
    if which not in ("min", "max"):
        raise ConfigError(f"which must be 'min' or 'max', not {which!r}")
    obs = _observer(session, observer_name)
    if not obs.has_stats:
        raise NotCalibratedError(f"observer {obs.name} has no statistics yet: calibrate first")
    source = getattr(obs, f"{which}_source")
    if obs.kind == "weight" or source == WEIGHT_SOURCE:
        raise NoLocationError(f"observer {obs.name}: its {which} comes from the weights, not from an image")
    if obs.per_channel:
        raise NoLocationError(
            f"observer {obs.name} is per channel: each channel's {which} has its own image, so there is no single location"
        )
    loc = obs.location(which)
    if source is None or loc is None:
        raise NoLocationError(
            f"observer {obs.name}: no recorded location for its {which} (saved by an older PTQ Studio?); calibrate again to record it"
        )
    index, shape = loc
    entry = next((e for e in session.images if e.image_id == source), None)
    if entry is None:
        raise NoImagesError(None, f"image {source} that set the {which} of {obs.name} is no longer in the session")
    if entry.status == "rejected":
        raise NoImagesError(entry.path, f"image {source} is no longer usable ({entry.reason or 'rejected'})")
    path = Path(entry.path)
    if not path.is_file():
        raise NoImagesError(path, f"image {source} that set the {which} of {obs.name} is missing on disk")
    if entry.sha256:
        if file_sha256(path) != entry.sha256:
            raise NoImagesError(path, f"image {source} changed on disk since calibration; calibrate again")
    try:
        batch = session.preprocessor([str(path)])
    except BadImageError as e:
        raise NoImagesError(path, f"image {source} cannot be read any more ({e.reason})") from None
    layout = patch_layout(session.qmodel, batch["pixel_position_ids"][:1])
    image = layout.image(batch["pixel_values"][0])

    shape = tuple(int(d) for d in shape)
    coords = tuple(int(c) for c in np.unravel_index(int(index), shape)) if shape else ()
    axis = row_axis(shape, layout)
    row = level = None
    patches = np.zeros(0, dtype=np.int64)
    boxes: list[tuple[int, int, int, int]] = []
    pixel = None
    if axis is not None:
        row = coords[axis]
        rows = shape[axis]
        level = layout.level_of(rows)
        patches = np.asarray(layout.patches_of_row(row, rows), dtype=np.int64)
        boxes = [layout.patch_box(int(p)) for p in patches]
        if obs.role == "pixels" and level == "patch" and axis == len(shape) - 2:
            pixel = _pixel_of(layout, row, coords[-1], shape[-1])
    value = getattr(obs, f"{which}_value", None)
    if value is None:
        value = float(obs.min_val if which == "min" else obs.max_val)
    return ExtremeLocation(
        observer=obs.name,
        which=which,
        value=float(value),
        image_id=source,
        path=entry.path,
        index=int(index),
        shape=shape,
        coords=coords,
        row=row,
        level=level,
        patches=patches,
        boxes=boxes,
        image=image,
        layout=layout,
        pixel=pixel,
        tied=bool(getattr(obs, f"{which}_tied", False)),
    )


def rank_images(session) -> list[ImageRank]:
    """Images by how many per-tensor activation ranges they set (min and max ends), most first.

    Every image the statistics were calibrated on ("used") is listed, with zero counts too, plus
    any other image still named as a source (e.g. excluded but not recalibrated yet). Extremes
    that a later image matched exactly (``min_tied`` / ``max_tied``: shared tensors such as RoPE
    tables or the pooling matrix, saturated pixels) are not credited to anyone, so the counts sum
    to 2 x (per-tensor activation observers with statistics) minus the tied extremes.
    Ties in the ranking keep the session's image order.
    """
    counts: dict[str, list] = {}  # image id -> [min_count, max_count, observers]

    def credit(image_id: str, which: int, name: str) -> None:
        c = counts.setdefault(image_id, [0, 0, []])
        c[which] += 1
        if name not in c[2]:
            c[2].append(name)

    for obs in session.qmodel.observers():
        if obs.kind != "activation" or obs.per_channel or not obs.has_stats:
            continue
        for i, which in enumerate(("min", "max")):
            source = getattr(obs, f"{which}_source")
            if source is None or source == WEIGHT_SOURCE or getattr(obs, f"{which}_tied", False):
                continue
            credit(source, i, obs.name)

    order: list[tuple[str, str | None, str]] = []
    seen: set[str] = set()
    for e in session.images:
        if e.status == "rejected" or not e.image_id or e.image_id in seen:
            continue
        if e.status == "used" or e.image_id in counts:
            order.append((e.image_id, e.path, e.status))
            seen.add(e.image_id)
    for image_id in counts:
        if image_id not in seen:
            order.append((image_id, None, ""))
            seen.add(image_id)
    ranks = []
    for image_id, path, status in order:
        mn, mx, names = counts.get(image_id, [0, 0, []])
        ranks.append(ImageRank(image_id, os.fspath(path) if path else None, mn + mx, mn, mx, list(names), status))
    ranks.sort(key=lambda r: -r.extremes)  # stable: equal counts keep the session's order
    return ranks
