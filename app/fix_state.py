"""The Fix tab's view state: a plain object (no Qt), so what the tab shows is decided in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Which units a pre-filled glob may name: the model root ("model") is no module glob.
ROOT_UNITS = ("", "model")


@dataclass
class FixViewState:
    """The last fix shown, the statistics it left, and the unit the first divergence located."""

    result: Any = None  # core.remedies.apply.FixResult; None before a fix or after the model changed again
    stats_version: int | None = None  # session.stats_version right after the fix
    stale: bool = False  # a fix was dropped because the session changed since: the tab says so
    divergence_unit: str | None = None  # the located unit of the session's last first-divergence search

    def fixed(self, result: Any, stats_version: int) -> None:
        """A fix finished and left the statistics `stats_version`."""
        self.result, self.stats_version, self.stale = result, stats_version, False

    def statistics_changed(self, stats_version: int | None) -> bool:
        """New statistics (None: a new config): drop the fix unless they are the ones it left."""
        if stats_version is not None and stats_version == self.stats_version:
            return False
        self.stale = self.result is not None
        self.result, self.stats_version = None, stats_version
        return True

    def located(self, divergence: Any) -> str | None:
        """Remember the unit a first-divergence search located; returns the glob to pre-fill (or None)."""
        entry = getattr(divergence, "located", None)
        name = getattr(entry, "name", None)
        self.divergence_unit = None if name in ROOT_UNITS else name
        return self.divergence_unit

    def pareto_points(self) -> list:
        """The mixed-precision points the last fix tried (empty without a search)."""
        search = getattr(self.result, "mixed", None)
        return list(getattr(search, "points", []) or [])
