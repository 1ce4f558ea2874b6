"""The observer table: one ObserverRecord per observer (range, qparams, provenance, histogram, outlier flag).

The outlier flag is defined with ``core.analysis.metrics.outlier_ratio``.
"""

from __future__ import annotations

import numpy as np
import torch

from core.analysis.metrics import OUTLIER_RATIO_THRESHOLD, outlier_ratio
from core.analysis.records import ObserverRecord
from core.quant.observers import LOCATION_FIELDS

__all__ = ["observer_table"]


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
