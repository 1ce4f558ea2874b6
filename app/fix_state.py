"""The Fix tab's view state: a plain object (no Qt), so what the tab shows is decided in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.analysis.abtest import TIE_DB
from core.analysis.heatmaps import MODEL

# Which units a pre-filled glob may name: the model root ("model") is no module glob.
ROOT_UNITS = ("", MODEL)


@dataclass
class HeatmapPair:
    """One module's patch-error map on one photo before and after the fix."""

    image_id: str
    module: str
    before: Any  # core.analysis.heatmaps.Heatmap
    after: Any
    before_sqnr_db: float  # the module's SQNR on this photo (the whole output tensor)
    after_sqnr_db: float


@dataclass
class LocalSQNR:
    """A unit's local SQNR (the error it adds alone, on float input) under one model; the A/B charts read .sqnr_db."""

    sqnr_db: float


@dataclass
class UnitChange:
    """A divergence unit's local SQNR before (a) and after (b) the fix, as the A/B charts draw a module."""

    name: str
    a: LocalSQNR
    b: LocalSQNR
    delta_sqnr_db: float
    winner: str  # "A" (before was better) | "B" (after is better) | "tie"


@dataclass
class FixViewState:
    """The last fix shown, the statistics it left, the unit the first divergence located, and the
    photo and module its before/after heatmap pair shows."""

    result: Any = None  # core.remedies.apply.FixResult; None before a fix or after the model changed again
    stats_version: int | None = None  # session.stats_version right after the fix
    stale: bool = False  # a fix was dropped because the session changed since: the tab says so
    divergence_unit: str | None = None  # the located unit of the session's last first-divergence search
    photo: str | None = None  # the evaluation photo of the heatmap pair
    module: str | None = None  # the module of the heatmap pair

    def fixed(self, result: Any, stats_version: int) -> None:
        """A fix finished and left the statistics `stats_version`: the pair shows its default module on the first photo."""
        self.result, self.stats_version, self.stale = result, stats_version, False
        photos = self.photos()
        self.photo = photos[0] if photos else None
        self.module = self.default_module()

    def statistics_changed(self, stats_version: int | None) -> bool:
        """New statistics (None: a new config): drop the fix unless they are the ones it left."""
        if stats_version is not None and stats_version == self.stats_version:
            return False
        self.stale = self.result is not None
        self.result, self.stats_version = None, stats_version
        self.photo = self.module = None
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

    # -- the heatmap pair ---------------------------------------------------------------------
    def _maps(self) -> tuple[dict, dict]:
        before = getattr(self.result, "before_analysis", None)
        after = getattr(self.result, "after_analysis", None)
        if before is None or after is None:
            return {}, {}
        return before.maps, after.maps

    def photos(self) -> list[str]:
        """The evaluation photos mapped both before and after the fix, in evaluation order."""
        before, after = self._maps()
        return [image_id for image_id in before if image_id in after]

    def modules(self) -> list[str]:
        """The modules of the chosen photo with a map before and after, forward order ("model" last)."""
        before, after = self._maps()
        if self.photo not in before or self.photo not in after:
            return []
        mapped = set(after[self.photo].modules())
        return [m for m in before[self.photo].modules() if m in mapped]

    def default_module(self) -> str | None:
        """The unit the first divergence located before the fix, else the module worst before it, else the output."""
        modules = self.modules()
        if not modules:
            return None
        shift = getattr(self.result, "divergence", None)
        if shift is not None and shift.before in modules:
            return shift.before
        worst = [m for m in getattr(self.result.before, "modules", []) if m.name in modules and not math.isnan(m.sqnr_db)]
        if worst:
            return min(worst, key=lambda m: m.sqnr_db).name
        return MODEL if MODEL in modules else modules[0]

    def choose(self, photo: str | None = None, module: str | None = None) -> bool:
        """Show another photo and/or module in the pair; False (nothing changes) when it has no map there."""
        new_photo = self.photo if photo is None else photo
        new_module = self.module if module is None else module
        before, after = self._maps()
        if new_photo not in before or new_photo not in after:
            return False
        if new_module not in after[new_photo].modules() or new_module not in before[new_photo].modules():
            if module is not None:
                return False
            new_module = None  # the new photo lacks the old module's map: fall back to the default
        self.photo = new_photo
        self.module = new_module or self.default_module()
        return True

    def heatmap_pair(self) -> HeatmapPair | None:
        """The chosen module's maps before and after on the chosen photo (None when there is nothing to show)."""
        before, after = self._maps()
        if self.photo not in before or self.photo not in after or self.module is None:
            return None
        mb, ma = before[self.photo], after[self.photo]
        if self.module not in mb.modules() or self.module not in ma.modules():
            return None
        hb, ha = mb.heatmap(self.module), ma.heatmap(self.module)
        return HeatmapPair(
            image_id=self.photo,
            module=self.module,
            before=hb,
            after=ha,
            before_sqnr_db=float(mb.sqnr_db.get(self.module, math.nan)),
            after_sqnr_db=float(ma.sqnr_db.get(self.module, math.nan)),
        )

    # -- the first divergence -----------------------------------------------------------------
    def divergence_lines(self) -> tuple[str, str] | None:
        """(before, after) sentences of the first divergence (None without a fix)."""
        shift = getattr(self.result, "divergence", None)
        return None if shift is None else shift.lines()

    def unit_changes(self) -> list[UnitChange]:
        """Every divergence unit's local SQNR before and after the fix, forward order."""
        before = getattr(self.result, "before_analysis", None)
        after = getattr(self.result, "after_analysis", None)
        if before is None or after is None:
            return []
        now = {e.name: e.local_sqnr_db for e in after.divergence.entries}
        changes = []
        for e in before.divergence.entries:
            a, b = float(e.local_sqnr_db), float(now.get(e.name, math.nan))
            delta = b - a if math.isfinite(a) and math.isfinite(b) else math.nan
            winner = "tie" if not abs(delta) > TIE_DB else ("B" if delta > 0 else "A")
            changes.append(UnitChange(e.name, LocalSQNR(a), LocalSQNR(b), delta, winner))
        return changes

