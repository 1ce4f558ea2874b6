"""Outlier smoothing: SmoothQuant and cross-layer equalisation, folded into the float weights.

Interface agreed by the remedy, session and Fix-tab work; the bodies are being written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.remedies.plan import RemedyReport


def apply_smoothquant(
    qmodel,
    batches: Sequence[Mapping[str, Any]],
    alpha_by_glob: Mapping[str, float],
    *,
    progress: Callable[..., None] | None = None,
    cancel=None,
) -> RemedyReport:
    """Rescale the linears matched by each glob (alpha per glob) and fold the inverse into the norm before them."""
    raise NotImplementedError("SmoothQuant is being written (issue 14)")


def apply_cle(qmodel, globs: Sequence[str], *, progress: Callable[..., None] | None = None, cancel=None) -> RemedyReport:
    """Equalise weight ranges across consecutive linear pairs matched by the globs (function-preserving)."""
    raise NotImplementedError("cross-layer equalisation is being written (issue 14)")
