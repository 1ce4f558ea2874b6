"""Where quantization error lives: per-patch error heatmaps and the first-divergence locator.

Both run the model the way ``core.analysis.inspect.compare`` does: the FP reference is QUANT mode with
every observer kept float (the very graph the quantized pass runs, without fake-quant), then
the quantized pass with only the config's keep-float modules. Nothing here keeps a tensor
beyond the image it belongs to.

Heatmap (``image_error_maps``): for one image, every wrapper output whose rows are patches or
soft tokens (``core.data.grid.PatchLayout.level_of``) gets one error value per row:

- relative error of row i = mean_j (q_ij - fp_ij)^2 / mean_ij fp_ij^2
  (noise power of the row over the mean signal power of the whole FP tensor; dimensionless,
  so rows of different modules compare, and the rows' mean is 10^(-SQNR/10) of the module)
- row SQNR = 10 log10(sum_j fp_ij^2 / sum_j (q_ij - fp_ij)^2) in dB (+inf when exact)

First divergence (``locate_divergence``): along forward order, for every unit,

- input_sqnr_db   SQNR of the unit's input in the full quantized run against the FP run
                  (the error it inherits)
- output_sqnr_db  the same at its output (the cumulative error)
- local_sqnr_db   the unit run quantized on its *FP* input, compared with its FP output (the
                  error it adds by itself, nothing inherited)
- jump_db         min(input_sqnr_db, reference) - output_sqnr_db (how much SQNR the unit
                  loses; the reference is below)

A unit whose input carries no error at all (the patch embedder reads raw pixels, or everything
before it is kept float) has an infinite input SQNR, and an infinite jump would flag the first
unit merely for being first. Input SQNRs are therefore capped at the *reference* SQNR, the
median local SQNR over all units (what a typical unit of this model and config keeps when it
is the only one quantized): a cleaner input counts as clean, and a first unit is located only
when it is worse than a typical unit. The located unit is the one with the largest jump (the
earliest within ``TIE_DB`` of it). It *adds* the error itself when its local SQNR lies at least
``ADDS_MARGIN_DB`` below its input SQNR (capped the same way); otherwise it amplifies error it
inherited.

Units: ``unit="layer"``: patch_embedder, every encoder layer, pooler and "model" (the final
standardize, or the identity when the model has none); ``unit="module"``: every leaf wrapper
with an output observer (linears, norms, the pooler) and "model". Module units do not cover
the glue between leaves (attention's RoPE / scores / softmax / context, the MLP product, the
residual sums): error added there shows up as a drop between one unit's output and the next
unit's input, not as a jump.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.analysis.inspect import (
    ALL_FLOAT,
    FqTap,
    _cancelled,
    _enter_quant,
    _final_output,
    _first_tensor,
    _json_float,
    _mode_enum,
    _model_device,
    _model_inputs,
    _raise_cancelled,
    _sqnr,
    _wrapper_kind,
    module_output_observers,
)
from core.data.grid import PatchLayout, patch_layout

Progress = Callable[[int, int, str], None]

MODEL = "model"
TIE_DB = 0.5
ADDS_MARGIN_DB = 3.0
UNITS = ("layer", "module")

__all__ = [
    "MODEL",
    "TIE_DB",
    "ADDS_MARGIN_DB",
    "Heatmap",
    "ImageErrorMaps",
    "image_error_maps",
    "image_error_maps_batch",
    "DivergenceEntry",
    "DivergenceResult",
    "locate_divergence",
    "locate_divergence_batches",
    "divergence_units",
]


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
            "mean_error": _json_float(finite.mean()) if finite.size else None,
            "max_error": _json_float(finite.max()) if finite.size else None,
            "min_error": _json_float(finite.min()) if finite.size else None,
            "peak_row": int(self.peak_row),
            "peak_patch": int(self.peak_patch),
            "peak_xy": [int(v) for v in self.peak_xy],
            "peak_box": [int(v) for v in self.peak_box()],
            "peak_sqnr_db": _json_float(sq[self.peak_row]) if sq is not None and sq.size else None,
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

    def _add(self, name: str, rel: np.ndarray, sq: np.ndarray, ff: float, dd: float, level: str) -> None:
        self.rows[name], self.row_sqnr_db[name], self.levels[name] = rel, sq, level
        self.sqnr_db[name] = _sqnr(ff, dd)
        self.module_order.append(name)

    def _add_final(self, fp: torch.Tensor, q: torch.Tensor) -> None:
        """The final output's map ("model"), when its rows are patches or soft tokens."""
        out_fp, out_q = _rows_view(fp), _rows_view(q)
        level = self.layout.level_of(int(out_fp.shape[0]))
        if level is not None:
            self._add(MODEL, *_row_stats(out_fp, out_q), level)

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
                    "sqnr_db": _json_float(self.sqnr_db.get(m, math.nan)),
                    "peak_row": _nan_argmax(self.rows[m]),
                    "max_error": _json_float(np.nanmax(self.rows[m])) if self.rows[m].size else None,
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


def _single_image_batches(batches: Iterable[Mapping]):
    """Split every batch into batches of one image (memory stays bounded by one image)."""
    for batch in batches:
        pv = batch["pixel_values"]
        ids = list(batch.get("image_ids") or [])
        n = int(pv.shape[0])
        if n == 1:
            yield batch
            continue
        for b in range(n):
            one = {k: v for k, v in batch.items() if k not in ("pixel_values", "pixel_position_ids", "image_ids")}
            one["pixel_values"] = pv[b : b + 1]
            one["pixel_position_ids"] = batch["pixel_position_ids"][b : b + 1]
            one["image_ids"] = [ids[b]] if b < len(ids) else []
            yield one


def image_error_maps_batch(
    qmodel,
    batch: Mapping,
    image_id: str = "",
    path: str | None = None,
    progress: Progress | None = None,
    cancel=None,
) -> ImageErrorMaps:
    """Per-row error maps of one image (a preprocessor batch of one) on a calibrated wrapped model."""
    Mode = _mode_enum()
    if int(batch["pixel_values"].shape[0]) != 1:
        raise ValueError(f"image_error_maps_batch takes one image, got a batch of {int(batch['pixel_values'].shape[0])}")
    if not image_id:
        ids = list(batch.get("image_ids") or [])
        image_id = ids[0] if ids else (Path(path).name if path else "image")
    t0 = time.perf_counter()
    device = _model_device(qmodel)
    inputs, _ = _model_inputs(batch, device)
    layout = patch_layout(qmodel, inputs["pixel_position_ids"])
    image = layout.image(inputs["pixel_values"][0])
    outputs = module_output_observers(qmodel)
    wanted = {obs.name for _, _, obs in outputs}
    store: dict[str, torch.Tensor] = {}
    stats: dict[str, tuple[np.ndarray, np.ndarray, float, float, str]] = {}
    phase = ["off"]

    def hook(obs, y):
        name = obs.name
        if phase[0] == "off" or name not in wanted:
            return
        if _cancelled(cancel):
            _raise_cancelled("Error heatmap")
        if phase[0] == "fp":
            if name not in store:  # each output observer sees one tensor per image
                store[name] = y.detach()
            return
        fp = store.pop(name, None)
        if fp is None or fp.shape != y.shape:
            return
        fp_r, q_r = _rows_view(fp), _rows_view(y.detach())
        level = layout.level_of(int(fp_r.shape[0])) if fp_r.dim() >= 1 else None
        if level is None:
            return
        rel, sq, ff, dd = _row_stats(fp_r, q_r)
        stats[name] = (rel, sq, ff, dd, level)

    total = 2
    try:
        if _cancelled(cancel):
            _raise_cancelled("Error heatmap")
        _enter_quant(qmodel, Mode)
        with torch.no_grad(), FqTap(qmodel, hook):
            phase[0] = "fp"
            qmodel.set_keep_float(ALL_FLOAT)
            fp_out = _final_output(qmodel(**inputs, static=True)).detach()
            if progress is not None:
                progress(1, total, f"{image_id}: float pass")
            if _cancelled(cancel):
                _raise_cancelled("Error heatmap")
            phase[0] = "q"
            qmodel.set_keep_float([])
            q_out = _final_output(qmodel(**inputs, static=True)).detach()
            phase[0] = "off"
            store.clear()
    finally:
        phase[0] = "off"
        store.clear()
        qmodel.set_keep_float([])
    maps = ImageErrorMaps(image_id=image_id, path=None if path is None else str(path), layout=layout, image=image)
    for name, _kind, obs in outputs:
        if obs.name in stats:
            maps._add(name, *stats[obs.name])
    maps._add_final(fp_out, q_out)
    del fp_out, q_out
    maps.seconds = time.perf_counter() - t0
    if progress is not None:
        progress(total, total, f"{image_id}: quantized pass")
    return maps


def _session_batch(session, image) -> tuple[dict, str, str]:
    """One image (path or ImageEntry) validated through the session: (batch, image id, path)."""
    from core.errors import BadImageError

    path = getattr(image, "path", image)
    probe = session.probe_images([path])
    if not probe.accepted:
        reason = probe.rejected[0].reason if probe.rejected else "not a usable image"
        raise BadImageError(path, reason)
    entry = probe.accepted[0]
    batch = dict(session.preprocessor([entry.path]))
    batch["image_ids"] = [entry.image_id or Path(entry.path).name]
    return batch, batch["image_ids"][0], str(entry.path)


def image_error_maps(session, image, progress: Progress | None = None, cancel=None) -> ImageErrorMaps:
    """Per-patch / per-token error maps of every module for one image (a path or an ImageEntry)."""
    session.require_calibrated()
    if _cancelled(cancel):
        _raise_cancelled("Error heatmap")
    batch, image_id, path = _session_batch(session, image)
    return image_error_maps_batch(session.qmodel, batch, image_id=image_id, path=path, progress=progress, cancel=cancel)


# ---------------------------------------------------------------------------------------------
# First-divergence locator
# ---------------------------------------------------------------------------------------------


@dataclass
class DivergenceEntry:
    """How much error one unit inherits, adds and passes on (SQNRs in dB, streamed over images)."""

    name: str
    kind: str
    input_sqnr_db: float
    output_sqnr_db: float
    local_sqnr_db: float
    jump_db: float
    local_mse: float
    cumulative_mse: float
    adds_error: bool = False  # its own quantization (on float input) is well below what it inherits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inf becomes null (an SQNR of null means no error at all)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "input_sqnr_db": _json_float(self.input_sqnr_db),
            "output_sqnr_db": _json_float(self.output_sqnr_db),
            "local_sqnr_db": _json_float(self.local_sqnr_db),
            "jump_db": _json_float(self.jump_db),
            "local_mse": _json_float(self.local_mse),
            "cumulative_mse": _json_float(self.cumulative_mse),
            "adds_error": self.adds_error,
        }


def _adds(local: float, inp: float, ref: float) -> bool:
    if math.isnan(local) or math.isnan(inp) or local == math.inf:
        return False
    return local <= min(inp, ref) - ADDS_MARGIN_DB


@dataclass
class DivergenceResult:
    """Every unit in forward order and the one where the error first jumps."""

    unit: str
    entries: list[DivergenceEntry]
    located: DivergenceEntry | None
    images: list[str]
    seconds: float = 0.0
    reference_db: float = math.inf  # input SQNRs above this count as clean (median local SQNR)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "unit": self.unit,
            "reference_db": _json_float(self.reference_db),
            "located": self.located.to_dict() if self.located else None,
            "summary": self.summary_line(),
            "images": list(self.images),
            "entries": [e.to_dict() for e in self.entries],
            "seconds": self.seconds,
        }

    def summary_line(self) -> str:
        """One line naming the located unit, its loss in numbers that add up, and whether it adds or amplifies."""
        e = self.located
        if e is None:
            return "first divergence: none (no unit loses SQNR)"
        if e.jump_db == math.inf or (math.isinf(e.output_sqnr_db) and e.output_sqnr_db > 0):
            return f"first divergence: none (no quantization error reaches {e.name})"
        # The loss is printed as the difference of the two numbers printed beside it, so that a
        # reader's subtraction agrees with it (it differs from jump_db by rounding, under 0.1 dB).
        out = round(e.output_sqnr_db, 1)
        if e.input_sqnr_db > self.reference_db:  # a clean input: the jump starts at the reference
            start = round(self.reference_db, 1)
            inp = "carries no error" if math.isinf(e.input_sqnr_db) else f"at {_db(e.input_sqnr_db)} dB, is cleaner"
            src = (f"the {start:.1f} dB reference (its input {inp} than the reference, the median SQNR a unit keeps "
                   f"when it alone is quantized, so it counts as {start:.1f} dB)")
        else:
            start = round(e.input_sqnr_db, 1)
            src = f"{start:.1f} dB at its input"
        how = "adds the error itself" if e.adds_error else "amplifies inherited error"
        return (f"first divergence: {e.name} loses {start - out:.1f} dB SQNR, from {src} to {out:.1f} dB at its "
                f"output; it {how} ({_db(e.local_sqnr_db)} dB SQNR when run alone on float input)")


def _db(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.1f}"


@dataclass
class _Unit:
    name: str
    kind: str
    module: Any  # wrapper (None for "model")
    method: str  # "forward" | "forward_static" | "" for "model"
    orig: Any = None
    calls: int = 0
    fp_in: torch.Tensor | None = None
    fp_out: torch.Tensor | None = None
    q_rest: tuple | None = None  # (args[1:], kwargs) of the quantized call: constants as quantized
    sums: dict[str, list[float]] = field(default_factory=lambda: {k: [0.0, 0.0, 0] for k in ("in", "out", "local")})

    def add(self, which: str, fp: torch.Tensor, q: torch.Tensor) -> None:
        fp = fp.detach().reshape(-1).float()
        q = q.detach().reshape(-1).float()
        if fp.shape != q.shape:
            raise RuntimeError(f"{self.name}: float {which} has {fp.numel()} values, quantized {q.numel()}")
        d = q - fp
        s = self.sums[which]
        s[0] += float(torch.dot(fp, fp))
        s[1] += float(torch.dot(d, d))
        s[2] += int(fp.numel())

    def sqnr(self, which: str) -> float:
        ff, dd, n = self.sums[which]
        return _sqnr(ff, dd) if n else math.nan

    def mse(self, which: str) -> float:
        ff, dd, n = self.sums[which]
        return dd / n if n else math.nan


def _is_leaf(wrapper) -> bool:
    from core.wrappers.base import QuantModule

    return not any(isinstance(m, QuantModule) for m in wrapper.modules() if m is not wrapper)


def divergence_units(qmodel, unit: str = "layer") -> list[tuple[str, str]]:
    """(name, kind) of the units the locator walks, in forward order."""
    return [(u.name, u.kind) for u in _units(qmodel, unit)]


def _units(qmodel, unit: str) -> list[_Unit]:
    if unit not in UNITS:
        from core.errors import ConfigError

        raise ConfigError(f"unknown divergence unit {unit!r}; use 'layer' or 'module'")
    units: list[_Unit] = []
    if unit == "layer":
        pe = qmodel.patch_embedder
        units.append(_Unit(pe.module_name, _wrapper_kind(pe), pe, "forward_static"))
        for layer in qmodel.encoder.layers:
            units.append(_Unit(layer.module_name, _wrapper_kind(layer), layer, "forward"))
        pool = qmodel.pooler
        units.append(_Unit(pool.module_name, _wrapper_kind(pool), pool, "forward_static"))
    else:
        for name, w in qmodel.wrappers():
            if getattr(w, "obs_output", None) is None or not _is_leaf(w):
                continue
            method = "forward_static" if hasattr(type(w), "forward_static") else "forward"
            units.append(_Unit(name, _wrapper_kind(w), w, method))
    units.append(_Unit(MODEL, "model", None, ""))
    return units


def _standardize(qmodel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's last step (as QuantVisionModel.forward_static does it) on a pooler output."""
    hidden = hidden.reshape(hidden.shape[-2], hidden.shape[-1])
    if getattr(qmodel, "standardize", False):
        bias = qmodel.fq_weight(qmodel.source.std_bias.float(), qmodel.obs_std_bias, None)
        scale = qmodel.fq_weight(qmodel.source.std_scale.float(), qmodel.obs_std_scale, None)
        hidden = qmodel.fq(hidden - bias, qmodel.obs_centered)
        hidden = qmodel.fq(hidden * scale, qmodel.obs_output)
    return hidden


class _UnitTap:
    """Wraps each unit's entry method (``forward`` or, on the static path, ``forward_static``).

    The static path calls the patch embedder's and pooler's ``forward_static`` directly (module
    hooks never fire there) and each layer and leaf through ``__call__`` -> ``forward``; an
    instance attribute shadows the class method in both cases. FP phase: the unit's activation
    input (first argument) and output are kept; quantized phase: both are compared with their FP
    twins as they are produced, and the remaining arguments (RoPE tables as the quantized model
    sees them, pooling matrix, position rows) are kept for the unit's local run.
    """

    def __init__(self, units: list[_Unit], cancel=None):
        self.units = [u for u in units if u.module is not None]
        self.phase = "off"
        self.cancel = cancel

    def __enter__(self):
        for u in self.units:
            if u.method in u.module.__dict__:
                raise RuntimeError(f"{u.name}.{u.method} is already patched")
            u.orig = getattr(u.module, u.method)
            setattr(u.module, u.method, self._wrap(u))
        return self

    def __exit__(self, *exc):
        for u in self.units:
            u.module.__dict__.pop(u.method, None)
            u.fp_in = u.fp_out = u.q_rest = None

    def _wrap(self, u: _Unit):
        orig = u.orig

        def run(*args, **kwargs):
            phase = self.phase
            if phase == "off":
                return orig(*args, **kwargs)
            if _cancelled(self.cancel):
                _raise_cancelled("Divergence search")
            x = args[0]
            if phase == "fp":
                u.calls += 1
                u.fp_in = x.detach()
                out = orig(*args, **kwargs)
                u.fp_out = _first_tensor(out).detach()
                return out
            if u.fp_in is not None:
                u.add("in", u.fp_in, x)
            u.q_rest = (args[1:], dict(kwargs))
            out = orig(*args, **kwargs)
            if u.fp_out is not None:
                u.add("out", u.fp_out, _first_tensor(out))
            return out

        return run


def _final_maps(qmodel, inputs, image_id: str, fp: torch.Tensor, q: torch.Tensor) -> ImageErrorMaps:
    """An ImageErrorMaps holding only the final output's map (from tensors already computed)."""
    layout = patch_layout(qmodel, inputs["pixel_position_ids"])
    maps = ImageErrorMaps(image_id=image_id, path=None, layout=layout, image=layout.image(inputs["pixel_values"][0]))
    maps._add_final(fp, q)
    return maps


def _run_alone(qmodel, units: list[_Unit], model_u: _Unit, cancel) -> None:
    """Run each unit quantized on its FP input; compare with its FP output ("local" error)."""
    ctx = qmodel.ctx
    previous = ctx.static
    # On the static path, as in forward_static: RMSNorm switches to its quantized static maths.
    ctx.static = True
    try:
        for u in units:
            if _cancelled(cancel):
                _raise_cancelled("Divergence search")
            if u is model_u:
                if u.fp_in is not None:
                    u.add("local", u.fp_out, _standardize(qmodel, u.fp_in))
                continue
            if not u.calls or u.fp_in is None:
                continue
            rest_args, rest_kwargs = u.q_rest or ((), {})
            out = _first_tensor(u.orig(u.fp_in, *rest_args, **rest_kwargs))
            u.add("local", u.fp_out, out)
            del out
            # Free this image's tensors as we go (the model unit holds the pooler output).
            u.fp_in = u.fp_out = u.q_rest = None
    finally:
        ctx.static = previous


def locate_divergence_batches(
    qmodel,
    batches: Iterable[Mapping],
    unit: str = "layer",
    progress: Progress | None = None,
    cancel=None,
    total: int | None = None,
    keep_float: Sequence[str] | None = None,
    on_image: Callable[[ImageErrorMaps], None] | None = None,
) -> DivergenceResult:
    """First-divergence search over preprocessor batches (streamed, one image at a time).

    ``keep_float``: extra modules kept float in the quantized runs (a what-if). ``on_image``:
    called once per image with an ImageErrorMaps of the final output only, built from the two
    passes the search runs anyway (a report's heatmaps at no extra forward).
    """
    Mode = _mode_enum()
    keep = list(keep_float or [])
    units = _units(qmodel, unit)
    by_name = {u.name: u for u in units}
    model_u = by_name[MODEL]
    pooler_name = qmodel.pooler.module_name
    t0 = time.perf_counter()
    device = _model_device(qmodel)
    images: list[str] = []
    steps_per_image = 3
    done = 0
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps_per_image * (total or len(images)), msg)

    try:
        if _cancelled(cancel):
            _raise_cancelled("Divergence search")
        _enter_quant(qmodel, Mode)
        with torch.no_grad(), _UnitTap(units, cancel) as tap:
            # The pooler's output is the "model" unit's input; in layer mode the pooler is a unit
            # already, in module mode it is a leaf: either way its tap records that tensor.
            pooler_u = next((u for u in tap.units if u.module is qmodel.pooler), None)
            if pooler_u is None:
                raise RuntimeError(f"{pooler_name}: no unit taps the pooler")
            for batch in _single_image_batches(batches):
                if _cancelled(cancel):
                    _raise_cancelled("Divergence search")
                inputs, ids = _model_inputs(batch, device)
                image_id = ids[0] if ids else f"image {len(images) + 1}"
                for u in tap.units:
                    u.calls = 0
                # 1. float reference
                tap.phase = "fp"
                qmodel.set_keep_float(ALL_FLOAT)
                fp_final = _final_output(qmodel(**inputs, static=True)).detach()
                tap.phase = "off"
                for u in tap.units:
                    if u.calls > 1:
                        raise RuntimeError(f"{u.name} ran {u.calls} times for one image; the locator expects one")
                model_u.fp_in, model_u.fp_out = pooler_u.fp_out, fp_final
                tick(f"{image_id}: float pass")
                if _cancelled(cancel):
                    _raise_cancelled("Divergence search")
                # 2. full quantized run: cumulative error at every unit's input and output
                tap.phase = "q"
                qmodel.set_keep_float(keep)
                q_final = _final_output(qmodel(**inputs, static=True)).detach()
                tap.phase = "off"
                model_u.add("out", fp_final, q_final)
                if on_image is not None:
                    on_image(_final_maps(qmodel, inputs, image_id, fp_final, q_final))
                del q_final
                tick(f"{image_id}: quantized pass")
                # 3. every unit alone, quantized, on its float input
                _run_alone(qmodel, units, model_u, cancel)
                tick(f"{image_id}: units alone")
                for u in units:
                    u.fp_in = u.fp_out = u.q_rest = None
                del fp_final
                images.append(image_id)
    finally:
        for u in units:
            u.fp_in = u.fp_out = u.q_rest = None
        qmodel.set_keep_float([])
    entries, ref = _entries(units, by_name, pooler_name)
    return DivergenceResult(
        unit=unit,
        entries=entries,
        located=_locate(entries),
        images=images,
        seconds=time.perf_counter() - t0,
        reference_db=ref,
    )


def _entries(units: list[_Unit], by_name: dict[str, _Unit], pooler_name: str) -> tuple[list[DivergenceEntry], float]:
    entries = []
    for u in units:
        if u.name == MODEL:
            # Its input is the pooler's output (a unit in both modes: the pooler is a leaf).
            inp = by_name[pooler_name].sqnr("out") if pooler_name in by_name else math.nan
        else:
            if not u.sums["out"][2]:
                continue  # never ran on the static path
            inp = u.sqnr("in")
        out = u.sqnr("out")
        entries.append(
            DivergenceEntry(
                name=u.name,
                kind=u.kind,
                input_sqnr_db=inp,
                output_sqnr_db=out,
                local_sqnr_db=u.sqnr("local"),
                jump_db=math.nan,
                local_mse=u.mse("local"),
                cumulative_mse=u.mse("out"),
            )
        )
    local = [e.local_sqnr_db for e in entries if not math.isnan(e.local_sqnr_db)]
    ref = float(np.median(local)) if local else math.inf
    for e in entries:
        e.jump_db = _jump(e.input_sqnr_db, e.output_sqnr_db, ref)
        e.adds_error = _adds(e.local_sqnr_db, e.input_sqnr_db, ref)
    return entries, ref


def _jump(inp: float, out: float, ref: float) -> float:
    if math.isnan(inp) or math.isnan(out):
        return math.nan
    # A clean input (or one cleaner than a typical unit keeps): measure from the reference.
    inp = min(inp, ref)
    if out == math.inf:
        return 0.0 if inp == math.inf else -math.inf
    return inp - out


def _locate(entries: list[DivergenceEntry]) -> DivergenceEntry | None:
    finite = [e for e in entries if not math.isnan(e.jump_db)]
    if not finite:
        return None
    best = max(e.jump_db for e in finite)
    if best == -math.inf:
        return None
    for e in finite:  # forward order: the earliest unit within TIE_DB of the largest jump
        if e.jump_db >= best - TIE_DB:
            return e
    return None


def locate_divergence(
    session,
    images=None,
    unit: str = "layer",
    progress: Progress | None = None,
    cancel=None,
    keep_float: Sequence[str] | None = None,
    on_image: Callable[[ImageErrorMaps], None] | None = None,
) -> DivergenceResult:
    """First-divergence search on a calibrated session's images (default: its usable image set)."""
    session.require_calibrated()
    if _cancelled(cancel):
        _raise_cancelled("Divergence search")
    entries = session.entries_for(images)
    from core.data.device import batches_to_device

    callback = None
    if on_image is not None:
        seen = [0]

        def callback(maps: ImageErrorMaps) -> None:
            maps.path = str(entries[seen[0]].path)  # batches of one, in entry order
            seen[0] += 1
            on_image(maps)

    return locate_divergence_batches(
        session.qmodel,
        batches_to_device(session.batches(entries), session.device),
        unit=unit,
        progress=progress,
        cancel=cancel,
        total=len(entries),
        keep_float=keep_float,
        on_image=callback,
    )
