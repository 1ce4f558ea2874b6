"""`ptq-studio` command line: quantize, report, export, sensitivity, and the diagnostics commands
images, locate, recalibrate, ab (core.cli.diag). The console script's launcher
(ptq_studio.launcher) opens the GUI when given no argument; here no argument is a usage error.

Exit codes: 0 success; 2 user error (bad arguments, no usable image, unreadable session,
unwritable output), one line on stderr; 1 internal failure (short message; --debug shows the
traceback). With --json exactly one JSON document goes to stdout. What libraries print while
a command runs is held aside and shown on stderr after a success (or with --debug), so an
error stays one line. Progress is drawn on stderr only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "ptq-studio"
DTYPES = ("uint8", "int8", "int16", "uint4", "int4")
OBSERVERS = ("minmax", "ema", "percentile")


class UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage)
        raise UsageError(f"{PROG}: error: {message} (see {self.prog} --help)")


def count(minimum: int):
    """An argparse type: an integer of at least `minimum` (a negative --top would slice from the end)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = "count"  # argparse names the type in its message
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(prog=PROG, description="Post-training quantization of the Gemma 4 vision encoder.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def common(sp):
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        sp.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
        sp.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")

    q = sub.add_parser("quantize", help="calibrate a model on images and save a session")
    q.add_argument("--model", default="tiny", help="tiny | e2b | tiny-chaotic | e2b-chaotic | checkpoint folder (default tiny)")
    q.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    q.add_argument("--out", required=True, metavar="SESSION", help="session folder to write")
    q.add_argument("--max-soft-tokens", type=int, default=280, metavar="N", help="soft tokens per image (default 280)")
    q.add_argument("--activation", default="uint8", choices=DTYPES, help="activation dtype (default uint8)")
    q.add_argument("--weight", default="uint8", choices=DTYPES, help="weight dtype (default uint8)")
    q.add_argument("--observer", default="minmax", choices=OBSERVERS, help="observer (default minmax)")
    q.add_argument("--keep-float", nargs="+", default=[], metavar="GLOB", help="modules kept in float")
    q.add_argument("--batch-size", type=count(1), default=1, metavar="N", help="images per calibration batch")
    common(q)

    r = sub.add_parser("report", help="observer ranges and FP-vs-quantized errors of a session")
    r.add_argument("session", metavar="SESSION")
    r.add_argument("--images", nargs="+", metavar="PATH", help="evaluate on these images (default: calibration set)")
    r.add_argument("--plots", metavar="DIR", help="write PNG charts into DIR")
    r.add_argument("--keep-float", nargs="+", default=[], metavar="GLOB", help="what-if: keep these in float")
    r.add_argument("--top", type=count(1), default=15, metavar="N", help="rows of the worst-modules table")
    r.add_argument("--histograms", action="store_true", help="include histograms in --json")
    r.add_argument(
        "--divergence", default="layer", choices=("layer", "module", "off"),
        help="locate the first divergence per encoder layer (default) or per module, or skip it",
    )
    common(r)

    e = sub.add_parser("export", help="export a session to a verified integer Circle model")
    e.add_argument("session", metavar="SESSION")
    e.add_argument("--out", required=True, metavar="FILE.circle")
    e.add_argument("--max-soft-tokens", type=int, default=None, metavar="N")
    e.add_argument(
        "--three-way", action="store_true",
        help="also compare torch float, torch fake-quant and the Circle file per module",
    )
    e.add_argument(
        "--input", dest="input_dtype", default="integer", choices=("integer", "float"),
        help="graph input: integer pixels with qparams (default; feed round(x / scale) + zp) "
        "or float32 followed by a QUANTIZE op",
    )
    common(e)

    s = sub.add_parser("sensitivity", help="keep one layer / module kind in float at a time, rank them")
    s.add_argument("session", metavar="SESSION")
    s.add_argument("--images", nargs="+", required=True, metavar="PATH")
    s.add_argument("--unit", default="layer", choices=("layer", "kind"), help="what to keep in float (default layer)")
    common(s)

    from core.cli.diag import add_parsers

    add_parsers(sub, common)
    return p


# ---------------------------------------------------------------------------------------------
# progress and output
# ---------------------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream):
        self.stream = stream
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 28
        frac = done / total if total else 0.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        self.stream.write(f"\r[{bar}] {done}/{total} {message[:60]:<60}")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the progress line."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


class _Channels:
    """While a command runs, what libraries write to fd 1 and fd 2 is held aside.

    C libraries (libtiff, for one) print their own warnings straight to fd 2; a user error must
    still come out as one line. The held text is shown after a successful run, or with --debug.
    """

    def __init__(self):
        self.noise = tempfile.TemporaryFile()
        self.err = sys.stderr
        self._saved: list[tuple[int, int]] = []

    def __enter__(self) -> "_Channels":
        sys.stdout.flush()
        sys.stderr.flush()
        fds = (1, 2)  # our own output is written after the command, to the real streams
        try:
            for fd in fds:
                self._saved.append((fd, os.dup(fd)))
                os.dup2(self.noise.fileno(), fd)
        except OSError:  # no real file descriptors (embedded interpreter): leave the streams alone
            self._restore()
            return self
        saved_err = dict(self._saved).get(2)
        self.err = os.fdopen(os.dup(saved_err), "w", encoding="utf-8", errors="replace") if saved_err else sys.stderr
        # Python-level streams too: they may not be fd 1/2 (pytest's capture, IDE consoles).
        self._streams = (sys.stdout, sys.stderr)
        self._held_stream = os.fdopen(os.dup(self.noise.fileno()), "w", encoding="utf-8", errors="replace")
        sys.stderr = sys.stdout = self._held_stream
        return self

    def _restore(self) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if getattr(self, "_streams", None):
            sys.stdout, sys.stderr = self._streams
            self._streams = None
            self._held_stream.close()
        for fd, saved in reversed(self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
        if self.err is not sys.stderr:
            self.err.flush()
            self.err.close()
            self.err = sys.stderr

    def held(self) -> str:
        """What the libraries wrote meanwhile."""
        self.noise.seek(0)
        text = self.noise.read().decode("utf-8", errors="replace")
        self.noise.close()
        return text


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _images_dict(accepted, rejected) -> dict[str, Any]:
    return {
        "accepted": [{"path": e.path, "image_id": e.image_id, "sha256": e.sha256} for e in accepted],
        "rejected": [{"path": e.path, "reason": e.reason} for e in rejected],
    }


def _rejected_text(rejected) -> str:
    return "\n".join(f"rejected: {e.path}: {e.reason}" for e in rejected)


# ---------------------------------------------------------------------------------------------
# commands: each returns (json document, human text)
# ---------------------------------------------------------------------------------------------


def _no_images_error(rejected):
    from core.errors import NoImagesError

    if rejected:
        first = rejected[0]
        more = f"; {len(rejected) - 1} more rejected" if len(rejected) > 1 else ""
        return NoImagesError(None, f"{first.path}: {first.reason}{more}")
    return NoImagesError(None, "no image paths were given")


def check_output(path: str | Path, flag: str, kind: str = "file") -> Path:
    """Refuse an output that cannot be written, before any work starts; nothing is created yet.

    kind "file": a file whose folder may be missing (it is created when written, see
    ensure_parent); "folder": a folder written into; "session": a folder that replaces itself
    atomically, so its parent must be writable. Missing folders count as writable when the
    nearest existing one is.
    """
    from core.errors import UnwritablePathError

    path = Path(path)
    if kind == "file" and path.is_dir():
        raise UnwritablePathError(path, f"it is a folder; {flag} names a file")
    if kind != "file" and path.exists() and not path.is_dir():
        raise UnwritablePathError(path, f"a file is in the way; {flag} names a folder")
    folder = path.absolute() if kind == "folder" else path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UnwritablePathError(path, f"{folder} is a file, not a writable folder")
    try:
        # A real write, not os.access: root passes every access check, even on a read-only mount.
        with tempfile.TemporaryFile(dir=folder, prefix=".ptq-write-check-"):
            pass
    except OSError as e:
        raise UnwritablePathError(path, f"{folder} is not writable: {e.strerror or e}") from None
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise UnwritablePathError(path, "the existing file is read-only")
    return path


def ensure_parent(path: str | Path) -> Path:
    """Create the missing folders above an output file (every command does, as quantize always has)."""
    from core.errors import UnwritablePathError

    path = Path(path)
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnwritablePathError(path, e.strerror or str(e)) from None
    return path


def _check_soft_tokens(n: int | None, flag: str = "--max-soft-tokens") -> None:
    from core.data.images import SUPPORTED_SOFT_TOKENS
    from core.errors import ConfigError

    if n is not None and n not in SUPPORTED_SOFT_TOKENS:
        raise ConfigError(f"{flag} {n} is not supported; use one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")


def cmd_quantize(args, progress) -> tuple[dict, str]:
    """Load, add images, calibrate, save."""
    from core.config import PTQConfig, QuantSpec
    from core.errors import UnwritablePathError
    from core.session import MANIFEST, Session

    out = check_output(args.out, "--out", kind="session")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UnwritablePathError(out, "the folder exists and is not a PTQ Studio session; pick a new --out")
    _check_soft_tokens(args.max_soft_tokens)
    config = PTQConfig(
        activation=QuantSpec(dtype=args.activation),
        weight=QuantSpec(dtype=args.weight, per_channel=True),
        observer=args.observer,
    )
    if args.keep_float:
        config = config.with_keep_float(args.keep_float)
    t0 = time.perf_counter()
    session = Session(args.model, config, args.max_soft_tokens, device=args.device)
    session.config.check_globs(module_names(session), "--keep-float")
    added = session.add_images(args.images)
    if not added.accepted:
        raise _no_images_error(added.rejected)
    cal = session.calibrate(progress=progress, batch_size=args.batch_size)
    progress.close()
    if cal.cancelled:
        from core.errors import CancelledError

        raise CancelledError("calibration cancelled; no session was written")
    saved = session.save(out)
    records = session.observer_table()
    doc = {
        "command": "quantize",
        "session": str(saved),
        "model": session.model_info,
        "model_spec": session.model_spec,
        "config": session.config.to_dict(),
        "max_soft_tokens": session.max_soft_tokens,
        "device": session.device,
        "images": _images_dict(added.accepted, added.rejected),
        "calibration": {
            "batches_done": cal.batches_done,
            "images_done": cal.images_done,
            "total_images": cal.total_images,
            "seconds": cal.seconds,
        },
        "observers": {
            "count": len(records),
            "with_stats": sum(r.has_stats for r in records),
            "outliers": [r.name for r in records if r.outlier],
        },
        "seconds": time.perf_counter() - t0,
    }
    text = "\n".join(
        filter(
            None,
            [
                _rejected_text(added.rejected),
                f"model {session.model_spec}: {session.model_info.get('parameters', '?')} parameters, "
                f"{session.model_info.get('layers', '?')} layers",
                f"calibrated on {cal.images_done} image(s) in {cal.seconds:.1f} s "
                f"({len(added.rejected)} rejected); {len(records)} observers, "
                f"{len(doc['observers']['outliers'])} flagged as outlier-dominated",
                f"session saved to {saved}",
            ],
        )
    )
    return doc, text


def report_document(
    session, compare_result, plots: list[str] | None = None, histograms: bool = False, divergence=None
) -> dict:
    """The JSON report of a session (shared by the CLI and the tests)."""
    records = session.observer_table()
    return {
        "command": "report",
        "model": session.model_info,
        "model_spec": session.model_spec,
        "config": session.config.to_dict(),
        "max_soft_tokens": session.max_soft_tokens,
        "divergence": divergence.to_dict() if divergence is not None else None,
        "observers": [r.to_dict(histogram=histograms) for r in records],
        "errors": compare_result.to_dict(),
        "plots": plots or [],
    }


class _HeatmapWriter:
    """Writes heatmap_<image stem>.png of the final output for each image it is handed."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.used: set[str] = set()
        self.written: list[dict] = []

    def __call__(self, maps) -> None:
        from core.analysis.heatmaps import MODEL
        from core.cli.charts import heatmap_file_name, write_heatmap

        if MODEL not in maps.rows:
            return
        hm = maps.heatmap(MODEL)
        png = write_heatmap(self.folder / heatmap_file_name(maps.path or maps.image_id, self.used), hm)
        self.written.append({"image_id": maps.image_id, "path": maps.path, "png": str(png), **hm.to_dict()})


def _load(path, device):
    from core.session import Session

    return Session.load(path, device=device)


def module_names(session) -> list[str]:
    """The module names a glob of this session's model can match."""
    from core.analysis.abtest import owner_modules

    return owner_modules(session.qmodel)


def cmd_report(args, progress) -> tuple[dict, str]:
    """Ranges and errors (and optional plots) of a saved session."""
    t0 = time.perf_counter()
    if args.plots:
        check_output(args.plots, "--plots", kind="folder")
    session = _load(args.session, args.device)
    if args.keep_float:
        from core.config import check_globs

        check_globs(args.keep_float, module_names(session), "module", "--keep-float")
    rejected = []
    if args.images:
        probe = session.probe_images(args.images)
        rejected = probe.rejected
        if not probe.accepted:
            raise _no_images_error(rejected)
        images = [e.path for e in probe.accepted]
    else:
        images = None
        if not session.usable_images():
            from core.errors import NoImagesError

            raise NoImagesError(args.session, "no calibration image is still on disk unchanged; pass --images")
    res = session.evaluate(images=images, progress=progress, keep_float=args.keep_float)
    progress.close()
    plots = []
    heatmaps = _HeatmapWriter(args.plots) if args.plots else None
    divergence = None
    if args.divergence != "off":
        from core.analysis.divergence import locate_divergence

        # The search runs the float and quantized passes the final-output heatmaps need.
        divergence = locate_divergence(
            session, images=images, unit=args.divergence, progress=progress, keep_float=args.keep_float, on_image=heatmaps
        )
        progress.close()
    elif heatmaps is not None:
        from core.analysis.heatmaps import image_error_maps

        for entry in session.entries_for(images):
            heatmaps(image_error_maps(session, entry, progress=progress))
        progress.close()
    if args.plots:
        from core.cli.charts import write_report_plots

        plots = [str(p) for p in write_report_plots(args.plots, session.observer_table(), res)]
        plots += [h["png"] for h in heatmaps.written]
    doc = report_document(session, res, plots, histograms=args.histograms, divergence=divergence)
    doc["heatmaps"] = heatmaps.written if heatmaps is not None else []
    doc["session"] = str(args.session)
    doc["images"] = _images_dict([], rejected) | {"evaluated": res.images}
    doc["seconds"] = time.perf_counter() - t0
    records = session.observer_table()
    obs_rows = [
        [r.name, r.kind[:3], r.dtype, r.range_min, r.range_max,
         (r.scale if not r.per_channel else "per-ch"),
         (r.zero_point if not r.per_channel else "-"), r.max_source or "-", "OUTLIER" if r.outlier else ""]
        for r in records
    ]
    e2e = res.end_to_end
    worst = res.worst(args.top)
    text = "\n".join(
        filter(
            None,
            [
                _rejected_text(rejected),
                divergence.summary_line() if divergence is not None else "",
                f"Observers ({len(records)})",
                _table(obs_rows, ["observer", "kind", "dtype", "min", "max", "scale", "zp", "max set by", ""]),
                "",
                f"Errors on {len(res.images)} image(s)"
                + (f", keeping {', '.join(res.keep_float)} in float" if res.keep_float else ""),
                _table(
                    [[m.name, m.kind, m.peir, m.sqnr_db, m.cosine, m.clipped_fraction, m.max_abs] for m in res.modules],
                    ["module", "kind", "PEIR", "SQNR dB", "cosine", "clipped", "max abs"],
                ),
                "",
                f"Worst {len(worst)} modules by SQNR: " + ", ".join(f"{m.name} ({_fmt(m.sqnr_db)} dB)" for m in worst),
                f"End to end: PEIR {_fmt(e2e.peir)}, SQNR {_fmt(e2e.sqnr_db)} dB, cosine {_fmt(e2e.cosine)}, "
                f"max abs {_fmt(e2e.max_abs)}",
                ("Plots: " + ", ".join(plots)) if plots else "",
            ],
        )
    )
    return doc, text


def cmd_export(args, progress) -> tuple[dict, str]:
    """Export and verify a Circle model from a saved session."""
    out = check_output(args.out, "--out")
    _check_soft_tokens(args.max_soft_tokens)
    session = _load(args.session, args.device)
    res = session.export(ensure_parent(out), max_soft_tokens=args.max_soft_tokens, progress=progress, input_dtype=args.input_dtype)
    progress.close()
    doc = {"command": "export", "session": str(args.session), **_export_dict(res)}
    three = None
    if getattr(args, "three_way", False):
        three = session.three_way(res, progress=progress)
        progress.close()
        doc["three_way"] = _clean_json(three.to_dict())
    v = doc.get("verify") or {}
    text = "\n".join(
        [
            f"wrote {doc.get('path')} ({doc.get('bytes')} bytes) in {_fmt(doc.get('seconds'))} s",
            "ops: " + ", ".join(f"{k} x{n}" for k, n in sorted((doc.get("op_counts") or {}).items())),
            f"tensors without qparams: {len(doc.get('tensors_without_qparams') or [])} (graph input and output included)",
            *(res.io_tensors or []),
            f"verify ({v.get('runtime', '?')}): max abs diff {_fmt(v.get('max_abs_diff'))}, PEIR {_fmt(v.get('peir'))}, "
            f"{100 * float(v.get('within_one_step') or 0):.2f}% of outputs within one step, "
            f"at most {_fmt(v.get('max_steps'))} steps",
            _verdict_line(v.get("verdict")),
            *([res.verify.onert.summary()] if res.verify is not None and res.verify.onert is not None else []),
            *([f"unquantized: {t} (module {m})" for t, m in (res.unquantized or [])][:20]),
            *(three.summary_lines() if three is not None else []),
        ]
    )
    return doc, text


def _verdict_line(verdict: dict | None) -> str:
    """The export verdict as one line (core.export.verdict: judged against this machine's rounding noise)."""
    if not verdict:
        return "verdict: not verified"
    line = f"verdict: {verdict['level'].upper()}: {verdict['summary']}"
    if verdict.get("reason"):
        line += f"; {verdict['reason']}. Next: {verdict['advice']}"
    return line


def _export_dict(res) -> dict:
    import dataclasses

    if dataclasses.is_dataclass(res):
        d = dataclasses.asdict(res)
    elif hasattr(res, "to_dict"):
        d = res.to_dict()
    else:
        d = dict(vars(res))
    return _clean_json(d)


def cmd_sensitivity(args, progress) -> tuple[dict, str]:
    """Rank layers (or module kinds) by how much keeping them in float helps end to end."""
    t0 = time.perf_counter()
    session = _load(args.session, args.device)
    probe = session.probe_images(args.images)
    if not probe.accepted:
        raise _no_images_error(probe.rejected)
    ranked = session.sensitivity(images=[e.path for e in probe.accepted], unit=args.unit, progress=progress)
    progress.close()
    base = session.last_sensitivity_baseline
    doc = {
        "command": "sensitivity",
        "session": str(args.session),
        "unit": args.unit,
        "images": _images_dict(probe.accepted, probe.rejected),
        "baseline": base.to_dict() if base is not None else None,
        "ranking": [e.to_dict() for e in ranked],
        "seconds": time.perf_counter() - t0,
    }
    text = "\n".join(
        filter(
            None,
            [
                _rejected_text(probe.rejected),
                f"Baseline end to end: SQNR {_fmt(base.sqnr_db)} dB, PEIR {_fmt(base.peir)}" if base else "",
                _table(
                    [[e.name, e.improvement_db, e.sqnr_db, e.peir] for e in ranked],
                    [f"{args.unit} kept in float", "gain dB", "SQNR dB", "PEIR"],
                ),
            ],
        )
    )
    return doc, text


COMMANDS = {"quantize": cmd_quantize, "report": cmd_report, "export": cmd_export, "sensitivity": cmd_sensitivity}


def _commands() -> dict:
    from core.cli.diag import COMMANDS as DIAG

    return {**DIAG, **COMMANDS}


def _clean_json(x):
    """JSON-safe copy: inf/nan -> null, numpy/torch/Path -> plain types."""
    if isinstance(x, dict):
        return {str(k): _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return _clean_json(x.tolist())
    if hasattr(x, "item"):
        return _clean_json(x.item())
    return str(x)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ptq-studio")
    except metadata.PackageNotFoundError:
        return "unknown"


def _error_document(command: str | None, kind: str, message: str, exit_code: int) -> str:
    # With --json a script reads stdout only: it gets one document there, also on failure.
    doc = {"command": command, "error": {"type": kind, "message": message, "exit_code": exit_code}}
    return json.dumps(doc, indent=2) + "\n"


def _fail(as_json: bool, command: str | None, kind: str, line: str, message: str, code: int) -> int:
    print(line, file=sys.stderr)
    if as_json:
        sys.stdout.write(_error_document(command, kind, message, code))
        sys.stdout.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The headless command line (ptq_studio.launcher calls it for any argument list)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    wants_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        command = next((a for a in argv if not a.startswith("-")), None)
        return _fail(wants_json, command, "UsageError", str(e), str(e).removeprefix(f"{PROG}: error: "), 2)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.version:
        print(f"{PROG} {_version()}")
        return 0
    if not args.command:
        message = (
            "choose a command: quantize, report, export, sensitivity, images, locate, recalibrate, ab "
            f"(see {PROG} --help)"
        )
        return _fail(wants_json, None, "UsageError", f"{PROG}: {message}", message, 2)
    channels = _Channels()
    progress = None
    try:
        import torch

        with channels, torch.no_grad():
            progress = _Progress(channels.err)
            doc, text = _commands()[args.command](args, progress)
            progress.close()
        sys.stderr.write(channels.held())
        if args.json:
            sys.stdout.write(json.dumps(_clean_json(doc), indent=2, allow_nan=False) + "\n")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return 0
    except KeyboardInterrupt:
        return _fail(args.json, args.command, "KeyboardInterrupt", f"{PROG}: interrupted", "interrupted", 130)
    except Exception as e:
        from core.errors import PTQStudioError

        if progress is not None and progress._shown:
            sys.stderr.write("\n")
        held = channels.held() if not channels.noise.closed else ""
        if debug:
            sys.stderr.write(held)
            traceback.print_exc()
        msg = " ".join(str(e).split())
        if isinstance(e, PTQStudioError):
            return _fail(args.json, args.command, type(e).__name__, f"{PROG}: error: {msg}", msg, 2)
        line = f"{PROG}: internal error: {type(e).__name__}: {msg[:300]} (rerun with --debug for the traceback)"
        return _fail(args.json, args.command, type(e).__name__, line, msg[:300], 1)


if __name__ == "__main__":
    sys.exit(main())
