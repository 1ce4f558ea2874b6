"""Observers: record tensor statistics in CALIB mode and turn them into qparams.

The public ``collect()`` is a template method: it reduces the tensor once and hands the
batch extremes to the subclass's ``_update_stats()``. Statistics live in registered
buffers so they survive ``state_dict``; the image that set the current min and max is
kept beside them (``min_source`` / ``max_source``).

Per-tensor observers also record *where* in that image's tensor the extreme sat:
``min_index`` / ``max_index`` (flat index into the tensor, C order), ``min_shape`` /
``max_shape`` (the tensor's shape) and ``min_value`` / ``max_value`` (the element's value).
The location is looked up only when the extreme actually moves, and from per-row extremes
kept by the reduction itself (``core.quant.extremes``: the same index as argmin / argmax, at
about the cost of one ``aminmax``), so a calibration image costs about a float forward.
Per-channel observers keep only the source (a per-channel range has one extreme per
channel, each from its own image).

Ties: comparisons are strict, so when several images reach exactly the same extreme the
earliest keeps it (source and location); ``min_tied`` / ``max_tied`` then say that a later
image (another source) matched it, as happens for tensors every image shares (RoPE tables,
the pooling matrix) or saturated pixels. Rankings skip tied extremes.

Quantization maths (affine, per tensor)::

    lo = min(x_min, 0), hi = max(x_max, 0)            # zero must be representable
    scale = (hi - lo) / (qmax - qmin)
    zero_point = clamp(qmin - round(lo / scale), qmin, qmax)
    fq(x) = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

Symmetric: ``scale = max(|x_min|, |x_max|) / ((qmax - qmin) / 2)`` and the zero point is 0
for signed dtypes or the middle code for unsigned ones.

Pinned qparams: a weight rounded by GPTQ or AdaRound lies on the grid the algorithm chose; the
min-max of the rounded weight would give another grid and undo the rounding. ``pin_qparams``
fixes (scale, zero_point) so ``compute_qparams`` keeps them through recalibration and
``reset``; the pin is a buffer (``pinned_grid``: the [qmin, qmax] it was made for, [0, 0] when
not pinned), so a saved session reloads it, and a pin made for another dtype's grid is dropped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from core.config import QuantSpec
from core.errors import NotCalibratedError
from core.quant.dtypes import QDType, get_dtype
from core.quant.extremes import TensorExtremes

WEIGHT_SOURCE = "weights"
# Where an extreme sat in its tensor (see the module docstring); ObserverRecord copies these.
LOCATION_FIELDS = ("min_index", "max_index", "min_shape", "max_shape", "min_tied", "max_tied")
_EPS = 1e-12


class Observer(nn.Module):
    """Base observer; subclasses decide how batch extremes update the running range."""

    observer_kind = "base"
    hist_bins = 128
    hist_sample = 1 << 16  # values drawn per batch for the display histogram

    def __init__(
        self,
        *,
        name: str,
        module_name: str,
        role: str,
        kind: str,
        spec: QuantSpec,
        enabled: bool = True,
        channels: int | None = None,
        channel_axis: int = 0,
    ) -> None:
        super().__init__()
        self.name = name
        self.module_name = module_name
        self.role = role
        self.kind = kind
        self.spec = spec
        self.qdtype: QDType = get_dtype(spec.dtype)
        self.enabled = enabled
        self.per_channel = bool(spec.per_channel and channels is not None)
        self.channel_axis = channel_axis
        shape = (channels,) if self.per_channel else ()
        self.register_buffer("min_val", torch.full(shape, math.inf))
        self.register_buffer("max_val", torch.full(shape, -math.inf))
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("hist_counts", torch.zeros(self.hist_bins, dtype=torch.float64))
        self.register_buffer("hist_range", torch.tensor([math.inf, -math.inf], dtype=torch.float64))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("pinned_grid", torch.zeros(2, dtype=torch.int64))
        self.min_source: str | None = None
        self.max_source: str | None = None
        self._clear_locations()
        self._scale_f = 1.0
        self._zp_i = 0

    # ----------------------------------------------------------------- statistics
    @property
    def has_stats(self) -> bool:
        """Whether at least one tensor was collected."""
        return int(self.num_seen) > 0

    def reset(self) -> None:
        """Forget all statistics and qparams (pinned qparams stay: they do not come from statistics)."""
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)
        self.hist_counts.zero_()
        self.hist_range.copy_(torch.tensor([math.inf, -math.inf], dtype=torch.float64))
        self.num_seen.zero_()
        self.frozen.fill_(self.is_pinned)
        self.min_source = self.max_source = None
        self._clear_locations()
        self._reset_extra()

    def _reset_extra(self) -> None:
        pass

    def _clear_locations(self) -> None:
        self.min_index: int | None = None
        self.max_index: int | None = None
        self.min_shape: tuple[int, ...] | None = None
        self.max_shape: tuple[int, ...] | None = None
        self.min_value: float | None = None
        self.max_value: float | None = None
        self.min_tied = False
        self.max_tied = False

    def _record_location(self, which: str, batch: TensorExtremes, value: float) -> None:
        """Store where the extreme `value` of the batch that just moved `which` lies in its tensor."""
        idx = batch.first_index(which, value)
        # Plain attributes set straight into __dict__: nn.Module.__setattr__ checks parameters,
        # buffers and submodules first, a cost paid for every moved extreme of every observer.
        fields = self.__dict__
        fields[f"{which}_index"] = idx
        fields[f"{which}_shape"] = tuple(int(d) for d in batch.x.shape)
        fields[f"{which}_value"] = float(batch.x.reshape(-1)[idx])
        fields[f"{which}_tied"] = False

    def _track(self, which: str, value: float, current: float, source: str | None, batch: TensorExtremes) -> bool:
        """Provenance of one extreme: True when `value` beats `current` (strictly: on a tie the
        earlier image keeps it, and the tie is noted), recording the source and location."""
        beats = value < current if which == "min" else value > current
        if beats:
            self.__dict__[f"{which}_source"] = source
            if not self.per_channel:
                self._record_location(which, batch, value)
        elif value == current and not self.per_channel and source != getattr(self, f"{which}_source"):
            self.__dict__[f"{which}_tied"] = True
        return beats

    @torch.no_grad()
    def collect(self, x: torch.Tensor, source: str | None = None) -> None:
        """Record the statistics of `x`; `source` names the image it came from."""
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype != torch.float32:
            x = x.float()
        if self.per_channel:
            flat = x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
            # Two row reductions: aminmax with a dim does not vectorise on CPU (about 30x slower).
            mn, mx = flat.amin(dim=1), flat.amax(dim=1)
            batch = None
            lo, hi = float(mn.min()), float(mx.max())
        else:
            batch = TensorExtremes(x, expect_moves=not self.has_stats)
            mn, mx = batch.min, batch.max
            lo, hi = float(mn), float(mx)
        self._update_stats(batch, mn, mx, lo, hi, source)
        self._update_histogram(x, lo, hi)
        self.num_seen.add_(x.numel())

    def _update_stats(
        self, batch: TensorExtremes | None, mn: torch.Tensor, mx: torch.Tensor, lo: float, hi: float, source: str | None
    ) -> None:
        """Fold one batch into the running range: `mn`/`mx` its extremes (per channel or 0-d),
        `lo`/`hi` the overall ones as floats; `batch` locates them (None for per-channel ones)."""
        raise NotImplementedError

    def _set_extremes(
        self, batch: TensorExtremes | None, mn: torch.Tensor, mx: torch.Tensor, lo: float, hi: float, source: str | None
    ) -> None:
        """Plain running min/max with provenance (shared by the min-max family); `batch` gives the location."""
        if self.per_channel:
            torch.minimum(self.min_val, mn, out=self.min_val)
            torch.maximum(self.max_val, mx, out=self.max_val)
            self.min_source = self.max_source = source
            return
        if self._track("min", lo, float(self.min_val), source, batch):
            self.min_val.copy_(mn)
        if self._track("max", hi, float(self.max_val), source, batch):
            self.max_val.copy_(mx)

    def _histogram_values(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        step = max(1, flat.numel() // self.hist_sample)
        return flat[::step]

    def _update_histogram(self, x: torch.Tensor, mn: float, mx: float) -> None:
        lo_old, hi_old = self.hist_range.tolist()
        lo, hi = min(lo_old, mn), max(hi_old, mx)
        if hi <= lo:
            hi = lo + 1e-6
        if (lo, hi) != (lo_old, hi_old) and self.hist_counts.sum() > 0:
            # Re-bin what was counted so far onto the wider range (bin centres move as mass).
            width = (hi_old - lo_old) / self.hist_bins
            centres = lo_old + width * (torch.arange(self.hist_bins, dtype=torch.float64) + 0.5)
            idx = ((centres - lo) / (hi - lo) * self.hist_bins).long().clamp(0, self.hist_bins - 1)
            self.hist_counts.copy_(torch.bincount(idx, weights=self.hist_counts, minlength=self.hist_bins))
        self.hist_range.copy_(torch.tensor([lo, hi], dtype=torch.float64))
        values = self._histogram_values(x)
        weight = x.numel() / values.numel()
        counts = torch.histc(values.float(), bins=self.hist_bins, min=lo, max=hi).double()
        self.hist_counts.add_(counts * weight)

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts and bin edges of the values seen (a fixed number of bins)."""
        lo, hi = self.hist_range.tolist()
        if not math.isfinite(lo):
            lo, hi = 0.0, 1.0
        return self.hist_counts.clone(), torch.linspace(lo, hi, self.hist_bins + 1, dtype=torch.float64)

    # ------------------------------------------------------------------- qparams
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (lo, hi) range that qparams are computed from."""
        return self.min_val, self.max_val

    @property
    def is_pinned(self) -> bool:
        """Whether (scale, zero_point) are pinned for this observer's current grid."""
        lo, hi = self.pinned_grid.tolist()
        return (lo, hi) == (self.qdtype.qmin, self.qdtype.qmax)

    @torch.no_grad()
    def pin_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix (scale, zero_point): recalibration and reset keep them until unpin() or a new prepare."""
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(self.scale.shape)
        zero_point = torch.as_tensor(zero_point).reshape(self.zero_point.shape)
        q = self.qdtype
        if not bool((scale > 0).all()) or bool(((zero_point < q.qmin) | (zero_point > q.qmax)).any()):
            raise ValueError(f"{self.name}: pinned qparams must have positive scales and zero points in [{q.qmin}, {q.qmax}]")
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point.to(torch.int32))
        self.pinned_grid.copy_(torch.tensor([q.qmin, q.qmax]))
        self.frozen.fill_(True)
        self._refresh_cache()

    def unpin(self) -> None:
        """Let the statistics decide the qparams again (from the next compute_qparams)."""
        self.pinned_grid.zero_()

    @torch.no_grad()
    def compute_qparams(self) -> None:
        """Freeze the collected statistics into (scale, zero_point); pinned qparams are kept."""
        if self.is_pinned:
            self.frozen.fill_(True)
            self._refresh_cache()
            return
        if bool(self.pinned_grid.any()):
            self.unpin()  # pinned for another dtype's grid: meaningless on this one
        if not self.has_stats:
            raise NotCalibratedError(f"observer {self.name} has no statistics: calibrate before converting")
        lo, hi = (t.double() for t in self.range())
        q = self.qdtype
        if self.spec.scheme == "symmetric":
            amax = torch.maximum(-lo, hi).clamp(min=0)
            scale = (amax / ((q.qmax - q.qmin) / 2)).clamp(min=_EPS)
            zp = torch.zeros_like(scale) if q.signed else torch.full_like(scale, (q.qmax + 1) // 2)
        else:
            lo = lo.clamp(max=0)
            hi = hi.clamp(min=0)
            scale = ((hi - lo) / (q.qmax - q.qmin)).clamp(min=_EPS)
            zp = (q.qmin - torch.round(lo / scale)).clamp(q.qmin, q.qmax)
        self.scale.copy_(scale.float())
        self.zero_point.copy_(zp.to(torch.int32))
        self.frozen.fill_(True)
        self._refresh_cache()

    def _refresh_cache(self) -> None:
        if not self.per_channel:
            self._scale_f = float(self.scale)
            self._zp_i = int(self.zero_point)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # Sessions saved before pins existed have no pinned_grid: nothing was pinned then.
        # (nn.Module.load_state_dict hands every module its own copy of the dict.)
        state_dict.setdefault(prefix + "pinned_grid", torch.zeros(2, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_cache()

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize `x` with the frozen qparams (standard ATen ops only)."""
        q = self.qdtype
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.channel_axis, q.qmin, q.qmax
            )
        return torch.fake_quantize_per_tensor_affine(x, self._scale_f, self._zp_i, q.qmin, q.qmax)

    def representable_range(self) -> tuple[float, float]:
        """Smallest and largest real values the frozen grid can hold (per tensor: scalars)."""
        q = self.qdtype
        scale = self.scale.double()
        zp = self.zero_point.double()
        lo = (q.qmin - zp) * scale
        hi = (q.qmax - zp) * scale
        return (float(lo.min()), float(hi.max()))

    def provenance(self) -> dict[str, Any]:
        """Which image set the min and the max, and where in its tensor (JSON-ready, outside the state_dict)."""
        return {
            "min_source": self.min_source,
            "max_source": self.max_source,
            "min_index": self.min_index,
            "max_index": self.max_index,
            "min_shape": list(self.min_shape) if self.min_shape is not None else None,
            "max_shape": list(self.max_shape) if self.max_shape is not None else None,
            "min_value": self.min_value,
            "max_value": self.max_value,
            "min_tied": self.min_tied,
            "max_tied": self.max_tied,
        }

    def set_provenance(self, data: dict[str, Any]) -> None:
        """Restore what provenance() returned (older sessions without locations restore None)."""
        self.min_source = data.get("min_source")
        self.max_source = data.get("max_source")
        self._clear_locations()
        for which in ("min", "max"):
            idx = data.get(f"{which}_index")
            shape = data.get(f"{which}_shape")
            value = data.get(f"{which}_value")
            setattr(self, f"{which}_tied", bool(data.get(f"{which}_tied", False)))
            if idx is None or shape is None:
                continue
            setattr(self, f"{which}_index", int(idx))
            setattr(self, f"{which}_shape", tuple(int(d) for d in shape))
            setattr(self, f"{which}_value", float(value) if value is not None else None)

    def location(self, which: str) -> tuple[int, tuple[int, ...]] | None:
        """(flat index, tensor shape) of the recorded min or max, or None when there is none."""
        if which not in ("min", "max"):
            raise ValueError(f"which must be 'min' or 'max', not {which!r}")
        idx = getattr(self, f"{which}_index")
        shape = getattr(self, f"{which}_shape")
        if idx is None or shape is None:
            return None
        return idx, shape

    def extra_repr(self) -> str:
        return f"{self.name}, {self.observer_kind}, {self.spec.dtype}/{self.spec.scheme}"


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything seen."""

    observer_kind = "minmax"

    def _update_stats(self, batch, mn, mx, lo, hi, source):
        self._set_extremes(batch, mn, mx, lo, hi, source)


class EMAMinMaxObserver(Observer):
    """Moving average of batch minima and maxima: ``r = m * r + (1 - m) * batch``.

    ``min_source``/``max_source`` name the image whose batch extreme was the most extreme
    seen, since an average has no single origin. The recorded location (``min_index`` ...)
    belongs to that same event: the element holding the most extreme value seen, so source
    and location always agree (``min_value`` is that element, not the averaged ``min_val``).
    Every batch moves an average, so "the batch that last moved the range" would just be the
    last image and say nothing about outliers.
    """

    observer_kind = "ema"

    def __init__(self, *, momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.momentum = momentum
        self._extreme = [math.inf, -math.inf]

    def _reset_extra(self) -> None:
        self._extreme = [math.inf, -math.inf]

    def _update_stats(self, batch, mn, mx, lo, hi, source):
        if not self.has_stats:
            self.min_val.copy_(mn)
            self.max_val.copy_(mx)
        else:
            m = self.momentum
            self.min_val.mul_(m).add_((1 - m) * mn)
            self.max_val.mul_(m).add_((1 - m) * mx)
        if self._track("min", lo, self._extreme[0], source, batch):
            self._extreme[0] = lo
        if self._track("max", hi, self._extreme[1], source, batch):
            self._extreme[1] = hi


class PercentileObserver(Observer):
    """Clips the range to the [100 - p, p] percentiles of a histogram of every value seen.

    Provenance (source and location) names the raw minimum / maximum seen, which the clipped
    range is cut from: that element is the outlier the percentile discards.
    """

    observer_kind = "percentile"
    hist_bins = 2048

    def __init__(self, *, percentile: float = 99.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    def _histogram_values(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)  # the range is read off this histogram, so count every value

    def _update_stats(self, batch, mn, mx, lo, hi, source):
        self._set_extremes(batch, mn, mx, lo, hi, source)

    def range(self):
        if self.per_channel:
            return self.min_val, self.max_val
        counts, edges = self.histogram()
        cdf = torch.cumsum(counts, 0) / counts.sum().clamp(min=1)
        tail = (100.0 - self.percentile) / 100.0
        lo_idx = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype)))
        hi_idx = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=cdf.dtype)))
        lo = max(float(edges[lo_idx]), float(self.min_val))
        hi = min(float(edges[min(hi_idx + 1, self.hist_bins)]), float(self.max_val))
        return torch.tensor(lo), torch.tensor(hi)


def make_observer(observer_kind: str, *, momentum: float = 0.9, percentile: float = 99.99, **kwargs: Any) -> Observer:
    """Build the observer class named by the config ('minmax', 'ema', 'percentile')."""
    if observer_kind == "ema":
        return EMAMinMaxObserver(momentum=momentum, **kwargs)
    if observer_kind == "percentile":
        return PercentileObserver(percentile=percentile, **kwargs)
    return MinMaxObserver(**kwargs)
