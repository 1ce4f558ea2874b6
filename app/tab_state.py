"""View state of the Ranges and Errors tabs, without Qt: what each shows and which statistics it is from.

The widgets draw these objects; the objects are filled from the Session (its images and statuses) and
from its events' payloads, never from another tab's widgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal import Signal

# Photo names a one-line "from … photos" text lists before it says how many more (the tooltip has all).
NAMES_SHOWN = 4
# A number needs a yardstick: what a good end-to-end SQNR looks like, and that random weights are no test of it.
SQNR_YARDSTICK = (
    "SQNR: signal-to-quantization-noise ratio of the final output, higher is better. "
    "uint8 activations on a trained model typically give tens of dB (20–40 dB); under ~10 dB the "
    "quantized output is mostly noise. The built-in models have random (seeded) weights, which "
    "amplify noise far more than trained ones: judge the quantizer on a real checkpoint."
)


@dataclass
class ImageSnapshot:
    """The session's images as of its last images or calibration event: ids, paths and statuses."""

    path_by_id: dict[str, str] = field(default_factory=dict)
    status_by_path: dict[str, str] = field(default_factory=dict)
    evaluation: list[str] = field(default_factory=list)  # paths of the session's evaluation photos

    @classmethod
    def of(cls, session: Any) -> ImageSnapshot:
        """Copy the session's image list (so a worker changing it later cannot change what is shown)."""
        snap = cls()
        for entry in list(getattr(session, "images", None) or []):
            path = str(entry.path)
            snap.status_by_path[path] = str(entry.status)
            if entry.status != "rejected":
                snap.path_by_id[str(entry.image_id or Path(path).name)] = path
        snap.evaluation = [str(e.path) for e in list(getattr(session, "evaluation_images", None) or [])]
        return snap

    def name_of(self, image_id: str) -> str:
        """The file name of the image with this id (the id itself when it left the set)."""
        path = self.path_for(image_id)
        return Path(path).name if path is not None else str(image_id)

    def evaluation_count_text(self) -> str:
        """'Evaluating on 4 of 25 photos': how many usable photos the analysis runs on."""
        return f"Evaluating on {len(self.evaluation)} of {self.usable_count()} photos"

    def path_for(self, image_id: str) -> str | None:
        """The file path of the image with this id (None when it left the set)."""
        return self.path_by_id.get(str(image_id))

    def status_of(self, path: str) -> str:
        """The status of the image at this path ("" when it is not in the set)."""
        return self.status_by_path.get(str(path), "")

    def usable_count(self) -> int:
        """How many images calibration would use (neither rejected nor excluded)."""
        return sum(s in ("ok", "used") for s in self.status_by_path.values())

    def excluded(self) -> list[str]:
        """Paths of the excluded images, in the session's order."""
        return [p for p, s in self.status_by_path.items() if s == "excluded"]


@dataclass
class ErrorsState:
    """What the Errors tab shows: the last evaluation, which images and statistics it is from, the selection."""

    result: Any = None  # the CompareResult on screen
    previous_end_to_end: Any = None  # the end-to-end error before the last re-evaluation
    images: list[str] = field(default_factory=list)  # ids of the images the numbers are from
    stats_version: int | None = None  # the session's statistics version they were computed for
    selected_module: str | None = None
    per_image: dict[str, Any] = field(default_factory=dict)  # image id -> CompareResult on that image alone
    divergence: Any = None  # the DivergenceResult of the last locate
    # image id -> (ImageErrorMaps, {module: Heatmap}), computed by the worker once per evaluation
    maps_cache: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    wanted_module: str | None = None  # shown in the heatmap once its image's maps arrive
    generation: int = 0  # bumped by every evaluation and clear: late results of older ones are dropped
    evaluation_total: int = 0  # photos in the evaluation set the numbers on screen come from
    complete: bool = True  # False while later photos may still refine the numbers on screen

    def evaluation_line(self, names: list[str], running: bool) -> str:
        """'from 2 of 4 evaluation photos: a.jpg, b.jpg…', true of the numbers on screen (names: their photos)."""
        if self.result is None:
            return ""
        total = max(self.evaluation_total, len(names))
        shown = ", ".join(names[:NAMES_SHOWN]) + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")
        if self.complete:
            tail = ""
        elif running:
            tail = " (more on the way…)"
        else:
            tail = " (stopped before the rest)"
        return f"from {len(names)} of {total} evaluation photo{'s' if total != 1 else ''}: {shown}{tail}"

    def show(self, result: Any, stats_version: int | None) -> None:
        """A new evaluation: its numbers replace the old ones, whose per-image views no longer hold."""
        self.result = result
        self.images = [str(i) for i in getattr(result, "images", None) or []]
        self.stats_version = stats_version
        self.per_image = {}

    def new_generation(self) -> int:
        """Drop the maps of the evaluation on screen; diagnostics still on their way are stale."""
        self.generation += 1
        self.maps_cache = {}
        return self.generation

    def forget(self) -> None:
        """Nothing evaluated (the statistics or the config changed)."""
        self.new_generation()
        self.divergence = None
        self.show(None, None)
        self.previous_end_to_end = None
        self.wanted_module = None


@dataclass
class RangesState:
    """What the Ranges tab shows: observer records, the selection, and where each extreme was found."""

    records: list = field(default_factory=list)  # ObserverRecords, forward order
    stats_version: int | None = None  # the session's statistics version the records are from
    detail_row: int = -1  # the observer whose histogram and source are shown
    ranks: list = field(default_factory=list)  # ImageRanks, most extremes first
    # (observer, "min" | "max") -> ExtremeLocation, for the statistics on screen only
    locations: dict[tuple[str, str], Any] = field(default_factory=dict)
    wanted: tuple[str, str] | None = None  # the location the user asked for last
    generation: int = 0  # bumped when the statistics change: locations looked up before are stale

    def selected_record(self) -> Any:
        """The selected ObserverRecord, or None."""
        return self.records[self.detail_row] if 0 <= self.detail_row < len(self.records) else None

    def new_statistics(self) -> None:
        """The statistics are about to change: what was located no longer holds."""
        self.generation += 1
        self.locations.clear()


class PartialResults:
    """Each evaluation photo's partial analysis, emitted on the worker as it is done; the Errors tab draws it
    on the GUI thread (app.events.on_gui_thread)."""

    # (run, PartialAnalysis)
    arrived = Signal(int, object)


@dataclass
class PartialAnalysis:
    """One photo's contribution: the analysis of the photos so far and what the worker prepared for drawing it."""

    image_id: str
    analysis: Any  # core AnalysisResult of the photos done so far
    total: int  # photos in the evaluation set
    table: Any = None  # ModuleErrorModel.prepare of its modules
    maps: Any = None  # (ImageErrorMaps, {module: Heatmap}) of this photo when the worker drew it, else None
