"""Session: the whole PTQ pipeline as one plain-Python object shared by the GUI and the CLI.

A session holds the model spec, the PTQ config, the calibration image set and the wrapped
model, and announces each change through ``session.events`` (core.events). Long steps take
``progress(done, total, message)`` and a ``core.cancel.CancelToken``. The image bookkeeping
lives in core.data.image_set and the folder format (save / load) in core.session_store.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core import ptq
from core.analysis.analysis_pass import AnalysisResult, analyse
from core.analysis.compare import compare
from core.analysis.divergence import locate_divergence
from core.analysis.heatmaps import image_error_maps
from core.analysis.observer_table import observer_table
from core.analysis.provenance import locate_extreme, rank_images
from core.analysis.records import CompareResult, ModuleError, ObserverRecord, SensitivityEntry
from core.analysis.sensitivity import sensitivity
from core.analysis.threeway import three_way_session
from core.config import PTQConfig
from core.data import image_set
from core.data.device import batches_to_device, resolve_device
from core.data.eval_set import choose_paths, evaluation_entries
from core.data.grid import patch_layout
from core.data.image_set import AddImagesResult, ImageEntry
from core.data.images import DEFAULT_SOFT_TOKENS, ImagePreprocessor
from core.errors import NoImagesError, NotCalibratedError, one_line
from core.events import SessionEvents
from core.export.pipeline import ExportResult, export_circle
from core.export.process import export_in_process
from core.models import SPECS, describe_model, load_model
from core.quant.mode import Mode
from core.remedies.apply import PHASES, FixResult, fix_model, validate_plan
from core.remedies.plan import RemedyReport, RemedyStep
from core.session_store import (
    FORMAT_VERSION,
    MANIFEST,
    OBSERVERS,
    build_manifest,
    checkpoint_hash,
    load_observer_state,
    observer_state,
    package_versions,
    read_remedies,
    read_session,
    session_error,
    write_session,
)

BUILTIN_MODELS = SPECS

Progress = Callable[[int, int, str], None]

__all__ = [
    "Session",
    "ImageEntry",
    "AddImagesResult",
    "SessionCalibration",
    "FORMAT_VERSION",
    "MANIFEST",
    "OBSERVERS",
    "checkpoint_hash",
    "package_versions",
]


@dataclass
class SessionCalibration:
    """Outcome of Session.calibrate."""

    batches_done: int
    images_done: int
    total_images: int
    cancelled: bool
    seconds: float


class Session:
    """Model, config, images and wrapped model, with the pipeline's steps as methods."""

    def __init__(
        self,
        model_spec: str = "tiny",
        config: PTQConfig | None = None,
        max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
        device: str = "cpu",
    ):
        self.model_spec = str(model_spec)
        self.config = config if config is not None else PTQConfig()
        self.max_soft_tokens = int(max_soft_tokens)
        self.device = resolve_device(device)
        self.model = load_model(self.model_spec)
        self.model_info: dict[str, Any] = dict(describe_model(self.model))
        self.preprocessor = ImagePreprocessor(self.model.config, max_soft_tokens=self.max_soft_tokens)
        self.images: list[ImageEntry] = []
        # Paths of the chosen evaluation photos; None: the default (core.data.eval_set).
        self.evaluation_choice: list[str] | None = None
        # Emitted on the calling thread (a GUI worker); see core.events.
        self.events = SessionEvents()
        # Which statistics the observers hold: 0 = none, then a new number for each new set.
        self.stats_version = 0
        self._last_stats_version = 0
        self.calibration: SessionCalibration | None = None
        self.last_compare: CompareResult | None = None
        self.last_sensitivity_baseline: ModuleError | None = None
        self._checkpoint_hash: str | None = None
        # path -> status an image had when it was excluded ("used" if the current statistics
        # still contain it), so include_images can put it back; in memory only.
        self._status_before_exclude: dict[str, str] = {}
        # The remedies applied so far (core.remedies), in order; their float weights live in self.model.
        self.remedies: list[RemedyReport] = []
        self._prepare()

    # ---- model -------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.qmodel = ptq.prepare(self.model, self.config)
        # prepare() wraps a deep copy; keep only that copy so the weights live in memory once.
        self.model = self.qmodel.source
        self.qmodel.to(self.device)
        self.qmodel.eval()
        self.stats_version = 0
        self.calibration = None
        self.last_compare = None

    @property
    def state(self) -> str:
        """"calibrated" while the model is in QUANT mode (it holds frozen statistics), else "prepared"."""
        return "calibrated" if self.qmodel.mode is Mode.QUANT else "prepared"

    def _new_stats_version(self) -> int:
        """A version number no earlier statistics had (restored ones keep theirs)."""
        self._last_stats_version += 1
        self.stats_version = self._last_stats_version
        return self.stats_version

    @property
    def is_checkpoint(self) -> bool:
        """True when the model comes from a checkpoint folder, not a built-in spec."""
        return self.model_spec not in BUILTIN_MODELS

    def checkpoint_sha256(self) -> str:
        """The checkpoint folder's hash (core.session_store.checkpoint_hash), computed once."""
        if self._checkpoint_hash is None:
            self._checkpoint_hash = checkpoint_hash(Path(self.model_spec).resolve())
        return self._checkpoint_hash

    def set_config(self, config) -> None:
        """Switch to a new PTQ config: re-prepares and drops the calibration."""
        self.config = config
        self._prepare()
        # Smoothing lives in the float weights and survives a new config; a rounding's copies and a
        # mixed point's dtypes belong to the old wrappers and config, so their reports go with them.
        self.remedies = [r for r in self.remedies if PHASES[r.step.kind] == 0]
        image_set.mark_used(self.images, [])
        self._status_before_exclude.clear()  # no statistics contain any image any more
        self.events.config_changed.emit(config)

    # ---- images ------------------------------------------------------------------------

    def add_images(self, paths: Iterable[str | os.PathLike]) -> AddImagesResult:
        """Add image files or folders; bad, missing or duplicate files come back as rejected, never raised."""
        known = {e.sha256 for e in self.images if e.status != "rejected"}
        result = image_set.probe_paths(self.preprocessor, paths, known)
        evaluation_before = [e.path for e in self.evaluation_images]
        self.images.extend(result.accepted)
        self.images.extend(result.rejected)
        if result.accepted or result.rejected:
            self._images_changed(evaluation_before)
        return result

    def probe_images(self, paths) -> AddImagesResult:
        """What add_images would accept and reject, without adding anything (for one-off evaluations)."""
        return image_set.probe_paths(self.preprocessor, paths, set())

    def remove_images(self, paths: Iterable[str | os.PathLike]) -> None:
        """Drop images (by path) from the set."""
        drop = {str(Path(p)) for p in paths}
        kept = [e for e in self.images if e.path not in drop]
        if len(kept) != len(self.images):
            evaluation_before = [e.path for e in self.evaluation_images]
            self.images = kept
            self._images_changed(evaluation_before)

    def clear_images(self) -> None:
        """Empty the image set."""
        if self.images:
            evaluation_before = [e.path for e in self.evaluation_images]
            self.images = []
            self._images_changed(evaluation_before)

    def usable_images(self) -> list[ImageEntry]:
        """The images that can be fed to the model (neither rejected nor excluded)."""
        return image_set.usable(self.images)

    def exclude_images(self, paths_or_ids) -> list[ImageEntry]:
        """Mark images (by path or image id) "excluded": listed, but left out of calibration and
        evaluation until include_images. The statistics are unchanged until the next calibrate
        (recalibrate_without does both). Excluding every usable image raises NoImagesError."""
        evaluation_before = [e.path for e in self.evaluation_images]
        chosen = self._exclude(paths_or_ids)
        if chosen:
            self._images_changed(evaluation_before)
        return chosen

    def _exclude(self, paths_or_ids) -> list[ImageEntry]:
        """exclude_images without the announcement (recalibrate_without announces once, at its end)."""
        return image_set.exclude(self.images, paths_or_ids, self._status_before_exclude)

    def include_images(self, paths_or_ids) -> list[ImageEntry]:
        """Undo exclude_images: the images become usable again ("used" if the current statistics
        still contain them, else "ok")."""
        evaluation_before = [e.path for e in self.evaluation_images]
        chosen = image_set.include(self.images, paths_or_ids, self._status_before_exclude)
        if chosen:
            self._images_changed(evaluation_before)
        return chosen

    def batches(self, entries: Sequence[ImageEntry], batch_size: int = 1):
        """Preprocessed batches of these images, each with its image ids, decoded one batch at a time."""
        # Images are decoded batch by batch so memory does not grow with the image count.
        for i in range(0, len(entries), batch_size):
            chunk = entries[i : i + batch_size]
            batch = dict(self.preprocessor([e.path for e in chunk]))
            batch["image_ids"] = [e.image_id or Path(e.path).name for e in chunk]
            yield batch

    @property
    def evaluation_images(self) -> list[ImageEntry]:
        """The usable images the analysis runs on by default (core.data.eval_set: the chosen ones, else the first few)."""
        return evaluation_entries(self.images, self.evaluation_choice)

    def set_evaluation_images(self, paths_or_ids) -> list[ImageEntry]:
        """Choose the evaluation photos by path or image id (None: back to the default); announces
        evaluation_changed. A name that is no usable image of the session raises ConfigError."""
        choice = None if paths_or_ids is None else choose_paths(self.images, paths_or_ids)
        before = [e.path for e in self.evaluation_images]
        self.evaluation_choice = choice
        now = [e.path for e in self.evaluation_images]
        if now != before:
            self.events.evaluation_changed.emit(now)
        return self.evaluation_images

    def _images_changed(self, evaluation_before: list[str]) -> None:
        """Announce a change of the image list, and of the evaluation photos when it moved them
        (removing or excluding one of them, or adding a photo while the default set is not full)."""
        self.events.images_changed.emit()
        now = [e.path for e in self.evaluation_images]
        if now != evaluation_before:
            self.events.evaluation_changed.emit(now)

    def entries_for(self, images) -> list[ImageEntry]:
        """The evaluation images when `images` is None, else the given paths probed; NoImagesError if none."""
        if images is None:
            entries = self.evaluation_images
        else:
            entries = self.probe_images(images).accepted
        if not entries:
            raise NoImagesError(None, "none of the given images can be used")
        return entries

    # ---- steps -------------------------------------------------------------------------

    def calibrate(self, progress: Progress | None = None, cancel=None, batch_size: int = 1) -> SessionCalibration:
        """Calibrate on the usable images from scratch, then freeze qparams (QUANT mode).

        A cancelled re-run puts the earlier statistics back (and keeps the earlier summary)."""
        before = self.stats_version
        try:
            result = self._calibrate(progress, cancel, batch_size)
        except BaseException:
            self._announce_if_changed(before)
            raise
        self.events.calibrated.emit(self.stats_version)
        return result

    def _announce_if_changed(self, before: int) -> None:
        """After a failed step: the statistics are gone unless the model is still in QUANT."""
        if self.state != "calibrated":
            self.stats_version = 0
        if self.stats_version != before:
            self.events.calibrated.emit(self.stats_version)

    def _calibrate(self, progress: Progress | None, cancel, batch_size: int) -> SessionCalibration:
        """calibrate without the announcement (recalibrate_without announces once, at its end)."""
        entries = self.usable_images()
        if not entries:
            raise NoImagesError(None, "the session has no usable image to calibrate on")
        batch_size = max(1, int(batch_size))
        t0 = time.perf_counter()
        total_batches = (len(entries) + batch_size - 1) // batch_size

        # A finished calibration is work already done: a cancelled re-run must not lose it.
        previous = observer_state(self.qmodel) if self.state == "calibrated" else None
        with torch.no_grad():
            res = ptq.calibrate(
                self.qmodel,
                batches_to_device(self.batches(entries, batch_size), self.device),
                progress=progress,
                cancel=cancel,
                reset=True,  # fresh statistics: calibrating twice must not merge two image sets
                total=total_batches,
            )
        batches_done, images_done, cancelled = res.batches_done, res.images_done, res.cancelled
        if cancelled and previous is not None:
            load_observer_state(self.qmodel, *previous)  # stats_version stays the earlier one's
            return SessionCalibration(batches_done, images_done, len(entries), True, time.perf_counter() - t0)
        if batches_done > 0:
            # A cancelled first run keeps what its completed batches saw (the core does too), so
            # the user can stop early on a large image set and still inspect and export.
            ptq.convert(self.qmodel)
            self._new_stats_version()
            self.last_compare = None
            image_set.mark_used(self.images, entries[:images_done])
            # New statistics contain no excluded image: including one later makes it "ok".
            self._status_before_exclude.clear()
        else:
            self.stats_version = 0
            self.last_compare = None
            image_set.mark_used(self.images, [])
            self._status_before_exclude.clear()
        self.calibration = SessionCalibration(
            batches_done, images_done, len(entries), cancelled, time.perf_counter() - t0
        )
        return self.calibration

    def recalibrate_without(
        self, paths_or_ids, progress: Progress | None = None, cancel=None, batch_size: int = 1
    ) -> SessionCalibration:
        """Exclude images (by path or image id) and calibrate again on the rest, as one action.

        A cancelled (or failed) run puts everything back: the previous statistics, state and
        calibration summary, and every image's previous status, so no work is lost.
        """
        before_status = [(e, e.status) for e in self.images]
        before_memory = dict(self._status_before_exclude)
        before_state, before_calibration, before_compare = self.state, self.calibration, self.last_compare
        before_version = self.stats_version
        before_stats = observer_state(self.qmodel)
        self._exclude(paths_or_ids)  # raises (changing nothing) when no image would remain

        def restore() -> None:
            for e, st in before_status:
                e.status = st
            self._status_before_exclude = before_memory
            if before_state == "calibrated":
                load_observer_state(self.qmodel, *before_stats)
            else:
                self.qmodel.reset_statistics()
            self.calibration, self.last_compare = before_calibration, before_compare
            self.stats_version = before_version

        try:
            res = self._calibrate(progress, cancel, batch_size)
        except BaseException:
            restore()
            self._announce_if_changed(before_version)
            raise
        if res.cancelled:
            restore()
        else:
            self.events.images_changed.emit()
        self.events.calibrated.emit(self.stats_version)
        return res

    def require_calibrated(self) -> None:
        """NotCalibratedError unless the session holds calibrated statistics."""
        if self.state != "calibrated":
            raise NotCalibratedError("the session is not calibrated yet: run calibrate first")

    def observer_table(self) -> list[ObserverRecord]:
        """One record per observer, in forward order (see core.analysis.records.ObserverRecord)."""
        return observer_table(self.qmodel)

    def evaluate(self, images=None, progress: Progress | None = None, cancel=None, keep_float=None) -> CompareResult:
        """FP vs quantized error per module on images (default: the session's), optionally with
        modules matching keep_float globs kept in float for this evaluation only."""
        self.require_calibrated()
        entries = self.entries_for(images)
        res = compare(
            self.qmodel,
            batches_to_device(self.batches(entries), self.device),
            progress=progress,
            cancel=cancel,
            keep_float=list(keep_float or []),
            total=len(entries),
        )
        self.last_compare = res
        self.events.evaluated.emit(res)
        return res

    def analyse(
        self,
        images=None,
        unit: str = "layer",
        keep_float=None,
        progress: Progress | None = None,
        cancel=None,
        on_image: Callable[[str, AnalysisResult], None] | None = None,
    ) -> AnalysisResult:
        """Per-module errors, first divergence and patch-error maps in one pass per image
        (core.analysis.analysis_pass); announces them as evaluate, locate_divergence and the maps would."""
        self.require_calibrated()
        entries = self.entries_for(images)

        def with_paths():
            for entry, batch in zip(entries, self.batches(entries)):
                yield {**batch, "paths": [str(entry.path)]}

        res = analyse(
            self.qmodel,
            batches_to_device(with_paths(), self.device),
            unit=unit,
            keep_float=list(keep_float or []),
            progress=progress,
            cancel=cancel,
            total=len(entries),
            on_image=on_image,
        )
        self.last_compare = res.compare
        self.events.evaluated.emit(res.compare)
        self.events.analysed.emit("divergence", res.divergence)
        self.events.analysed.emit("heatmaps", res.maps)
        return res

    def sensitivity(self, images=None, unit: str = "layer", progress: Progress | None = None, cancel=None) -> list[SensitivityEntry]:
        """Keep one unit (encoder layer or module kind) in float at a time; best improvement first.
        The baseline (nothing extra kept in float) is left in self.last_sensitivity_baseline."""
        self.require_calibrated()
        entries = self.entries_for(images)
        baseline, ranked = sensitivity(
            self.qmodel,
            batches_to_device(self.batches(entries), self.device),  # decoded one image at a time
            unit=unit,
            progress=progress,
            cancel=cancel,
            total=len(entries),
        )
        self.last_sensitivity_baseline = baseline
        self.events.analysed.emit("sensitivity", ranked)
        return ranked

    def export(
        self,
        out_path,
        max_soft_tokens: int | None = None,
        image=None,
        progress: Progress | None = None,
        cancel=None,
        input_dtype: str = "integer",
        in_process: bool = True,
    ) -> ExportResult:
        """Export a static integer Circle model and verify it (core.export.pipeline.export_circle).

        `in_process=False` runs the export in a child process (core.export.process) with the same
        result, so that TICO's pure-Python converter cannot starve this process's UI thread."""
        self.require_calibrated()
        mst = int(max_soft_tokens or self.max_soft_tokens)
        if image is None:
            usable = self.usable_images()
            image = usable[0].path if usable else None
        own_preprocessor = mst == self.max_soft_tokens
        options = {"max_soft_tokens": mst, "image": image, "input_dtype": input_dtype}
        if in_process:
            preprocessor = self.preprocessor if own_preprocessor else None
            result = export_circle(
                self.qmodel, out_path=out_path, progress=progress, cancel=cancel, preprocessor=preprocessor, **options
            )
        else:
            # The child rebuilds this session from a saved copy (the folder format round-trips
            # the statistics exactly); the copy is removed once the child is done.
            with tempfile.TemporaryDirectory(prefix="ptq-export-") as tmp:
                folder = self.save(Path(tmp) / "session")
                loader = partial(_load_for_export, str(folder), self.device, own_preprocessor)
                result = export_in_process(loader, out_path, progress=progress, cancel=cancel, **options)
        self.events.exported.emit(result)
        return result

    def patch_grid(self, image) -> tuple[int, int]:
        """(rows, cols) of the patches `image` makes at this session's soft tokens: what a static export is fixed to."""
        batch = self.preprocessor([image])
        return tuple(patch_layout(self.qmodel, batch["pixel_position_ids"]).grid)

    # ---- remedies (the work lives in core.remedies.apply) -----------------------------

    def apply_remedies(self, steps: Sequence[RemedyStep], progress: Progress | None = None, cancel=None) -> FixResult:
        """Apply remedy steps (smoothing -> recalibrate -> rounding -> mixed) and measure the error
        before and after on the same images. The steps run on a copy of the model that replaces
        the session's only when they all finish: a cancelled or failed run changes nothing."""
        self.require_calibrated()
        steps = tuple(steps)
        validate_plan(self.qmodel, steps)
        usable = self.usable_images()
        if not usable:
            raise NoImagesError(None, "the session has no usable image to fix with")
        # Calibration-driven remedies see the images the statistics came from.
        calib_entries = [e for e in usable if e.status == "used"] or usable
        # Before/after are measured on the evaluation set, as every other error the window shows.
        eval_entries = self.evaluation_images
        calib = list(batches_to_device(self.batches(calib_entries), self.device))
        evaluation = list(batches_to_device(self.batches(eval_entries), self.device))
        # No torch.no_grad() here: AdaRound optimises with gradients; the passes that need none disable them.
        qmodel, result, config = fix_model(self.qmodel, self.config, steps, calib, evaluation, progress=progress, cancel=cancel)
        self.qmodel, self.model, self.config = qmodel, qmodel.source, config
        self.remedies = [*self.remedies, *result.reports]
        self._new_stats_version()
        self.last_compare = result.after
        self.events.calibrated.emit(self.stats_version)
        self.events.remedied.emit(result)
        return result

    # ---- diagnostics (thin entry points; the work lives in the modules named) -----------

    def image_error_maps(self, image, progress: Progress | None = None, cancel=None):
        """Per-patch FP-vs-quant error of every module on one image (core.analysis.heatmaps)."""
        return image_error_maps(self, image, progress=progress, cancel=cancel)

    def locate_divergence(
        self, images=None, unit: str = "layer", progress: Progress | None = None, cancel=None, keep_float=None
    ):
        """The unit where the error jumps most, local vs inherited error (core.analysis.divergence);
        `keep_float`: modules kept float in the quantized runs (the Errors tab's what-if)."""
        result = locate_divergence(self, images=images, unit=unit, progress=progress, cancel=cancel, keep_float=keep_float)
        self.events.analysed.emit("divergence", result)  # as analyse() does: the Fix tab pre-fills its globs from it
        return result

    def locate_extreme(self, observer_name: str, which: str = "max"):
        """The image and patch where an observer's min or max occurred (core.analysis.provenance)."""
        return locate_extreme(self, observer_name, which)

    def rank_images(self):
        """Calibration images by how many observer extremes they set (core.analysis.provenance)."""
        return rank_images(self)

    def three_way(self, export, image=None, progress: Progress | None = None, cancel=None):
        """Torch FP vs torch fake-quant vs the Circle file, per module (core.analysis.threeway)."""
        return three_way_session(self, export, image=image, progress=progress, cancel=cancel)

    # ---- persistence (the format lives in core.session_store) ------------------------

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest describing this session (without the observers file hash)."""
        return build_manifest(self)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the session folder atomically (see core.session_store for the format)."""
        self.require_calibrated()
        return write_session(self, folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> Session:
        """Reopen a saved session in QUANT mode, without calibrating."""
        saved = read_session(folder)
        session = cls(saved.model_spec, saved.config, saved.max_soft_tokens, device=device)
        session._checkpoint_hash = saved.checkpoint_sha256
        # The remedied float and rounded weights go in before the statistics (and pins) freeze the fake-quantized weights.
        session.remedies = read_remedies(folder, saved.manifest, session.qmodel)
        try:
            load_observer_state(session.qmodel, saved.tensors, saved.provenance)
        except (KeyError, ValueError, RuntimeError) as e:
            raise session_error(saved.observers_path, f"does not fit this model/config ({one_line(e)})") from None
        session._new_stats_version()
        if saved.calibration is not None:
            try:
                session.calibration = SessionCalibration(**saved.calibration)
            except TypeError:
                session.calibration = None
        session.images = image_set.recheck_images(saved.images)
        session.evaluation_choice = saved.evaluation_images
        session.saved_manifest = saved.manifest
        session.events.calibrated.emit(session.stats_version)
        return session


def _load_for_export(folder: str, device: str, own_preprocessor: bool) -> tuple[Any, Any]:
    """(wrapped model, preprocessor or None) of a saved session: what an export child process needs."""
    session = Session.load(folder, device=device)
    return session.qmodel, (session.preprocessor if own_preprocessor else None)
