"""Result records of the analysis (per-module error, a comparison, an observer's row, a sensitivity
entry) and their JSON form: inf and nan become null (an SQNR of null means no error at all)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.io import finite_or_none
from core.quant.observers import LOCATION_FIELDS

END_TO_END = "end_to_end"

__all__ = ["END_TO_END", "ModuleError", "CompareResult", "ObserverRecord", "SensitivityEntry"]


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
            "peir": finite_or_none(self.peir),
            "sqnr_db": finite_or_none(self.sqnr_db),
            "mse": finite_or_none(self.mse),
            "max_abs": finite_or_none(self.max_abs),
            "cosine": finite_or_none(self.cosine),
            "clipped_fraction": finite_or_none(self.clipped_fraction),
            "num_values": self.num_values,
            "fp_min": finite_or_none(self.fp_min),
            "fp_max": finite_or_none(self.fp_max),
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
                return finite_or_none(v) if isinstance(v, float) else v
            return [(finite_or_none(v) if isinstance(v, float) else v) for v in a.tolist()]

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
            "min": finite_or_none(self.range_min),
            "max": finite_or_none(self.range_max),
            "min_source": self.min_source,
            "max_source": self.max_source,
            **{f: list(v) if isinstance(v := getattr(self, f), tuple) else v for f in LOCATION_FIELDS},
            "outlier": self.outlier,
            "outlier_ratio": finite_or_none(self.outlier_ratio),
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
    return {"min": finite_or_none(a.min()), "max": finite_or_none(a.max()), "mean": finite_or_none(a.mean())}


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
            "peir": finite_or_none(self.peir),
            "sqnr_db": finite_or_none(self.sqnr_db),
            "improvement_db": finite_or_none(self.improvement_db),
        }
