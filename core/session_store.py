"""The session folder format: manifest, observer statistics, save, load and old-session compatibility.

Session folder format (``FORMAT_VERSION`` 1)::

    SESSION/
      manifest.json          format, format_version, model spec (a checkpoint folder is
                             referenced by absolute path + sha256 of its config and
                             safetensors files, never copied), PTQ config, max_soft_tokens,
                             image list (path, image id, sha256, status: ok, used,
                             excluded or rejected), the evaluation images (paths, or
                             null for the default; absent in older sessions, which load
                             with the default), package versions, observer provenance
                             (which image set each min / max, and where in its tensor: flat
                             index, shape and value; absent in older sessions, which still
                             load) and the sha256 of observers.safetensors
      observers.safetensors  every observer's statistics and frozen qparams (min / max,
                             histograms, scale, zero_point), keyed "<observer name>/<field>"
      remedies.json          only when remedies were applied (manifest "remedies" names it and
                             its sha256): the plan, each step's report, the changed parameters
      remedied_weights.safetensors  the float parameters the remedies changed (their qualified
                             names in the HF vision model), loaded over the model's own weights,
                             and the rounded weights of GPTQ / AdaRound under "rounded:<wrapper
                             name>" (absent in older sessions, which still load)

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
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError  # type: ignore[attr-defined]

from core.config import PTQConfig
from core.data.eval_set import saved_paths
from core.data.image_set import ImageEntry
from core.data.images import SUPPORTED_SOFT_TOKENS
from core.errors import PTQStudioError, SessionFileError, UnwritablePathError, one_line
from core.io import atomic_write_text, file_sha256, json_safe, recover_folder, staged_folder
from core.quant.mode import Mode
from core.remedies.apply import changed_parameters
from core.remedies.plan import RemedyReport, plan_to_json

FORMAT = "ptq-studio-session"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBSERVERS = "observers.safetensors"
REMEDIES = "remedies.json"
REMEDIED_WEIGHTS = "remedied_weights.safetensors"
ROUNDED_PREFIX = "rounded:"  # remedied_weights keys of the rounded weights (wrapper names follow)
# Sessions saved before the built-in models got their trained-like scales name "tiny" / "e2b"
# without an "init" entry: their statistics belong to today's "-chaotic" models.
BUILTIN_INIT = "calm-1"
PACKAGES = ("ptq-studio", "torch", "transformers", "tico", "numpy", "safetensors", "pillow")


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
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def session_error(path: Path, problem: str, fix: str = "quantize again to create a new session") -> SessionFileError:
    """The SessionFileError for a problem with one file of a session folder."""
    return SessionFileError(path, f"{problem}; {fix}")


# ---------------------------------------------------------------------------------------------
# Observer statistics
# ---------------------------------------------------------------------------------------------


def observer_state(qmodel) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Every observer's buffers ("<observer name>/<buffer>") and its provenance (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    prov: dict[str, dict[str, Any]] = {}
    for obs in qmodel.observers():
        for key, t in obs.state_dict().items():
            tensors[f"{obs.name}/{key}"] = t.detach().cpu().contiguous().clone()
        prov[obs.name] = dict(obs.provenance())
    return tensors, prov


def load_observer_state(qmodel, tensors: dict[str, torch.Tensor], prov: dict[str, dict[str, Any]]) -> None:
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


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def build_manifest(session) -> dict[str, Any]:
    """The JSON manifest describing a Session (without the observers file hash)."""
    model: dict[str, Any] = {"spec": session.model_spec if not session.is_checkpoint else "checkpoint"}
    if session.is_checkpoint:
        folder = Path(session.model_spec).resolve()
        model["path"] = str(folder)
        model["checkpoint_sha256"] = session.checkpoint_sha256()
        model["checkpoint_files"] = [p.name for p in checkpoint_files(folder)]
    else:
        model["init"] = BUILTIN_INIT
    model["info"] = json_safe(session.model_info)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model,
        "config": json_safe(session.config.to_dict()),
        "max_soft_tokens": session.max_soft_tokens,
        "state": session.state,
        "calibration": asdict(session.calibration) if session.calibration else None,
        "images": [asdict(e) for e in session.images],
        "evaluation_images": list(session.evaluation_choice) if session.evaluation_choice else None,
        "packages": package_versions(),
    }


def write_session(session, folder: str | os.PathLike) -> Path:
    """Write a calibrated Session's folder atomically (see the module docstring for the format)."""
    folder = Path(folder).absolute()
    parent = folder.parent
    if folder.exists() and not folder.is_dir():
        raise UnwritablePathError(folder, "a file is in the way; a session is a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise UnwritablePathError(folder, "the folder exists and is not a PTQ Studio session")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(folder) as tmp:
            tensors, provenance = observer_state(session.qmodel)
            safetensors.torch.save_file(tensors, str(tmp / OBSERVERS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
            with open(tmp / OBSERVERS, "rb+") as f:
                os.fsync(f.fileno())
            manifest = build_manifest(session)
            remedies = write_remedies(session, tmp)
            if remedies is not None:
                manifest["remedies"] = remedies
            manifest["observers"] = {
                "file": OBSERVERS,
                "sha256": file_sha256(tmp / OBSERVERS),
                "count": len(provenance),
                "provenance": provenance,
            }
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    except OSError as e:
        raise UnwritablePathError(folder, e.strerror or str(e)) from None
    return folder


def write_remedies(session, folder: Path) -> dict[str, Any] | None:
    """Write remedies.json and remedied_weights.safetensors into `folder`; their manifest entry (None: no remedies)."""
    reports = list(getattr(session, "remedies", []) or [])
    if not reports:
        return None
    names = changed_parameters(reports)
    params = dict(session.model.named_parameters())
    tensors = {name: params[name].detach().cpu().contiguous().clone() for name in names}
    for name, weight in session.qmodel.rounded_weights().items():
        tensors[ROUNDED_PREFIX + name] = weight.detach().cpu().contiguous().clone()
    safetensors.torch.save_file(tensors, str(folder / REMEDIED_WEIGHTS), metadata={"format": FORMAT})
    doc = {"plan": plan_to_json([r.step for r in reports]), "reports": [r.to_json() for r in reports], "parameters": names}
    atomic_write_text(folder / REMEDIES, json.dumps(json_safe(doc), indent=2) + "\n")
    return {
        "file": REMEDIES,
        "sha256": file_sha256(folder / REMEDIES),
        "weights": REMEDIED_WEIGHTS,
        "weights_sha256": file_sha256(folder / REMEDIED_WEIGHTS),
        "steps": [r.step.kind for r in reports],
    }


def read_remedies(folder: str | os.PathLike, manifest: dict[str, Any], qmodel) -> list[RemedyReport]:
    """The saved remedies' reports, their float and rounded weights loaded into the wrapped model
    `qmodel` (nothing for older sessions); load the observer state after it, which brings the pins."""
    meta = manifest.get("remedies")
    if meta is None:
        return []
    folder = Path(folder)
    fix = "save the session again from the PTQ Studio that fixed it, or quantize and fix again"
    if not isinstance(meta, dict):
        raise session_error(folder / MANIFEST, "corrupt (its remedies entry is not a mapping)", fix)
    rpath = _session_member(folder, meta.get("file"), meta.get("sha256"), fix)
    wpath = _session_member(folder, meta.get("weights"), meta.get("weights_sha256"), fix)
    try:
        doc = json.loads(rpath.read_text(encoding="utf-8"))
        reports = [RemedyReport.from_json(r) for r in doc["reports"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, PTQStudioError) as e:
        raise session_error(rpath, f"corrupt ({one_line(e)})", fix) from None
    try:
        tensors = safetensors.torch.load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise session_error(wpath, f"corrupt ({one_line(e)})", fix) from None
    rounded = {k.removeprefix(ROUNDED_PREFIX): tensors.pop(k) for k in [k for k in tensors if k.startswith(ROUNDED_PREFIX)]}
    params = dict(qmodel.source.named_parameters())
    for name, t in tensors.items():
        own = params.get(name)
        if own is None or own.shape != t.shape or own.dtype != t.dtype:
            found = "no such parameter" if own is None else f"model has {tuple(own.shape)} {own.dtype}"
            raise session_error(wpath, f"does not fit this model ({name}: saved {tuple(t.shape)} {t.dtype}, {found})", fix)
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device))
    try:
        qmodel.load_rounded_weights(rounded)
    except PTQStudioError as e:
        raise session_error(wpath, f"does not fit this model ({one_line(e)})", fix) from None
    return reports


def _session_member(folder: Path, name: Any, sha256: Any, fix: str = "quantize again to create a new session") -> Path:
    """A file the manifest names inside the session folder, checked against its sha256."""
    # A plain file name only: a manifest must not make us read (and trust) a file elsewhere.
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise session_error(folder / MANIFEST, f"names {name!r}, which is not a file name inside the session folder", fix)
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise session_error(path, "links outside the session folder; the file must live inside it", fix)
    if not path.is_file():
        raise session_error(path, "missing", fix)
    if file_sha256(path) != sha256:
        raise session_error(path, "corrupt (content does not match the manifest's sha256)", fix)
    return path


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


@dataclass
class SessionFile:
    """A session folder read and checked, ready to become a Session."""

    manifest: dict[str, Any]
    model_spec: str  # a built-in spec or the checkpoint folder
    checkpoint_sha256: str | None
    config: PTQConfig
    max_soft_tokens: int
    images: list[ImageEntry]
    calibration: dict[str, Any] | None
    evaluation_images: list[str] | None  # the chosen evaluation photos' paths; None: the default
    observers_path: Path
    tensors: dict[str, torch.Tensor]
    provenance: dict[str, dict[str, Any]]


def read_session(folder: str | os.PathLike) -> SessionFile:
    """Read and verify a session folder (manifest, checkpoint hash, observer file hash)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    # A save killed between moving the old session aside and the new one in leaves the old
    # one beside the path; put it back rather than report the session missing.
    recover_folder(folder)
    if not folder.exists():
        raise session_error(folder, "no such session folder", "check the path")
    if not folder.is_dir():
        raise session_error(folder, "is a file, not a session folder", "pass the folder that quantize wrote")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise session_error(mpath, "missing: this folder is not a PTQ Studio session") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise session_error(mpath, f"corrupt ({one_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise session_error(mpath, "not a PTQ Studio session manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise session_error(
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
        raise session_error(mpath, f"corrupt ({type(e).__name__}: {one_line(e)})") from None
    except PTQStudioError as e:
        raise session_error(mpath, f"invalid config ({one_line(e)})") from None
    if mst not in SUPPORTED_SOFT_TOKENS:
        raise session_error(mpath, f"max_soft_tokens {mst} is not one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")
    ckpt_sha = None
    if spec == "checkpoint":
        ckpt = Path(model.get("path", ""))
        if not ckpt.is_dir():
            raise session_error(ckpt, f"model checkpoint referenced by {mpath} is missing", "restore it or quantize again")
        ckpt_sha = model.get("checkpoint_sha256")
        if checkpoint_hash(ckpt) != ckpt_sha:
            raise session_error(
                ckpt, f"model checkpoint changed since the session {folder} was saved",
                "restore the original checkpoint or quantize again",
            )
        spec = str(ckpt)
    opath, tensors = _read_observers(folder, mpath, obs_meta)
    cal = manifest.get("calibration")
    return SessionFile(
        manifest=manifest,
        model_spec=spec,
        checkpoint_sha256=ckpt_sha,
        config=config,
        max_soft_tokens=mst,
        images=images,
        calibration=cal if isinstance(cal, dict) else None,
        evaluation_images=saved_paths(manifest.get("evaluation_images")),
        observers_path=opath,
        tensors=tensors,
        provenance=obs_meta.get("provenance", {}),
    )


def _read_observers(folder: Path, mpath: Path, obs_meta) -> tuple[Path, dict[str, torch.Tensor]]:
    """The observer file the manifest names, checked against its sha256, and its tensors."""
    oname = obs_meta.get("file", OBSERVERS) if isinstance(obs_meta, dict) else None
    opath = _session_member(folder, oname, obs_meta.get("sha256") if isinstance(obs_meta, dict) else None)
    try:
        return opath, safetensors.torch.load_file(str(opath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise session_error(opath, f"corrupt ({one_line(e)})") from None
