"""Session: the whole PTQ pipeline as one plain-Python object shared by the GUI and the CLI.

A session holds the model spec, the PTQ config, the calibration image set and the wrapped
model. Long steps take ``progress(done, total, message)`` and a ``core.cancel.CancelToken``.

Session folder format (``FORMAT_VERSION`` 1)::

    SESSION/
      manifest.json          format, format_version, model spec (a checkpoint folder is
                             referenced by absolute path + sha256 of its config and
                             safetensors files, never copied), PTQ config, max_soft_tokens,
                             image list (path, image id, sha256, status: ok, used,
                             excluded or rejected), package versions, observer provenance
                             (which image set each min / max, and where in its tensor: flat
                             index, shape and value; absent in older sessions, which still
                             load) and the sha256 of observers.safetensors
      observers.safetensors  every observer's statistics and frozen qparams (min / max,
                             histograms, scale, zero_point), keyed "<observer name>/<field>"

A save is atomic (core.io.staged_folder): the new folder is written next to the target under a
temporary name and swapped in with one rename; an existing session is kept until the new one is
complete, and the path never lacks a session (see core.io.replace_folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.analysis.inspect import (
    CompareResult,
    ModuleError,
    ObserverRecord,
    SensitivityEntry,
    compare,
    observer_table,
    sensitivity,
)
from core.data.device import batches_to_device, resolve_device
from core.events import SessionEvents
from core.io import atomic_write_text, file_sha256, recover_folder, staged_folder
from core.models import SPECS
from core.quant.mode import Mode

FORMAT = "ptq-studio-session"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBSERVERS = "observers.safetensors"
BUILTIN_MODELS = SPECS
# Sessions saved before the built-in models got their trained-like scales name "tiny" / "e2b"
# without an "init" entry: their statistics belong to today's "-chaotic" models.
BUILTIN_INIT = "calm-1"
PACKAGES = ("ptq-studio", "torch", "transformers", "tico", "numpy", "safetensors", "pillow")

Progress = Callable[[int, int, str], None]

__all__ = [
    "Session",
    "ImageEntry",
    "AddImagesResult",
    "SessionCalibration",
    "FORMAT_VERSION",
    "checkpoint_hash",
    "package_versions",
]


# ---------------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------------


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The files that define a checkpoint: config.json, *.safetensors and the shard index."""
    folder = Path(folder)
    files = [folder / "config.json"] if (folder / "config.json").is_file() else []
    files += sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    files += sorted(p for p in folder.glob("*.safetensors.index.json") if p.is_file())
    return files


def checkpoint_hash(folder: str | os.PathLike) -> str:
    """sha256 over the names and contents of a checkpoint's config and safetensors files."""
    h = hashlib.sha256()
    for p in checkpoint_files(folder):
        h.update(p.name.encode() + b"\0")
        h.update(file_sha256(p).encode() + b"\0")
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a session's numbers."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _errors():
    import core.errors as errors

    return errors


def _session_error(path: Path, problem: str, fix: str = "quantize again to create a new session"):
    return _errors().SessionFileError(path, f"{problem}; {fix}")


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageEntry:
    """One image of the session's set: status "ok" (accepted), "used" (calibrated on),
    "excluded" (kept in the list but left out of calibration and evaluation until included
    again) or "rejected"."""

    path: str
    image_id: str = ""
    sha256: str = ""
    status: str = "ok"
    reason: str = ""


@dataclass
class AddImagesResult:
    """What add_images accepted and rejected (with the reason)."""

    accepted: list[ImageEntry]
    rejected: list[ImageEntry]


@dataclass
class SessionCalibration:
    """Outcome of Session.calibrate."""

    batches_done: int
    images_done: int
    total_images: int
    cancelled: bool
    seconds: float


# ---------------------------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------------------------


class Session:
    """Model, config, images and wrapped model, with the pipeline's steps as methods."""

    def __init__(
        self,
        model_spec: str = "tiny",
        config=None,
        max_soft_tokens: int = 280,
        device: str = "cpu",
    ):
        from core.config import PTQConfig
        from core.data.images import ImagePreprocessor
        from core.models import describe_model, load_model

        self.model_spec = str(model_spec)
        self.config = config if config is not None else PTQConfig()
        self.max_soft_tokens = int(max_soft_tokens)
        self.device = resolve_device(device)
        self.model = load_model(self.model_spec)
        self.model_info: dict[str, Any] = dict(describe_model(self.model))
        self.preprocessor = ImagePreprocessor(self.model.config, max_soft_tokens=self.max_soft_tokens)
        self.images: list[ImageEntry] = []
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
        self._prepare()

    # ---- model -------------------------------------------------------------------------

    def _prepare(self) -> None:
        from core.ptq import prepare

        self.qmodel = prepare(self.model, self.config)
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

    def set_config(self, config) -> None:
        """Switch to a new PTQ config: re-prepares and drops the calibration."""
        self.config = config
        self._prepare()
        for e in self.images:
            if e.status == "used":
                e.status = "ok"
        self._status_before_exclude.clear()  # no statistics contain any image any more
        self.events.config_changed.emit(config)

    # ---- images ------------------------------------------------------------------------

    def add_images(self, paths: Iterable[str | os.PathLike]) -> AddImagesResult:
        """Add image files or folders; bad, missing or duplicate files come back as rejected, never raised."""
        known = {e.sha256 for e in self.images if e.status != "rejected"}
        accepted, rejected = self._probe(paths, known)
        self.images.extend(accepted)
        self.images.extend(rejected)
        if accepted or rejected:
            self.events.images_changed.emit()
        return AddImagesResult(accepted, rejected)

    def _probe(self, paths, known: set[str]) -> tuple[list[ImageEntry], list[ImageEntry]]:
        """Open paths (folders expanded); accepted / rejected entries (duplicates of `known` rejected)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        from core.data.images import LoadedImage

        known = set(known)
        accepted: list[ImageEntry] = []
        rejected: list[ImageEntry] = []
        # Each image is decoded to be checked and then dropped (only its path, id and hash are
        # kept), so memory does not grow with the image count; steps decode again when they run.
        for img in self.preprocessor.iter_load(list(paths)):
            if not isinstance(img, LoadedImage):
                rejected.append(ImageEntry(str(img.path), status="rejected", reason=_one_line(img.reason)))
            elif img.sha256 in known:
                rejected.append(ImageEntry(str(img.path), img.image_id, img.sha256, "rejected", "already in the image set"))
            else:
                known.add(img.sha256)
                accepted.append(ImageEntry(str(img.path), img.image_id, img.sha256, "ok", ""))
            del img
        return accepted, rejected

    def probe_images(self, paths) -> AddImagesResult:
        """What add_images would accept and reject, without adding anything (for one-off evaluations)."""
        return AddImagesResult(*self._probe(paths, set()))

    def remove_images(self, paths: Iterable[str | os.PathLike]) -> None:
        """Drop images (by path) from the set."""
        drop = {str(Path(p)) for p in paths}
        kept = [e for e in self.images if e.path not in drop]
        if len(kept) != len(self.images):
            self.images = kept
            self.events.images_changed.emit()

    def clear_images(self) -> None:
        """Empty the image set."""
        if self.images:
            self.images = []
            self.events.images_changed.emit()

    def usable_images(self) -> list[ImageEntry]:
        """The images that can be fed to the model (neither rejected nor excluded)."""
        return [e for e in self.images if e.status in ("ok", "used")]

    def _match_images(self, paths_or_ids) -> list[ImageEntry]:
        """The non-rejected entries named by path or image id; an unknown name raises NoImagesError."""
        if isinstance(paths_or_ids, (str, os.PathLike)):
            paths_or_ids = [paths_or_ids]
        out: list[ImageEntry] = []
        for item in paths_or_ids:
            key = str(item)
            keys = {key, str(Path(key)), _resolved(key)}
            found = [
                e for e in self.images
                if e.status != "rejected"
                and (e.image_id == key or e.path in keys or _resolved(e.path) in keys)
            ]
            if not found:
                raise _errors().UnknownImageError(key)
            out.extend(e for e in found if not any(e is o for o in out))
        return out

    def exclude_images(self, paths_or_ids) -> list[ImageEntry]:
        """Mark images (by path or image id) "excluded": listed, but left out of calibration and
        evaluation until include_images. The statistics are unchanged until the next calibrate
        (recalibrate_without does both). Excluding every usable image raises NoImagesError."""
        chosen = self._exclude(paths_or_ids)
        if chosen:
            self.events.images_changed.emit()
        return chosen

    def _exclude(self, paths_or_ids) -> list[ImageEntry]:
        """exclude_images without the announcement (recalibrate_without announces once, at its end)."""
        chosen = [e for e in self._match_images(paths_or_ids) if e.status != "excluded"]
        remaining = [e for e in self.usable_images() if not any(e is c for c in chosen)]
        if not remaining:
            raise _errors().NoImagesError(None, "excluding these would leave no image to calibrate on; keep at least one")
        for e in chosen:
            self._status_before_exclude[e.path] = e.status
            e.status = "excluded"
        return chosen

    def include_images(self, paths_or_ids) -> list[ImageEntry]:
        """Undo exclude_images: the images become usable again ("used" if the current statistics
        still contain them, else "ok")."""
        chosen = [e for e in self._match_images(paths_or_ids) if e.status == "excluded"]
        for e in chosen:
            e.status = self._status_before_exclude.pop(e.path, "ok")
        if chosen:
            self.events.images_changed.emit()
        return chosen

    def batches(self, entries: Sequence[ImageEntry], batch_size: int = 1):
        """Preprocessed batches of these images, each with its image ids, decoded one batch at a time."""
        # Images are decoded batch by batch so memory does not grow with the image count.
        for i in range(0, len(entries), batch_size):
            chunk = entries[i : i + batch_size]
            batch = dict(self.preprocessor([e.path for e in chunk]))
            batch["image_ids"] = [e.image_id or Path(e.path).name for e in chunk]
            yield batch

    def entries_for(self, images) -> list[ImageEntry]:
        """The usable images when `images` is None, else the given paths probed; NoImagesError if none."""
        if images is None:
            entries = self.usable_images()
        else:
            entries = self.probe_images(images).accepted
        if not entries:
            raise _errors().NoImagesError(None, "none of the given images can be used")
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
        from core.ptq import calibrate, convert

        entries = self.usable_images()
        if not entries:
            raise _errors().NoImagesError(None, "the session has no usable image to calibrate on")
        batch_size = max(1, int(batch_size))
        t0 = time.perf_counter()
        total_batches = (len(entries) + batch_size - 1) // batch_size

        # A finished calibration is work already done: a cancelled re-run must not lose it.
        previous = _observer_state(self.qmodel) if self.state == "calibrated" else None
        with torch.no_grad():
            res = calibrate(
                self.qmodel,
                batches_to_device(self.batches(entries, batch_size), self.device),
                progress=progress,
                cancel=cancel,
                reset=True,  # fresh statistics: calibrating twice must not merge two image sets
                total=total_batches,
            )
        batches_done, images_done, cancelled = res.batches_done, res.images_done, res.cancelled
        if cancelled and previous is not None:
            _load_observer_state(self.qmodel, *previous)  # stats_version stays the earlier one's
            return SessionCalibration(batches_done, images_done, len(entries), True, time.perf_counter() - t0)
        if batches_done > 0:
            # A cancelled first run keeps what its completed batches saw (the core does too), so
            # the user can stop early on a large image set and still inspect and export.
            convert(self.qmodel)
            self._new_stats_version()
            self.last_compare = None
            for e in self.images:
                if e.status == "used":
                    e.status = "ok"
            for e in entries[:images_done]:
                e.status = "used"
            # New statistics contain no excluded image: including one later makes it "ok".
            self._status_before_exclude.clear()
        else:
            self.stats_version = 0
            self.last_compare = None
            for e in self.images:
                if e.status == "used":
                    e.status = "ok"
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
        before_stats = _observer_state(self.qmodel)
        self._exclude(paths_or_ids)  # raises (changing nothing) when no image would remain

        def restore() -> None:
            for e, st in before_status:
                e.status = st
            self._status_before_exclude = before_memory
            if before_state == "calibrated":
                _load_observer_state(self.qmodel, *before_stats)
            else:
                for obs in self.qmodel.observers():
                    obs.reset()
                self.qmodel.ctx.mode = Mode.NO_QUANT
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
            raise _errors().NotCalibratedError("the session is not calibrated yet: run calibrate first")

    def observer_table(self) -> list[ObserverRecord]:
        """One record per observer, in forward order (see core.analysis.inspect.ObserverRecord)."""
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
        return ranked

    def export(
        self,
        out_path,
        max_soft_tokens: int | None = None,
        image=None,
        progress: Progress | None = None,
        cancel=None,
        input_dtype: str = "integer",
    ):
        """Export a static integer Circle model and verify it (core.export.pipeline.export_circle)."""
        self.require_calibrated()
        from core.export.pipeline import export_circle

        mst = int(max_soft_tokens or self.max_soft_tokens)
        if image is None:
            usable = self.usable_images()
            image = usable[0].path if usable else None
        result = export_circle(
            self.qmodel,
            out_path=out_path,
            progress=progress,
            cancel=cancel,
            max_soft_tokens=mst,
            image=image,
            preprocessor=self.preprocessor if mst == self.max_soft_tokens else None,
            input_dtype=input_dtype,
        )
        self.events.exported.emit(result)
        return result

    # ---- diagnostics (thin entry points; the work lives in the modules named) -----------

    def image_error_maps(self, image, progress: Progress | None = None, cancel=None):
        """Per-patch FP-vs-quant error of every module on one image (core.analysis.diagnostics)."""
        from core.analysis.diagnostics import image_error_maps

        return image_error_maps(self, image, progress=progress, cancel=cancel)

    def locate_divergence(self, images=None, unit: str = "layer", progress: Progress | None = None, cancel=None):
        """The unit where the error jumps most, local vs inherited error (core.analysis.diagnostics)."""
        from core.analysis.diagnostics import locate_divergence

        return locate_divergence(self, images=images, unit=unit, progress=progress, cancel=cancel)

    def locate_extreme(self, observer_name: str, which: str = "max"):
        """The image and patch where an observer's min or max occurred (core.analysis.provenance)."""
        from core.analysis.provenance import locate_extreme

        return locate_extreme(self, observer_name, which)

    def rank_images(self):
        """Calibration images by how many observer extremes they set (core.analysis.provenance)."""
        from core.analysis.provenance import rank_images

        return rank_images(self)

    def three_way(self, export, image=None, progress: Progress | None = None, cancel=None):
        """Torch FP vs torch fake-quant vs the Circle file, per module (core.analysis.threeway)."""
        from core.analysis.threeway import three_way_session

        return three_way_session(self, export, image=image, progress=progress, cancel=cancel)

    # ---- persistence -------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The JSON manifest describing this session (without the observers file hash)."""
        model: dict[str, Any] = {"spec": self.model_spec if not self.is_checkpoint else "checkpoint"}
        if self.is_checkpoint:
            folder = Path(self.model_spec).resolve()
            if self._checkpoint_hash is None:
                self._checkpoint_hash = checkpoint_hash(folder)
            model["path"] = str(folder)
            model["checkpoint_sha256"] = self._checkpoint_hash
            model["checkpoint_files"] = [p.name for p in checkpoint_files(folder)]
        else:
            model["init"] = BUILTIN_INIT
        model["info"] = _jsonable(self.model_info)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model,
            "config": _jsonable(self.config.to_dict()),
            "max_soft_tokens": self.max_soft_tokens,
            "state": self.state,
            "calibration": asdict(self.calibration) if self.calibration else None,
            "images": [asdict(e) for e in self.images],
            "packages": package_versions(),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the session folder atomically (see the module docstring for the format)."""
        from safetensors.torch import save_file

        self.require_calibrated()
        folder = Path(folder).absolute()
        parent = folder.parent
        if folder.exists() and not folder.is_dir():
            raise _errors().UnwritablePathError(folder, "a file is in the way; a session is a folder")
        if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise _errors().UnwritablePathError(folder, "the folder exists and is not a PTQ Studio session")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with staged_folder(folder) as tmp:
                tensors, provenance = _observer_state(self.qmodel)
                save_file(tensors, str(tmp / OBSERVERS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
                with open(tmp / OBSERVERS, "rb+") as f:
                    os.fsync(f.fileno())
                manifest = self.manifest()
                manifest["observers"] = {
                    "file": OBSERVERS,
                    "sha256": file_sha256(tmp / OBSERVERS),
                    "count": len(provenance),
                    "provenance": provenance,
                }
                atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        except OSError as e:
            raise _errors().UnwritablePathError(folder, e.strerror or str(e)) from None
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> Session:
        """Reopen a saved session in QUANT mode, without calibrating."""
        from safetensors import SafetensorError  # type: ignore[attr-defined]
        from safetensors.torch import load_file

        from core.config import PTQConfig

        folder = Path(folder)
        mpath = folder / MANIFEST
        # A save killed between moving the old session aside and the new one in leaves the old
        # one beside the path; put it back rather than report the session missing.
        recover_folder(folder)
        if not folder.exists():
            raise _session_error(folder, "no such session folder", "check the path")
        if not folder.is_dir():
            raise _session_error(folder, "is a file, not a session folder", "pass the folder that quantize wrote")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _session_error(mpath, "missing: this folder is not a PTQ Studio session") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _session_error(mpath, f"corrupt ({_one_line(e)})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise _session_error(mpath, "not a PTQ Studio session manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise _session_error(
                mpath, f"format version {version!r} is not supported (this PTQ Studio reads up to {FORMAT_VERSION})",
                "upgrade PTQ Studio or quantize again",
            )
        try:
            model = manifest["model"]
            spec = model["spec"]
            if spec in ("tiny", "e2b") and "init" not in model:
                spec = f"{spec}-chaotic"
            config = PTQConfig.from_dict(manifest["config"])
            mst = int(manifest["max_soft_tokens"])
            images = [ImageEntry(**e) for e in manifest.get("images", [])]
            obs_meta = manifest["observers"]
        except (KeyError, TypeError, ValueError) as e:
            raise _session_error(mpath, f"corrupt ({type(e).__name__}: {_one_line(e)})") from None
        except _errors().PTQStudioError as e:
            raise _session_error(mpath, f"invalid config ({_one_line(e)})") from None
        from core.data.images import SUPPORTED_SOFT_TOKENS

        if mst not in SUPPORTED_SOFT_TOKENS:
            raise _session_error(
                mpath, f"max_soft_tokens {mst} is not one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}"
            )
        if spec == "checkpoint":
            ckpt = Path(model.get("path", ""))
            if not ckpt.is_dir():
                raise _session_error(ckpt, f"model checkpoint referenced by {mpath} is missing", "restore it or quantize again")
            now = checkpoint_hash(ckpt)
            if now != model.get("checkpoint_sha256"):
                raise _session_error(
                    ckpt, f"model checkpoint changed since the session {folder} was saved",
                    "restore the original checkpoint or quantize again",
                )
            spec = str(ckpt)
        oname = obs_meta.get("file", OBSERVERS) if isinstance(obs_meta, dict) else None
        # A plain file name only: a manifest must not make us read (and trust) a file elsewhere.
        if not isinstance(oname, str) or not oname or Path(oname).name != oname or oname in (".", ".."):
            raise _session_error(mpath, f"observer file {oname!r} is not a file name inside the session folder")
        opath = folder / oname
        if opath.resolve().parent != folder.resolve():
            raise _session_error(opath, "links outside the session folder; the observer file must live inside it")
        if not opath.is_file():
            raise _session_error(opath, "missing")
        if file_sha256(opath) != obs_meta.get("sha256"):
            raise _session_error(opath, "corrupt (content does not match the manifest's sha256)")
        try:
            tensors = load_file(str(opath))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _session_error(opath, f"corrupt ({_one_line(e)})") from None
        session = cls(spec, config, mst, device=device)
        if spec != model.get("spec"):
            session._checkpoint_hash = model.get("checkpoint_sha256")
        try:
            _load_observer_state(session.qmodel, tensors, obs_meta.get("provenance", {}))
        except (KeyError, ValueError, RuntimeError) as e:
            raise _session_error(opath, f"does not fit this model/config ({_one_line(e)})") from None
        session._new_stats_version()
        cal = manifest.get("calibration")
        if isinstance(cal, dict):
            try:
                session.calibration = SessionCalibration(**cal)
            except TypeError:
                session.calibration = None
        session.images = _recheck_images(images)
        session.saved_manifest = manifest
        session.events.calibrated.emit(session.stats_version)
        return session


# ---------------------------------------------------------------------------------------------
# Observer state (de)serialisation
# ---------------------------------------------------------------------------------------------

def _observer_state(qmodel) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Every observer's buffers ("<observer name>/<buffer>") and its provenance (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    prov: dict[str, dict[str, Any]] = {}
    for obs in qmodel.observers():
        for key, t in obs.state_dict().items():
            tensors[f"{obs.name}/{key}"] = t.detach().cpu().contiguous().clone()
        prov[obs.name] = dict(obs.provenance())
    return tensors, prov


def _load_observer_state(qmodel, tensors: dict[str, torch.Tensor], prov: dict[str, dict[str, Any]]) -> None:
    """Put saved statistics back into a freshly prepared model and enter QUANT (no calibration)."""
    by_obs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, fld = key.rpartition("/")
        by_obs.setdefault(name, {})[fld] = t
    observers = list(qmodel.observers())
    names = [o.name for o in observers]
    missing = [n for n in names if n not in by_obs]
    if missing:
        raise KeyError(f"no statistics for observer {missing[0]}")
    extra = sorted(set(by_obs) - set(names))
    if extra:
        raise KeyError(f"statistics for an observer this model does not have: {extra[0]}")
    for obs in observers:
        state = by_obs[obs.name]
        own = obs.state_dict()
        for k, v in state.items():
            if k not in own:
                raise KeyError(f"{obs.name}: unknown field {k}")
            if own[k].shape != v.shape or own[k].dtype != v.dtype:
                raise ValueError(f"{obs.name}/{k}: saved {tuple(v.shape)} {v.dtype}, model has {tuple(own[k].shape)} {own[k].dtype}")
        obs.load_state_dict({k: v.to(own[k].device) for k, v in state.items()}, strict=True)
        obs.set_provenance(prov.get(obs.name, {}))
    qmodel.set_mode(Mode.QUANT)


def _recheck_images(images: list[ImageEntry]) -> list[ImageEntry]:
    """Mark images that vanished or changed since the save as rejected (the rest stay usable)."""
    out = []
    for e in images:
        if e.status != "rejected":
            p = Path(e.path)
            if not p.is_file():
                e = ImageEntry(e.path, e.image_id, e.sha256, "rejected", "missing since the session was saved")
            elif e.sha256 and file_sha256(p) != e.sha256:
                e = ImageEntry(e.path, e.image_id, e.sha256, "rejected", "changed since the session was saved")
        out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return path


def _one_line(e) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)
