"""Error metrics: FP-vs-quantized metric maths, the streaming ErrorAccumulator and its reservoir sample.

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
import zlib

import numpy as np
import torch

from core.analysis.records import ModuleError

SAMPLE_SIZE = 4096
OUTLIER_PERCENTILE = 99.99
OUTLIER_RATIO_THRESHOLD = 4.0

__all__ = [
    "SAMPLE_SIZE",
    "OUTLIER_PERCENTILE",
    "OUTLIER_RATIO_THRESHOLD",
    "ReservoirSample",
    "ErrorAccumulator",
    "peir",
    "sqnr_db",
    "mse",
    "max_abs",
    "cosine",
    "clipped_fraction",
    "outlier_ratio",
    "ratio_or_inf",
    "sqnr_from_sums",
    "cosine_from_sums",
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
    return ratio_or_inf(err, span)


def sqnr_db(fp, q) -> float:
    """Signal to quantization noise ratio in dB; +inf when fp == q."""
    a, b = _flat64(fp), _flat64(q)
    return sqnr_from_sums(float((a * a).sum()), float(((a - b) ** 2).sum()))


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
    return cosine_from_sums(float((a * b).sum()), float((a * a).sum()), float((b * b).sum()))


def clipped_fraction(fp, lo: float | None, hi: float | None) -> float:
    """Share of fp values outside [lo, hi] (0 when no range is known)."""
    a = _flat64(fp)
    if lo is None or hi is None or a.numel() == 0:
        return 0.0
    return float(((a < lo) | (a > hi)).sum()) / a.numel()


def ratio_or_inf(num: float, den: float) -> float:
    """num / den; 0 for 0 / 0 and +inf for x / 0."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from the sums of fp^2 and (fp - q)^2; +inf without noise, -inf without signal."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_from_sums(dot: float, ff: float, qq: float) -> float:
    """Cosine similarity from sum(fp*q), sum(fp^2), sum(q^2); 1 when both are zero."""
    if ff <= 0 and qq <= 0:
        return 1.0
    if ff <= 0 or qq <= 0:
        return 0.0
    return dot / math.sqrt(ff * qq)


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
            peir=ratio_or_inf(self.max_abs, span),
            sqnr_db=sqnr_from_sums(self.sum_ff, self.sum_dd),
            mse=self.sum_dd / self.n if self.n else 0.0,
            max_abs=self.max_abs,
            cosine=cosine_from_sums(self.sum_fq, self.sum_ff, self.sum_qq),
            clipped_fraction=self.clipped / self.n if self.n else 0.0,
            samples_fp=self.sample.fp,
            samples_q=self.sample.q,
            num_values=self.n,
            fp_min=self.fp_min if self.n else 0.0,
            fp_max=self.fp_max if self.n else 0.0,
        )
