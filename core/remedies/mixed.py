"""Mixed precision to a target: the cheapest per-module dtypes that reach an end-to-end SQNR.

Interface agreed by the remedy, session and Fix-tab work; the bodies are being written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParetoPoint:
    """One configuration tried: its overrides (glob -> override text), exported size, wide ops, SQNR."""

    overrides: dict[str, str]
    cost_bytes: int
    wide_ops: int
    sqnr_db: float
    origin: str = "search"  # "search", "greedy" (the sensitivity-ordered reference) or "baseline"


@dataclass
class MixedPrecisionResult:
    """Every point tried, the cheapest that reaches the target (search and greedy), and the target."""

    target: dict[str, Any]
    points: list[ParetoPoint] = field(default_factory=list)
    chosen: ParetoPoint | None = None
    greedy: ParetoPoint | None = None


def search_mixed_precision(
    qmodel,
    config,
    batches: Sequence[Mapping[str, Any]],
    *,
    target_sqnr_db: float | None = None,
    within_db_of_int16: float | None = None,
    progress: Callable[..., None] | None = None,
    cancel=None,
) -> MixedPrecisionResult:
    """Search per-module dtypes for the cheapest configuration that reaches the target on these images."""
    raise NotImplementedError("the mixed-precision search is being written (issue 14)")
