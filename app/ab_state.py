"""The A/B tab's view state: a plain object (no Qt), so what the tab shows is decided in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.analysis.ab_overrides import DEFAULT_MARGIN_DB


@dataclass
class ABViewState:
    """The last comparison, which statistics of A it was made on, and whether A changed since."""

    result: Any = None  # core.analysis.abtest.ABResult; None before a comparison or after A changed
    stats_version: int | None = None  # session.stats_version the view describes (None: not known)
    stale: bool = False  # a comparison was dropped because A changed: the tab says "compare again"
    margin_db: float = DEFAULT_MARGIN_DB
    # Circle tensor -> module of the session's last export: ONE's JSON names layers by tensor.
    tensor_modules: dict[str, str] = field(default_factory=dict)

    def compared(self, result: Any, stats_version: int) -> None:
        """A comparison finished on A's statistics `stats_version`."""
        self.result, self.stats_version, self.stale = result, stats_version, False

    def a_changed(self, stats_version: int | None = None) -> bool:
        """A has other statistics (or a new config: None); drop the comparison. Returns whether the
        view changed: a cancelled recalibration that restores the compared statistics changes nothing."""
        if stats_version is not None and stats_version == self.stats_version:
            return False
        # "compare again" only when there was a comparison to drop; otherwise the how-to.
        self.stale = self.result is not None
        self.result, self.stats_version = None, stats_version
        return True
