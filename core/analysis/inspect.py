"""Inspection analytics: observer ranges, FP-vs-quantized error per module, what-if and sensitivity.

Everything here is Qt-free and streaming: the error of a module over many images is kept as
running sums (float64), running extrema and a bounded, seeded reservoir sample of (fp, q)
pairs, so memory does not grow with the number of images or patches beyond the samples kept.

Metric definitions (``fp`` = float output, ``q`` = fake-quantized output, both flattened over
every valid value seen; padding rows are excluded):

- PEIR  = max|fp - q| / (max fp - min fp)   (peak error to interval ratio)
- SQNR  = 10 * log10(sum fp^2 / sum (fp - q)^2)  in dB; +inf when there is no error
- MSE   = sum (fp - q)^2 / n
- max abs = max|fp - q|
- cosine = sum(fp * q) / sqrt(sum fp^2 * sum q^2)
- clipped fraction = share of fp values outside the output observer's representable range
  [(qmin - zero_point) * scale, (qmax - zero_point) * scale] by more than half a step
  (closer values round onto the edge code like any other value)

Outlier flag on an observer: ``outlier_ratio = max|value| / p``, where ``p`` is the 99.99th
percentile of ``|value|`` estimated from the observer's fixed-bin histogram (bin upper bound,
so it never underestimates). ``outlier = outlier_ratio > OUTLIER_RATIO_THRESHOLD`` (4.0): the
range is then at least 4x wider than 99.99 % of the values need, i.e. an 8-bit grid spends two
of its bits on at most 0.01 % of the values.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.quant.observers import LOCATION_FIELDS

SAMPLE_SIZE = 4096
OUTLIER_PERCENTILE = 99.99
OUTLIER_RATIO_THRESHOLD = 4.0
END_TO_END = "end_to_end"

Progress = Callable[[int, int, str], None]

__all__ = [
    "SAMPLE_SIZE",
    "OUTLIER_PERCENTILE",
    "OUTLIER_RATIO_THRESHOLD",
    "END_TO_END",
    "ModuleError",
    "CompareResult",
    "ObserverRecord",
    "SensitivityEntry",
    "ReservoirSample",
    "ErrorAccumulator",
    "peir",
    "sqnr_db",
    "mse",
    "max_abs",
    "cosine",
    "clipped_fraction",
    "outlier_ratio",
    "observer_table",
    "compare",
    "sensitivity",
    "sensitivity_units",
    "module_output_observers",
    "clip_bounds",
]


# ---------------------------------------------------------------------------------------------
# Metric functions on whole tensors (reference definitions; the accumulator streams the same)
# ---------------------------------------------------------------------------------------------


def _flat64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.detach().reshape(-1).to(torch.float64)


def peir(fp, q) -> float:
    """Peak error to interval ratio: max|fp - q| / (max fp - min fp)."""
    a, b = _flat64(fp), _flat64(q)
    span = float(a.max() - a.min()) if a.numel() else 0.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    return _ratio(err, span)


def sqnr_db(fp, q) -> float:
    """Signal to quantization noise ratio in dB; +inf when fp == q."""
    a, b = _flat64(fp), _flat64(q)
    return _sqnr(float((a * a).sum()), float(((a - b) ** 2).sum()))


def mse(fp, q) -> float:
    """Mean squared error between fp and q."""
    a, b = _flat64(fp), _flat64(q)
    return float(((a - b) ** 2).mean()) if a.numel() else 0.0


def max_abs(fp, q) -> float:
    """Largest absolute difference between fp and q."""
    a, b = _flat64(fp), _flat64(q)
    return float((a - b).abs().max()) if a.numel() else 0.0


def cosine(fp, q) -> float:
    """Cosine similarity of fp and q taken as flat vectors."""
    a, b = _flat64(fp), _flat64(q)
    return _cosine(float((a * b).sum()), float((a * a).sum()), float((b * b).sum()))


def clipped_fraction(fp, lo: float | None, hi: float | None) -> float:
    """Share of fp values outside [lo, hi] (0 when no range is known)."""
    a = _flat64(fp)
    if lo is None or hi is None or a.numel() == 0:
        return 0.0
    return float(((a < lo) | (a > hi)).sum()) / a.numel()


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(dot: float, ff: float, qq: float) -> float:
    if ff <= 0 and qq <= 0:
        return 1.0
    if ff <= 0 or qq <= 0:
        return 0.0
    return dot / math.sqrt(ff * qq)


# ---------------------------------------------------------------------------------------------
# Streaming accumulation
# ---------------------------------------------------------------------------------------------


def _stable_seed(name: str, seed: int) -> int:
    # zlib.crc32, not hash(): the sample must be the same in every process (PYTHONHASHSEED).
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


class ReservoirSample:
    """Bounded uniform sample of (fp, q) pairs over a stream, seeded and reproducible.

    Bottom-k sampling: every value gets a uniform key and the k smallest keys are kept, which
    is a uniform k-subset of everything seen. Keys are only drawn for the values that can still
    enter the sample (those whose key falls under a threshold ``tau``; their number is
    Binomial(n, tau) and their keys are uniform on [0, tau)), so an update costs O(k), not O(n).
    """

    def __init__(self, size: int = SAMPLE_SIZE, seed: int = 0):
        self.size = int(size)
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0, dtype=np.float64)
        self._fp = np.empty(0, dtype=np.float32)
        self._q = np.empty(0, dtype=np.float32)

    def update(self, fp: torch.Tensor, q: torch.Tensor) -> None:
        """Offer every value of the flat tensors fp and q (same length) to the sample."""
        n = int(fp.numel())
        k = self.size
        if n == 0 or k == 0:
            return
        full = self._keys.size >= k
        tau_res = float(self._keys[-1]) if full else 1.0
        # Oversample 4x so the bottom-k of the candidates is the bottom-k of all n almost surely.
        tau = min(tau_res, 4.0 * k / n)
        for attempt in (0, 1):
            if attempt == 1:
                tau = tau_res
            if tau >= 1.0:
                idx = np.arange(n)
                keys = self._rng.random(n)
            else:
                m = int(self._rng.binomial(n, tau))
                idx = np.sort(self._rng.choice(n, size=m, replace=False)) if m else np.empty(0, np.int64)
                keys = tau * self._rng.random(m)
            below = int((self._keys < tau).sum()) + keys.size
            # The candidates are exact when at least k keys lie under tau (or tau is the old cut).
            if below >= k or tau >= tau_res:
                break
        if idx.size == 0:
            return
        t_idx = torch.from_numpy(idx.astype(np.int64)).to(fp.device)
        new_fp = fp.reshape(-1)[t_idx].float().cpu().numpy()
        new_q = q.reshape(-1)[t_idx].float().cpu().numpy()
        keys = np.concatenate([self._keys, keys])
        vals_fp = np.concatenate([self._fp, new_fp])
        vals_q = np.concatenate([self._q, new_q])
        order = np.argsort(keys, kind="stable")[:k]
        self._keys, self._fp, self._q = keys[order], vals_fp[order], vals_q[order]

    @property
    def fp(self) -> np.ndarray:
        """The sampled FP values."""
        return self._fp.copy()

    @property
    def q(self) -> np.ndarray:
        """The quantized values paired with them."""
        return self._q.copy()

    def __len__(self) -> int:
        return int(self._keys.size)


@contextlib.contextmanager
def _one_thread(t: torch.Tensor):
    """Run the metric reductions on one CPU thread.

    They are memory-bound passes, so a second thread buys little, while every parallel region
    costs an OpenMP barrier: on a busy machine a barrier waits for a scheduler slice, and
    measured here one update took 100 ms on two threads against 2 ms on one.
    """
    if t.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ErrorAccumulator:
    """Running FP-vs-quantized error statistics of one module over many tensors."""

    def __init__(
        self,
        name: str,
        kind: str = "",
        clip_range: tuple[float, float] | None = None,
        sample_size: int = SAMPLE_SIZE,
        seed: int = 0,
    ):
        self.name = name
        self.kind = kind
        self.clip_range = clip_range
        self.n = 0
        self.sum_ff = 0.0
        self.sum_qq = 0.0
        self.sum_fq = 0.0
        self.sum_dd = 0.0
        self.max_abs = 0.0
        self.fp_min = math.inf
        self.fp_max = -math.inf
        self.clipped = 0
        self.sample = ReservoirSample(sample_size, _stable_seed(name, seed))

    def update(self, fp: torch.Tensor, q: torch.Tensor) -> None:
        """Add one pair of same-shaped tensors (any shape) to the statistics."""
        with _one_thread(fp):
            self._update(fp, q)

    def _update(self, fp: torch.Tensor, q: torch.Tensor) -> None:
        fp = fp.detach().reshape(-1)
        q = q.detach().reshape(-1)
        if fp.shape != q.shape:
            raise ValueError(f"{self.name}: FP output has {fp.numel()} values, quantized {q.numel()}")
        if fp.numel() == 0:
            return
        if fp.dtype != torch.float32:
            fp = fp.float()
        if q.dtype != torch.float32:
            q = q.float()
        d = q - fp
        # BLAS dot products: one pass each, no temporaries; summed across calls in float64.
        self.sum_ff += float(torch.dot(fp, fp))
        self.sum_qq += float(torch.dot(q, q))
        self.sum_fq += float(torch.dot(fp, q))
        self.sum_dd += float(torch.dot(d, d))
        dmin, dmax = torch.aminmax(d)
        self.max_abs = max(self.max_abs, float(dmax), -float(dmin))
        fmin, fmax = torch.aminmax(fp)
        self.fp_min = min(self.fp_min, float(fmin))
        self.fp_max = max(self.fp_max, float(fmax))
        if self.clip_range is not None:
            lo, hi = self.clip_range
            if float(fmin) < lo or float(fmax) > hi:  # most tensors fit: skip the counting pass
                self.clipped += int(torch.count_nonzero(fp < lo)) + int(torch.count_nonzero(fp > hi))
        self.n += int(fp.numel())
        self.sample.update(fp, q)

    def result(self) -> ModuleError:
        """Freeze the statistics into a ModuleError."""
        span = self.fp_max - self.fp_min if self.n else 0.0
        return ModuleError(
            name=self.name,
            kind=self.kind,
            peir=_ratio(self.max_abs, span),
            sqnr_db=_sqnr(self.sum_ff, self.sum_dd),
            mse=self.sum_dd / self.n if self.n else 0.0,
            max_abs=self.max_abs,
            cosine=_cosine(self.sum_fq, self.sum_ff, self.sum_qq),
            clipped_fraction=self.clipped / self.n if self.n else 0.0,
            samples_fp=self.sample.fp,
            samples_q=self.sample.q,
            num_values=self.n,
            fp_min=self.fp_min if self.n else 0.0,
            fp_max=self.fp_max if self.n else 0.0,
        )


# ---------------------------------------------------------------------------------------------
# Result objects
# ---------------------------------------------------------------------------------------------


def _json_float(x: float) -> float | None:
    """JSON has no inf/nan: they become null (an SQNR of null means no error at all)."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class ModuleError:
    """FP-vs-quantized error of one module (or of the whole model: name END_TO_END)."""

    name: str
    kind: str
    peir: float
    sqnr_db: float
    mse: float
    max_abs: float
    cosine: float
    clipped_fraction: float
    samples_fp: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.float32))
    samples_q: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.float32))
    num_values: int = 0
    fp_min: float = 0.0
    fp_max: float = 0.0

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict; inf/nan become null; samples only on request."""
        d = {
            "name": self.name,
            "kind": self.kind,
            "peir": _json_float(self.peir),
            "sqnr_db": _json_float(self.sqnr_db),
            "mse": _json_float(self.mse),
            "max_abs": _json_float(self.max_abs),
            "cosine": _json_float(self.cosine),
            "clipped_fraction": _json_float(self.clipped_fraction),
            "num_values": self.num_values,
            "fp_min": _json_float(self.fp_min),
            "fp_max": _json_float(self.fp_max),
            "num_samples": int(self.samples_fp.size),
        }
        if samples:
            d["samples_fp"] = [float(v) for v in self.samples_fp]
            d["samples_q"] = [float(v) for v in self.samples_q]
        return d


@dataclass
class CompareResult:
    """Per-module errors in forward order plus the end-to-end error of the final output."""

    modules: list[ModuleError]
    end_to_end: ModuleError
    images: list[str]
    keep_float: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def worst(self, n: int = 10, key: str = "sqnr_db") -> list[ModuleError]:
        """The n modules with the lowest SQNR (or highest PEIR when key='peir')."""
        if key == "peir":
            return sorted(self.modules, key=lambda m: -m.peir)[:n]
        return sorted(self.modules, key=lambda m: m.sqnr_db)[:n]

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "images": list(self.images),
            "keep_float": list(self.keep_float),
            "end_to_end": self.end_to_end.to_dict(samples),
            "modules": [m.to_dict(samples) for m in self.modules],
        }


@dataclass
class ObserverRecord:
    """One observer's range, quantization parameters, provenance and histogram."""

    name: str
    module: str
    kind: str
    dtype: str
    scheme: str
    min: float | np.ndarray
    max: float | np.ndarray
    scale: float | np.ndarray | None
    zero_point: int | np.ndarray | None
    per_channel: bool
    min_source: str | list[str] | None
    max_source: str | list[str] | None
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    outlier: bool
    outlier_ratio: float
    enabled: bool
    role: str = ""
    observer_kind: str = ""
    num_seen: int = 0
    has_stats: bool = True
    # Where the extreme sat in its source image's tensor (per-tensor observers; None otherwise):
    # flat index (C order) and the tensor's shape; *_tied: a later image reached the same value.
    min_index: int | None = None
    max_index: int | None = None
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    min_tied: bool = False
    max_tied: bool = False

    @property
    def range_min(self) -> float:
        """Per-tensor min, or the smallest channel min."""
        return float(np.min(self.min)) if np.size(self.min) else 0.0

    @property
    def range_max(self) -> float:
        """Per-tensor max, or the largest channel max."""
        return float(np.max(self.max)) if np.size(self.max) else 0.0

    def to_dict(self, histogram: bool = False) -> dict[str, Any]:
        """JSON-ready dict; per-channel arrays are summarised (and listed in full)."""

        def arr(x):
            if x is None:
                return None
            a = np.asarray(x)
            if a.ndim == 0:
                v = a.item()
                return _json_float(v) if isinstance(v, float) else v
            return [(_json_float(v) if isinstance(v, float) else v) for v in a.tolist()]

        d = {
            "name": self.name,
            "module": self.module,
            "role": self.role,
            "kind": self.kind,
            "dtype": self.dtype,
            "scheme": self.scheme,
            "observer": self.observer_kind,
            "per_channel": self.per_channel,
            "enabled": self.enabled,
            "has_stats": self.has_stats,
            "num_seen": self.num_seen,
            "min": _json_float(self.range_min),
            "max": _json_float(self.range_max),
            "min_source": self.min_source,
            "max_source": self.max_source,
            **{f: list(v) if isinstance(v := getattr(self, f), tuple) else v for f in LOCATION_FIELDS},
            "outlier": self.outlier,
            "outlier_ratio": _json_float(self.outlier_ratio),
        }
        if self.per_channel:
            d["channels"] = int(np.size(self.min))
            d["scale"] = _summary(self.scale)
            d["zero_point"] = _summary(self.zero_point)
            d["channel_min"] = arr(self.min)
            d["channel_max"] = arr(self.max)
            d["channel_scale"] = arr(self.scale)
            d["channel_zero_point"] = arr(self.zero_point)
        else:
            d["scale"] = arr(self.scale)
            d["zero_point"] = arr(self.zero_point)
        if histogram:
            d["hist_counts"] = [int(c) for c in np.asarray(self.hist_counts).tolist()]
            d["hist_edges"] = [float(e) for e in np.asarray(self.hist_edges).tolist()]
        return d


def _summary(x) -> dict[str, Any] | None:
    if x is None:
        return None
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return None
    return {"min": _json_float(a.min()), "max": _json_float(a.max()), "mean": _json_float(a.mean())}


@dataclass
class SensitivityEntry:
    """End-to-end error with one unit (layer or module kind) kept in float."""

    name: str
    peir: float
    sqnr_db: float
    improvement_db: float
    globs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "globs": list(self.globs),
            "peir": _json_float(self.peir),
            "sqnr_db": _json_float(self.sqnr_db),
            "improvement_db": _json_float(self.improvement_db),
        }


# ---------------------------------------------------------------------------------------------
# Observer table
# ---------------------------------------------------------------------------------------------


def outlier_ratio(counts, edges, vmin: float, vmax: float, percentile: float = OUTLIER_PERCENTILE) -> float:
    """max|value| over the percentile of |value| estimated from a fixed-bin histogram."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    peak = max(abs(float(vmin)), abs(float(vmax)))
    total = counts.sum() if counts.size else 0.0
    if total <= 0 or edges.size != counts.size + 1 or peak == 0:
        return 1.0
    # |x| of a bin is at most the larger |edge|: an upper estimate, so the ratio errs low.
    bound = np.maximum(np.abs(edges[:-1]), np.abs(edges[1:]))
    # A bin straddling 0 holds values down to |x| = 0 but its bound is its larger |edge|.
    order = np.argsort(bound, kind="stable")
    cum = np.cumsum(counts[order])
    pos = int(np.searchsorted(cum, total * percentile / 100.0, side="left"))
    p = float(bound[order][min(pos, order.size - 1)])
    if p <= 0:
        return math.inf
    return max(1.0, peak / p)


def _to_np(x) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _scalar_or_array(x):
    a = _to_np(x)
    if a is None:
        return None
    if a.size == 1:
        v = a.reshape(-1)[0]
        return v.item()
    return a


def _spec_fields(spec) -> tuple[str, str, bool]:
    if spec is None:
        return "float", "", False
    dtype = getattr(spec, "dtype", "float")
    dtype = getattr(dtype, "name", dtype)
    scheme = getattr(spec, "scheme", "")
    scheme = getattr(scheme, "value", scheme)
    return str(dtype), str(scheme), bool(getattr(spec, "per_channel", False))


def _qrange(spec) -> tuple[int, int] | None:
    """(qmin, qmax) of a QuantSpec, from its own fields when it has them."""
    for a, b in (("qmin", "qmax"), ("quant_min", "quant_max")):
        if hasattr(spec, a) and hasattr(spec, b):
            return int(getattr(spec, a)), int(getattr(spec, b))
    dtype = str(getattr(getattr(spec, "dtype", ""), "name", getattr(spec, "dtype", "")))
    m = re.fullmatch(r"(u?)int(\d+)", dtype)
    if not m:
        return None
    bits = int(m.group(2))
    if m.group(1):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _observer_name(obs) -> str:
    return str(getattr(obs, "name", ""))


def observer_table(qmodel) -> list[ObserverRecord]:
    """One ObserverRecord per observer of a wrapped model (or a Session), in forward order."""
    qmodel = getattr(qmodel, "qmodel", qmodel)
    records = []
    for obs in qmodel.observers():
        spec = getattr(obs, "spec", None)
        dtype, scheme, per_channel = _spec_fields(spec)
        has_stats = bool(getattr(obs, "has_stats", True))
        vmin = _scalar_or_array(getattr(obs, "min_val", None)) if has_stats else None
        vmax = _scalar_or_array(getattr(obs, "max_val", None)) if has_stats else None
        vmin = 0.0 if vmin is None else vmin
        vmax = 0.0 if vmax is None else vmax
        counts = np.empty(0, np.int64)
        edges = np.empty(0, np.float64)
        hist = getattr(obs, "histogram", None)
        if has_stats and callable(hist):
            try:
                h = hist()
            except Exception:  # an observer without a histogram still gets a row
                h = None
            if h is not None:
                counts, edges = (_to_np(h[0]), _to_np(h[1]))
        ratio = outlier_ratio(counts, edges, float(np.min(vmin)), float(np.max(vmax))) if counts.size else 1.0
        per_channel = per_channel or np.size(vmin) > 1
        scale = _scalar_or_array(getattr(obs, "scale", None))
        zp = _scalar_or_array(getattr(obs, "zero_point", None))
        if zp is not None and not isinstance(zp, np.ndarray):
            zp = int(zp)
        records.append(
            ObserverRecord(
                name=_observer_name(obs),
                module=str(getattr(obs, "module_name", "")),
                kind=str(getattr(obs, "kind", "activation")),
                dtype=dtype,
                scheme=scheme,
                min=vmin,
                max=vmax,
                scale=scale,
                zero_point=zp,
                per_channel=bool(per_channel),
                min_source=_source(getattr(obs, "min_source", None)),
                max_source=_source(getattr(obs, "max_source", None)),
                hist_counts=counts,
                hist_edges=edges,
                outlier=bool(ratio > OUTLIER_RATIO_THRESHOLD),
                outlier_ratio=float(ratio),
                enabled=bool(getattr(obs, "enabled", True)),
                role=str(getattr(obs, "role", "")),
                observer_kind=str(getattr(obs, "observer_kind", "")),
                num_seen=int(getattr(obs, "num_seen", 0) or 0),
                has_stats=has_stats,
                **({f: getattr(obs, f) for f in LOCATION_FIELDS} if has_stats else {}),
            )
        )
    return records


def _source(x):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [str(v) for v in x]
    return str(x)


# ---------------------------------------------------------------------------------------------
# compare: FP vs quantized (QUANT) outputs of every wrapper, streamed over images
# ---------------------------------------------------------------------------------------------

_KIND_NAMES = {
    "QuantLinear": "linear",
    "QuantClippableLinear": "linear",
    "QuantRMSNorm": "rmsnorm",
    "QuantVisionMLP": "mlp",
    "QuantVisionAttention": "attention",
    "QuantVisionEncoderLayer": "layer",
    "QuantVisionEncoder": "encoder",
    "QuantPatchEmbedder": "patch_embedder",
    "QuantPooler": "pooler",
    "QuantVisionModel": "model",
}


def _mode_enum():
    from core.quant.mode import Mode

    return Mode


def _first_tensor(out) -> torch.Tensor | None:
    """The output tensor of a model call: a tensor, a ModelOutput or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    t = getattr(out, "last_hidden_state", None)
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(out, (tuple, list)):
        for t in out:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t
    return None


def _final_output(out) -> torch.Tensor:
    t = _first_tensor(out)
    if t is None:
        raise TypeError(f"model returned {type(out).__name__}, expected a tensor output")
    return t


def _wrapper_kind(module) -> str:
    cls = type(module).__name__
    return _KIND_NAMES.get(cls, re.sub(r"^Quant", "", cls).lower() or cls)


def module_output_observers(qmodel) -> list[tuple[str, str, Any]]:
    """(wrapper name, kind, observer) for every wrapper, in forward order.

    A wrapper's output is the tensor its ``obs_output`` observer sees; wrappers without one
    (attention, MLP, encoder) end in a child wrapper (o_proj, down_proj, last layer) whose
    output observer sees exactly their output.
    """
    named = list(qmodel.wrappers())
    names = [n for n, _ in named]
    own = {n: getattr(m, "obs_output", None) for n, m in named}

    def resolve(name: str):
        if own.get(name) is not None:
            return own[name]
        pre = name + "."
        inner = [n for n in names if n.startswith(pre)]
        # The container's output is produced by its last outermost child (the last layer, not
        # that layer's last norm).
        outer = [n for n in inner if not any(n.startswith(o + ".") for o in inner if o != n)]
        return resolve(outer[-1]) if outer else None

    out = []
    for name, mod in named:
        obs = resolve(name)
        if obs is None:
            continue
        out.append((name, _wrapper_kind(mod), obs))
    return out


class FqTap:
    """Calls ``hook(observer, output)`` for every tensor a wrapper fake-quantizes (or would).

    Forward hooks cannot be used: the static path (the one QUANT runs) calls ``forward_static``
    of the patch embedder, encoder and pooler directly. Every observed tensor goes through
    ``QuantModule.fq`` on both the float and the quantized pass, so that is where it is tapped.
    """

    def __init__(self, qmodel, hook: Callable[[Any, torch.Tensor], None]):
        self.qmodel = qmodel
        self.hook = hook
        self._patched: list = []

    def __enter__(self):
        for mod in self.qmodel.quant_modules():
            if "fq" in mod.__dict__:
                continue
            mod.fq = self._wrap(mod.fq)
            self._patched.append(mod)
        return self

    def __exit__(self, *exc):
        for mod in self._patched:
            mod.__dict__.pop("fq", None)
        self._patched.clear()

    def _wrap(self, orig):
        hook = self.hook

        def fq(x, obs):
            y = orig(x, obs)
            hook(obs, y)
            return y

        return fq


class _Capture(FqTap):
    """Pairs the tensors chosen observers see on the float and the quantized pass.

    FP pass: the wanted tensors of one image are kept; QUANT pass: each one is paired with its
    FP twin as soon as it is produced, folded into the accumulator and released.
    """

    def __init__(self, qmodel, accs: dict[str, "ErrorAccumulator"]):
        super().__init__(qmodel, self._on_fq)
        self.accs = accs
        self.phase = "off"
        self.store: dict[tuple[str, int], torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.store.clear()

    def start(self, phase: str) -> None:
        """Enter "fp" (store), "q" (pair and accumulate) or "off"."""
        self.phase = phase
        self.calls = {}

    def _on_fq(self, obs, y: torch.Tensor) -> None:
        if self.phase == "off":
            return
        name = obs.name
        acc = self.accs.get(name)
        if acc is None:
            return
        i = self.calls.get(name, 0)
        self.calls[name] = i + 1
        if self.phase == "fp":
            self.store[(name, i)] = y.detach()
        else:
            fp = self.store.pop((name, i), None)
            if fp is not None and fp.shape == y.shape:
                acc.update(fp, y.detach())


def clip_bounds(obs) -> tuple[float, float] | None:
    """Values outside these bounds are clipped by the observer's grid (None: kept float).

    The representable range widened by half a step on each side: a value within half a step
    of the edge rounds onto the edge code like any other value, so it does not count.
    """
    if obs is None or not obs.enabled:
        return None
    lo, hi = obs.representable_range()
    half = 0.5 * float(obs.scale.max())
    return lo - half, hi + half


def _raise_cancelled(what: str):
    from core.errors import CancelledError

    raise CancelledError(f"{what} cancelled by the user; run it again to get results")


def _cancelled(cancel) -> bool:
    return cancel is not None and bool(getattr(cancel, "cancelled", False))


def _model_inputs(batch: Mapping, device) -> tuple[dict, list[str]]:
    ids = list(batch.get("image_ids") or [])
    inputs = {
        "pixel_values": batch["pixel_values"].to(device),
        "pixel_position_ids": batch["pixel_position_ids"].to(device),
    }
    return inputs, ids


def _model_device(qmodel) -> torch.device:
    for p in qmodel.parameters():
        return p.device
    return torch.device("cpu")


ALL_FLOAT = ["*"]


def _fp_forward(qmodel, inputs) -> torch.Tensor:
    # FP reference: QUANT mode with every observer kept float, i.e. the very graph the QUANT pass
    # runs (same wrappers, same fq call sites, folded input projection) without fake-quant.
    # NO_QUANT would take HF's maths in places (the patch embedder's unfolded projection) and
    # skip wrappers the QUANT pass goes through, leaving them without an FP twin.
    qmodel.set_keep_float(ALL_FLOAT)
    return _final_output(qmodel(**inputs, static=True)).detach()


def _q_forward(qmodel, inputs, keep: Sequence[str]) -> torch.Tensor:
    qmodel.set_keep_float(list(keep))
    return _final_output(qmodel(**inputs, static=True)).detach()


def _enter_quant(qmodel, Mode) -> None:
    if qmodel.ctx.mode is not Mode.QUANT:
        qmodel.set_mode(Mode.QUANT)  # freezes qparams; raises NotCalibratedError without stats


def compare(
    qmodel,
    batches: Iterable[Mapping],
    progress: Progress | None = None,
    cancel=None,
    keep_float: Sequence[str] | None = None,
    sample_size: int = SAMPLE_SIZE,
    total: int | None = None,
    seed: int = 0,
) -> CompareResult:
    """FP vs quantized (QUANT) output of every wrapper, streamed over the batches.

    Each image runs twice: once with every observer kept float (the FP reference), once
    quantized. ``compare(session, image_paths)`` is ``session.evaluate(image_paths)``. Each batch is a preprocessor mapping (plus optional "image_ids"). Modules matching
    ``keep_float`` stay float for this comparison only. The model is left in QUANT mode with
    only the config's keep-float modules. Raises core.errors.CancelledError when cancelled.
    """
    if hasattr(qmodel, "evaluate") and hasattr(qmodel, "qmodel"):  # a Session and image paths
        return qmodel.evaluate(images=batches, progress=progress, cancel=cancel, keep_float=keep_float)
    Mode = _mode_enum()
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    keep = list(keep_float or [])
    t0 = time.perf_counter()
    device = _model_device(qmodel)
    try:
        _enter_quant(qmodel, Mode)
        qmodel.set_keep_float(keep)
        outputs = module_output_observers(qmodel)
        accs: dict[str, ErrorAccumulator] = {}
        for name, kind, obs in outputs:
            if obs.name not in accs:
                accs[obs.name] = ErrorAccumulator(obs.name, kind, clip_bounds(obs), sample_size, seed)
        final_clip = clip_bounds(getattr(qmodel, "obs_output", None))
        e2e = ErrorAccumulator(END_TO_END, "model", final_clip, sample_size, seed)
        images: list[str] = []
        done = 0
        with torch.no_grad(), _Capture(qmodel, accs) as cap:
            for batch in batches:
                if _cancelled(cancel):
                    _raise_cancelled("Comparison")
                inputs, ids = _model_inputs(batch, device)
                cap.start("fp")
                fp_out = _fp_forward(qmodel, inputs)
                cap.start("q")
                q_out = _q_forward(qmodel, inputs, keep)
                cap.start("off")
                cap.store.clear()
                e2e.update(fp_out, q_out)
                del fp_out, q_out
                images.extend(ids)
                done += int(inputs["pixel_values"].shape[0])
                if progress is not None:
                    progress(done, total or done, f"compared {done} image(s)")
    finally:
        qmodel.set_keep_float([])
    results = {name: acc.result() for name, acc in accs.items()}
    modules = []
    for name, kind, obs in outputs:
        r = results[obs.name]
        if r.num_values == 0:
            continue
        m = ModuleError(**{**r.__dict__, "name": name, "kind": kind})
        modules.append(m)
    return CompareResult(
        modules=modules,
        end_to_end=e2e.result(),
        images=images,
        keep_float=keep,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# Sensitivity: keep one unit in float at a time, rank by end-to-end SQNR improvement
# ---------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<idx>\d+)(?:\.(?P<rest>.+))?$")


def sensitivity_units(qmodel, unit: str = "layer") -> list[tuple[str, list[str]]]:
    """Units for the sweep: (display name, keep-float globs), in forward order.

    unit="layer": one entry per encoder layer ("encoder.layers.N").
    unit="kind": one entry per module kind across all layers ("encoder.layers.*.mlp.down_proj",
    "encoder.layers.*.self_attn", ...), plus each quantized module outside the layers.
    """
    if unit not in ("layer", "kind"):
        from core.errors import ConfigError

        raise ConfigError(f"unknown sensitivity unit {unit!r}; use 'layer' or 'kind'")
    names = [n for n, _ in qmodel.wrappers()]
    units: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for n in names:
        m = _LAYER_RE.match(n)
        if unit == "layer":
            if not m:
                continue
            key = f"{m.group('prefix')}.{m.group('idx')}"
        else:
            if m:
                if not m.group("rest"):
                    continue  # the whole layer is the "layer" unit, not a kind
                key = f"{m.group('prefix')}.*.{m.group('rest')}"
            else:
                if n in ("", "model") or _is_container(n, names):
                    continue
                key = n
        if key not in seen:
            # PTQConfig.matches: a glob names a module and everything below it.
            seen.add(key)
            units.append((key, [key]))
    return units


def _is_container(name: str, names: Sequence[str]) -> bool:
    """True for wrappers that only hold layers (the encoder): keeping them float = everything."""
    pre = name + "."
    return any(_LAYER_RE.match(n) and n.startswith(pre) for n in names)


def sensitivity(
    qmodel,
    batches: Iterable[Mapping],
    unit: str = "layer",
    progress: Progress | None = None,
    cancel=None,
    total: int | None = None,
) -> tuple[ModuleError, list[SensitivityEntry]]:
    """Baseline end-to-end error, then one entry per unit kept in float, best improvement first.

    The FP output does not depend on what is kept in float, so the FP pass runs once per image
    and only the QUANT pass is repeated per unit. Raises core.errors.CancelledError when
    cancelled; the model is left in QUANT mode with only the config's keep-float modules.
    With `total` (the number of batches) the batches are streamed, not held.
    """
    Mode = _mode_enum()
    if total is None:
        batches = list(batches)
        total = len(batches)
    units = sensitivity_units(qmodel, unit)
    steps = total * (len(units) + 1)
    device = _model_device(qmodel)
    _enter_quant(qmodel, Mode)
    base = ErrorAccumulator(END_TO_END, "model", None, 0)
    accs = [ErrorAccumulator(name, unit, None, 0) for name, _ in units]
    done = 0

    def tick(msg):
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, steps, msg)

    try:
        with torch.no_grad():
            for bi, batch in enumerate(batches):
                if _cancelled(cancel):
                    _raise_cancelled("Sensitivity sweep")
                inputs, _ = _model_inputs(batch, device)
                fp_out = _fp_forward(qmodel, inputs)
                base.update(fp_out, _q_forward(qmodel, inputs, []))
                tick(f"image {bi + 1}/{total}: baseline")
                for (name, globs), acc in zip(units, accs):
                    if _cancelled(cancel):
                        _raise_cancelled("Sensitivity sweep")
                    acc.update(fp_out, _q_forward(qmodel, inputs, globs))
                    tick(f"image {bi + 1}/{total}: {name} in float")
    finally:
        qmodel.set_keep_float([])
    baseline = base.result()
    entries = []
    for (name, globs), acc in zip(units, accs):
        r = acc.result()
        entries.append(
            SensitivityEntry(
                name=name,
                peir=r.peir,
                sqnr_db=r.sqnr_db,
                improvement_db=_improvement(r.sqnr_db, baseline.sqnr_db),
                globs=list(globs),
            )
        )
    entries.sort(key=lambda e: (-_finite_key(e.improvement_db), e.name))
    return baseline, entries


def _improvement(new: float, old: float) -> float:
    if math.isinf(new) and math.isinf(old):
        return 0.0
    return new - old


def _finite_key(x: float) -> float:
    return 1e300 if x == math.inf else (-1e300 if x == -math.inf or math.isnan(x) else x)
