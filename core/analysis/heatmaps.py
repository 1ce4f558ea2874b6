"""Where in the image quantization error lives: per-patch / per-token error heatmaps.

The model runs the way ``core.analysis.compare`` runs it (``core.analysis.tap``): the FP reference is
QUANT mode with every observer kept float, then the quantized pass with only the config's keep-float
modules. Nothing here keeps a tensor beyond the image it belongs to.

For one image, every wrapper output whose rows are patches or soft tokens
(``core.data.grid.PatchLayout.level_of``) gets one error value per row:

- relative error of row i = mean_j (q_ij - fp_ij)^2 / mean_ij fp_ij^2
  (noise power of the row over the mean signal power of the whole FP tensor; dimensionless,
  so rows of different modules compare, and the rows' mean is 10^(-SQNR/10) of the module)
- row SQNR = 10 log10(sum_j fp_ij^2 / sum_j (q_ij - fp_ij)^2) in dB (+inf when exact)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.analysis.metrics import sqnr_from_sums
from core.analysis.tap import PairTap, Progress, enter_quant, model_device, model_inputs, module_output_observers
from core.cancel import CancelToken
from core.data.grid import PatchLayout, patch_layout
from core.errors import BadImageError
from core.io import finite_or_none

MODEL = "model"

__all__ = ["MODEL", "Heatmap", "ImageErrorMaps", "RowErrorCollector", "image_error_maps", "image_error_maps_batch"]


# ---------------------------------------------------------------------------------------------
# Heatmap results
# ---------------------------------------------------------------------------------------------


@dataclass
class Heatmap:
    """Per-row error of one module's output on one image, laid onto the patch grid."""

    module: str
    image_id: str
    level: str  # "patch" | "token"
    row_error: np.ndarray  # relative error per row (see the module docstring)
    grid: np.ndarray  # (rows, cols) over the patch grid; NaN where the image has no patch
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8: the resized image the model saw
    layout: PatchLayout = field(repr=False)
    peak_row: int = 0
    peak_patch: int = 0
    peak_xy: tuple[int, int] = (0, 0)
    row_sqnr_db: np.ndarray | None = field(default=None, repr=False)

    @property
    def peak_patches(self) -> np.ndarray:
        """Every patch behind the peak row (one for patch-level maps, a k x k block for tokens)."""
        return self.layout.patches_of_row(self.peak_row, int(self.row_error.size))

    def peak_box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) pixel box around the patches of the peak row."""
        boxes = np.array([self.layout.patch_box(int(p)) for p in self.peak_patches])
        return int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())

    def to_dict(self) -> dict[str, Any]:
        """Small JSON-ready summary (no image, no grid)."""
        e = self.row_error
        finite = e[np.isfinite(e)]
        sq = self.row_sqnr_db
        return {
            "module": self.module,
            "image_id": self.image_id,
            "level": self.level,
            "rows": int(e.size),
            "grid": [int(v) for v in self.grid.shape],
            "image_size": [int(v) for v in self.layout.image_size],
            "mean_error": finite_or_none(finite.mean()) if finite.size else None,
            "max_error": finite_or_none(finite.max()) if finite.size else None,
            "min_error": finite_or_none(finite.min()) if finite.size else None,
            "peak_row": int(self.peak_row),
            "peak_patch": int(self.peak_patch),
            "peak_xy": [int(v) for v in self.peak_xy],
            "peak_box": [int(v) for v in self.peak_box()],
            "peak_sqnr_db": finite_or_none(sq[self.peak_row]) if sq is not None and sq.size else None,
        }


@dataclass
class ImageErrorMaps:
    """Per-row errors of every patch- or token-level wrapper output for one image."""

    image_id: str
    path: str | None
    layout: PatchLayout = field(repr=False)
    image: np.ndarray = field(repr=False)
    rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    module_order: list[str] = field(default_factory=list)
    row_sqnr_db: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    levels: dict[str, str] = field(default_factory=dict, repr=False)
    sqnr_db: dict[str, float] = field(default_factory=dict, repr=False)  # whole-tensor SQNR per module
    seconds: float = 0.0

    @classmethod
    def of_final_output(cls, qmodel, inputs: Mapping, image_id: str, fp: torch.Tensor, q: torch.Tensor) -> ImageErrorMaps:
        """Maps holding only the final output's map, from the two outputs of a pass already run."""
        layout = patch_layout(qmodel, inputs["pixel_position_ids"])
        maps = cls(image_id=image_id, path=None, layout=layout, image=layout.image(inputs["pixel_values"][0]))
        maps.add_final(fp, q)
        return maps

    def add_module(self, name: str, rel: np.ndarray, sq: np.ndarray, ff: float, dd: float, level: str) -> None:
        """Add one module's map: relative error and SQNR per row, its sums of fp^2 and d^2, its level."""
        self.rows[name], self.row_sqnr_db[name], self.levels[name] = rel, sq, level
        self.sqnr_db[name] = sqnr_from_sums(ff, dd)
        self.module_order.append(name)

    def add_final(self, fp: torch.Tensor, q: torch.Tensor) -> None:
        """Add the final output's map ("model"), when its rows are patches or soft tokens."""
        out_fp, out_q = _rows_view(fp), _rows_view(q)
        level = self.layout.level_of(int(out_fp.shape[0]))
        if level is not None:
            self.add_module(MODEL, *_row_stats(out_fp, out_q), level)

    def modules(self) -> list[str]:
        """Module names with a map, forward order, "model" last."""
        return list(self.module_order)

    def heatmap(self, module: str = MODEL) -> Heatmap:
        """The heatmap of one module's output (default: the final output)."""
        if module not in self.rows:
            raise KeyError(f"no patch- or token-level map for {module!r}; choose one of {', '.join(self.module_order)}")
        err = np.asarray(self.rows[module], dtype=np.float64)
        level = self.levels.get(module) or self.layout.level_of(err.size) or "patch"
        peak_row = _nan_argmax(err)
        patches = self.layout.patches_of_row(peak_row, err.size)
        # A token's k x k block: name its centre patch (the box outlines the whole block).
        peak_patch = int(patches[len(patches) // 2]) if len(patches) else 0
        x, y = (int(v) for v in self.layout.positions[peak_patch])
        return Heatmap(
            module=module,
            image_id=self.image_id,
            level=level,
            row_error=err,
            grid=self.layout.to_grid(err),
            image=self.image,
            layout=self.layout,
            peak_row=peak_row,
            peak_patch=peak_patch,
            peak_xy=(x, y),
            row_sqnr_db=self.row_sqnr_db.get(module),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the final output's heatmap and each module's peak."""
        return {
            "image_id": self.image_id,
            "path": self.path,
            "grid": [int(v) for v in self.layout.grid],
            "patches": self.layout.num_patches,
            "tokens": self.layout.num_tokens,
            "model": self.heatmap(MODEL).to_dict() if MODEL in self.rows else None,
            "modules": [
                {
                    "module": m,
                    "level": self.levels.get(m),
                    "sqnr_db": finite_or_none(self.sqnr_db.get(m, math.nan)),
                    "peak_row": _nan_argmax(self.rows[m]),
                    "max_error": finite_or_none(np.nanmax(self.rows[m])) if self.rows[m].size else None,
                }
                for m in self.module_order
            ],
        }


def _nan_argmax(x: np.ndarray) -> int:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.all(np.isnan(x)):
        return 0
    return int(np.nanargmax(x))


# ---------------------------------------------------------------------------------------------
# Heatmap computation
# ---------------------------------------------------------------------------------------------


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor with leading batch dims of size 1 dropped (rows first)."""
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    return t


def _row_stats(fp: torch.Tensor, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(relative error per row, SQNR dB per row, sum fp^2, sum d^2) of two (rows, ...) tensors."""
    fp = fp.reshape(fp.shape[0], -1).double()
    d = q.reshape(q.shape[0], -1).double() - fp
    row_ff = (fp * fp).sum(dim=1)
    row_dd = (d * d).sum(dim=1)
    width = fp.shape[1]
    total_ff = float(row_ff.sum())
    total_dd = float(row_dd.sum())
    mean_signal = total_ff / max(1, fp.numel())
    noise = (row_dd / max(1, width)).cpu().numpy()
    if mean_signal > 0:
        rel = noise / mean_signal
    else:
        rel = np.where(noise > 0, np.inf, 0.0)
    ff = row_ff.cpu().numpy()
    dd = row_dd.cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = 10.0 * np.log10(ff / dd)
    sq = np.where(dd <= 0, np.inf, np.where(ff <= 0, -np.inf, sq))
    return rel.astype(np.float64), sq.astype(np.float64), total_ff, total_dd


class RowErrorCollector:
    """Per-row errors of one image's wrapper outputs, fed by a PairTap (``on_pair``), turned into ImageErrorMaps.

    Shared by ``image_error_maps_batch`` and the one analysis pass (core.analysis.analysis_pass).
    ``outputs``: core.analysis.tap.module_output_observers of the model; ``inputs``: the image's
    model inputs (a batch of one).
    """

    def __init__(self, qmodel, outputs, inputs: Mapping):
        self.outputs = outputs
        self.layout = patch_layout(qmodel, inputs["pixel_position_ids"])
        self.image = self.layout.image(inputs["pixel_values"][0])
        self.stats: dict[str, tuple[np.ndarray, np.ndarray, float, float, str]] = {}
        self.paired: set[str] = set()

    def on_pair(self, obs, fp: torch.Tensor, q: torch.Tensor) -> None:
        """Row statistics of an output observer's first paired tensor of this image."""
        if obs.name in self.paired:  # each output observer sees one tensor per image: keep the first
            return
        self.paired.add(obs.name)
        fp_r, q_r = _rows_view(fp), _rows_view(q)
        level = self.layout.level_of(int(fp_r.shape[0])) if fp_r.dim() >= 1 else None
        if level is not None:
            self.stats[obs.name] = (*_row_stats(fp_r, q_r), level)

    def maps(self, image_id: str, path: str | None, fp_out: torch.Tensor, q_out: torch.Tensor) -> ImageErrorMaps:
        """The image's maps: every patch- or token-level wrapper output, then the final output's."""
        maps = ImageErrorMaps(image_id=image_id, path=path, layout=self.layout, image=self.image)
        for name, _kind, obs in self.outputs:
            if obs.name in self.stats:
                maps.add_module(name, *self.stats[obs.name])
        maps.add_final(fp_out, q_out)
        return maps


def image_error_maps_batch(
    qmodel,
    batch: Mapping,
    image_id: str = "",
    path: str | None = None,
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
) -> ImageErrorMaps:
    """Per-row error maps of one image (a preprocessor batch of one) on a calibrated wrapped model."""
    cancel = cancel or CancelToken()
    if int(batch["pixel_values"].shape[0]) != 1:
        raise ValueError(f"image_error_maps_batch takes one image, got a batch of {int(batch['pixel_values'].shape[0])}")
    if not image_id:
        ids = list(batch.get("image_ids") or [])
        image_id = ids[0] if ids else (Path(path).name if path else "image")
    t0 = time.perf_counter()
    device = model_device(qmodel)
    inputs, _ = model_inputs(batch, device)
    outputs = module_output_observers(qmodel)
    rows = RowErrorCollector(qmodel, outputs, inputs)
    wanted = {obs.name for _, _, obs in outputs}
    total = 2

    def after_fp() -> None:
        if progress is not None:
            progress(1, total, f"{image_id}: float pass")
        cancel.raise_if_cancelled("Error heatmap")

    try:
        cancel.raise_if_cancelled("Error heatmap")
        enter_quant(qmodel)
        with torch.no_grad(), PairTap(qmodel, wanted, rows.on_pair, cancel, "Error heatmap") as tap:
            fp_out, q_out = tap.run(inputs, [], after_fp)
    finally:
        qmodel.set_keep_float([])
    maps = rows.maps(image_id, None if path is None else str(path), fp_out, q_out)
    del fp_out, q_out
    maps.seconds = time.perf_counter() - t0
    if progress is not None:
        progress(total, total, f"{image_id}: quantized pass")
    return maps


def _session_batch(session, image) -> tuple[dict, str, str]:
    """One image (path or ImageEntry) validated through the session: (batch, image id, path)."""
    path = getattr(image, "path", image)
    probe = session.probe_images([path])
    if not probe.accepted:
        reason = probe.rejected[0].reason if probe.rejected else "not a usable image"
        raise BadImageError(path, reason)
    entry = probe.accepted[0]
    batch = dict(session.preprocessor([entry.path]))
    batch["image_ids"] = [entry.image_id or Path(entry.path).name]
    return batch, batch["image_ids"][0], str(entry.path)


def image_error_maps(session, image, progress: Progress | None = None, cancel: CancelToken | None = None) -> ImageErrorMaps:
    """Per-patch / per-token error maps of every module for one image (a path or an ImageEntry) of a session."""
    cancel = cancel or CancelToken()
    session.require_calibrated()
    cancel.raise_if_cancelled("Error heatmap")
    batch, image_id, path = _session_batch(session, image)
    return image_error_maps_batch(session.qmodel, batch, image_id=image_id, path=path, progress=progress, cancel=cancel)
