"""Weight rounding: GPTQ and AdaRound; weights snapped to their grid, their qparams pinned.

Interface agreed by the remedy, session and Fix-tab work; the bodies are being written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from core.remedies.plan import RemedyReport

METHODS = ("gptq", "adaround")


def apply_weight_rounding(
    qmodel,
    batches: Sequence[Mapping[str, Any]],
    globs: Sequence[str],
    method: str = "gptq",
    *,
    progress: Callable[..., None] | None = None,
    cancel=None,
    **options: Any,
) -> RemedyReport:
    """Round the weights of the linears matched by the globs with GPTQ or AdaRound on these inputs."""
    raise NotImplementedError("GPTQ/AdaRound are being written (issue 14)")
