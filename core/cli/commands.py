"""`ptq-studio` pipeline commands: quantize, report, export, sensitivity.

Each command takes the parsed arguments and a progress callback and returns (json document,
human text); core.cli.main registers them, runs them and prints one of the two.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from core.cli.common import (
    add_common_flags,
    add_evaluation_flags,
    check_new_session_folder,
    check_output,
    check_soft_tokens,
    count,
    ensure_parent,
    evaluation_images,
    evaluation_list,
    evaluation_text,
    fmt,
    images_dict,
    load_session,
    module_names,
    no_images_error,
    rejected_text,
    table,
)
from core.cli.fix import remedies_line
from core.config import DEFAULT_SOFT_TOKENS, OBSERVERS, build_config, check_globs
from core.errors import CancelledError
from core.io import json_safe
from core.quant.dtypes import DTYPES


def add_parsers(sub: Any) -> None:
    """Register quantize, report, export and sensitivity on core.cli.main's subparsers."""
    dtypes = tuple(DTYPES)
    q = sub.add_parser("quantize", help="calibrate a model on images and save a session")
    q.add_argument("--model", default="tiny", help="tiny | e2b | tiny-chaotic | e2b-chaotic | tiny+outliers | e2b+outliers | checkpoint folder (default tiny)")
    q.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    q.add_argument("--out", required=True, metavar="SESSION", help="session folder to write")
    q.add_argument(
        "--max-soft-tokens", type=int, default=DEFAULT_SOFT_TOKENS, metavar="N",
        help=f"soft tokens per image (default {DEFAULT_SOFT_TOKENS})",
    )
    q.add_argument("--activation", default="uint8", choices=dtypes, help="activation dtype (default uint8)")
    q.add_argument("--weight", default="uint8", choices=dtypes, help="weight dtype (default uint8)")
    q.add_argument("--observer", default="minmax", choices=OBSERVERS, help="observer (default minmax)")
    q.add_argument("--keep-float", nargs="+", default=[], metavar="GLOB", help="modules kept in float")
    q.add_argument("--batch-size", type=count(1), default=1, metavar="N", help="images per calibration batch")
    add_common_flags(q)

    r = sub.add_parser("report", help="observer ranges and FP-vs-quantized errors of a session")
    r.add_argument("session", metavar="SESSION")
    add_evaluation_flags(r)
    r.add_argument("--plots", metavar="DIR", help="write PNG charts into DIR")
    r.add_argument("--keep-float", nargs="+", default=[], metavar="GLOB", help="what-if: keep these in float")
    r.add_argument("--top", type=count(1), default=15, metavar="N", help="rows of the worst-modules table")
    r.add_argument("--histograms", action="store_true", help="include histograms in --json")
    r.add_argument(
        "--divergence", default="layer", choices=("layer", "module", "off"),
        help="locate the first divergence per encoder layer (default) or per module, or skip it",
    )
    add_common_flags(r)

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
    add_common_flags(e)

    s = sub.add_parser("sensitivity", help="keep one layer / module kind in float at a time, rank them")
    s.add_argument("session", metavar="SESSION")
    add_evaluation_flags(s)
    s.add_argument("--unit", default="layer", choices=("layer", "kind"), help="what to keep in float (default layer)")
    add_common_flags(s)


def cmd_quantize(args, progress) -> tuple[dict, str]:
    """Load, add images, calibrate, save."""
    from core.session import Session  # noqa: PLC0415 -- loads torch (seconds); --help stays fast

    out = check_output(args.out, "--out", kind="session")
    check_new_session_folder(out)
    check_soft_tokens(args.max_soft_tokens)
    config = build_config(activation=args.activation, weight=args.weight, observer=args.observer, keep_float=args.keep_float)
    t0 = time.perf_counter()
    session = Session(args.model, config, args.max_soft_tokens, device=args.device)
    session.config.check_globs(module_names(session), "--keep-float")
    added = session.add_images(args.images)
    if not added.accepted:
        raise no_images_error(added.rejected)
    cal = session.calibrate(progress=progress, batch_size=args.batch_size)
    progress.close()
    if cal.cancelled:
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
        "images": images_dict(added.accepted, added.rejected),
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
                rejected_text(added.rejected),
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
        "remedies": [r.to_json() for r in getattr(session, "remedies", [])],
        "plots": plots or [],
    }


class HeatmapWriter:
    """Writes heatmap_<image stem>.png of the final output for each image it is handed."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.used: set[str] = set()
        self.written: list[dict] = []

    def __call__(self, maps) -> None:
        """Draw the final output's heatmap of one image's error maps (other modules are skipped)."""
        from core.analysis.heatmaps import MODEL  # noqa: PLC0415 -- loads torch (seconds); --help stays fast
        from core.cli.charts import heatmap_file_name, write_heatmap  # noqa: PLC0415 -- numpy, PIL and matplotlib cost ~0.5 s; only the report commands draw

        if MODEL not in maps.rows:
            return
        hm = maps.heatmap(MODEL)
        png = write_heatmap(self.folder / heatmap_file_name(maps.path or maps.image_id, self.used), hm)
        self.written.append({"image_id": maps.image_id, "path": maps.path, "png": str(png), **hm.to_dict()})


def cmd_report(args, progress) -> tuple[dict, str]:
    """Ranges and errors (and optional plots) of a saved session."""
    from core.analysis.divergence import locate_divergence  # noqa: PLC0415 -- loads torch (seconds); --help stays fast
    from core.analysis.heatmaps import image_error_maps  # noqa: PLC0415 -- loads torch (seconds); --help stays fast

    t0 = time.perf_counter()
    if args.plots:
        check_output(args.plots, "--plots", kind="folder")
    session = load_session(args.session, args.device)
    if args.keep_float:
        check_globs(args.keep_float, module_names(session), "module", "--keep-float")
    images, rejected, entries = evaluation_images(session, args)
    res = session.evaluate(images=images, progress=progress, keep_float=args.keep_float)
    progress.close()
    plots = []
    heatmaps = HeatmapWriter(args.plots) if args.plots else None
    divergence = None
    if args.divergence != "off":
        # The search runs the float and quantized passes the final-output heatmaps need.
        divergence = locate_divergence(
            session, images=images, unit=args.divergence, progress=progress, keep_float=args.keep_float, on_image=heatmaps
        )
        progress.close()
    elif heatmaps is not None:
        for entry in session.entries_for(images):
            heatmaps(image_error_maps(session, entry, progress=progress))
        progress.close()
    if args.plots:
        from core.cli.charts import write_report_plots  # noqa: PLC0415 -- numpy, PIL and matplotlib cost ~0.5 s; only the report commands draw

        plots = [str(p) for p in write_report_plots(args.plots, session.observer_table(), res)]
        plots += [h["png"] for h in heatmaps.written]
    doc = report_document(session, res, plots, histograms=args.histograms, divergence=divergence)
    doc["heatmaps"] = heatmaps.written if heatmaps is not None else []
    doc["session"] = str(args.session)
    doc["images"] = images_dict([], rejected) | {"evaluated": res.images}
    doc["evaluation_images"] = evaluation_list(entries)
    doc["seconds"] = time.perf_counter() - t0
    return doc, _report_text(session, res, rejected, divergence, plots, args.top, entries)


def _report_text(session, res, rejected, divergence, plots: list[str], top: int, entries) -> str:
    """The human-readable report: divergence line, observer table, error table, worst modules."""
    records = session.observer_table()
    obs_rows = [
        [r.name, r.kind[:3], r.dtype, r.range_min, r.range_max,
         (r.scale if not r.per_channel else "per-ch"),
         (r.zero_point if not r.per_channel else "-"), r.max_source or "-", "OUTLIER" if r.outlier else ""]
        for r in records
    ]
    e2e = res.end_to_end
    worst = res.worst(top)
    return "\n".join(
        filter(
            None,
            [
                rejected_text(rejected),
                divergence.summary_line() if divergence is not None else "",
                remedies_line(getattr(session, "remedies", [])),
                f"Observers ({len(records)})",
                table(obs_rows, ["observer", "kind", "dtype", "min", "max", "scale", "zp", "max set by", ""]),
                "",
                f"Errors {evaluation_text(entries)}"
                + (f", keeping {', '.join(res.keep_float)} in float" if res.keep_float else ""),
                table(
                    [[m.name, m.kind, m.peir, m.sqnr_db, m.cosine, m.clipped_fraction, m.max_abs] for m in res.modules],
                    ["module", "kind", "PEIR", "SQNR dB", "cosine", "clipped", "max abs"],
                ),
                "",
                f"Worst {len(worst)} modules by SQNR: " + ", ".join(f"{m.name} ({fmt(m.sqnr_db)} dB)" for m in worst),
                f"End to end: PEIR {fmt(e2e.peir)}, SQNR {fmt(e2e.sqnr_db)} dB, cosine {fmt(e2e.cosine)}, "
                f"max abs {fmt(e2e.max_abs)}",
                ("Plots: " + ", ".join(plots)) if plots else "",
            ],
        )
    )


def cmd_export(args, progress) -> tuple[dict, str]:
    """Export and verify a Circle model from a saved session."""
    out = check_output(args.out, "--out")
    check_soft_tokens(args.max_soft_tokens)
    session = load_session(args.session, args.device)
    res = session.export(ensure_parent(out), max_soft_tokens=args.max_soft_tokens, progress=progress, input_dtype=args.input_dtype)
    progress.close()
    doc = {"command": "export", "session": str(args.session), **export_dict(res)}
    three = None
    if getattr(args, "three_way", False):
        three = session.three_way(res, progress=progress)
        progress.close()
        doc["three_way"] = json_safe(three.to_dict())
    v = doc.get("verify") or {}
    text = "\n".join(
        [
            f"wrote {doc.get('path')} ({doc.get('bytes')} bytes) in {fmt(doc.get('seconds'))} s",
            "ops: " + ", ".join(f"{k} x{n}" for k, n in sorted((doc.get("op_counts") or {}).items())),
            f"tensors without qparams: {len(doc.get('tensors_without_qparams') or [])} (graph input and output included)",
            *(res.io_tensors or []),
            f"verify ({v.get('runtime', '?')}): max abs diff {fmt(v.get('max_abs_diff'))}, PEIR {fmt(v.get('peir'))}, "
            f"{100 * float(v.get('within_one_step') or 0):.2f}% of outputs within one step, "
            f"at most {fmt(v.get('max_steps'))} steps",
            verdict_line(v.get("verdict")),
            *([res.verify.onert.summary()] if res.verify is not None and res.verify.onert is not None else []),
            *([f"unquantized: {t} (module {m})" for t, m in (res.unquantized or [])][:20]),
            *(three.summary_lines() if three is not None else []),
        ]
    )
    return doc, text


def verdict_line(verdict: dict | None) -> str:
    """The export verdict as one line (core.export.verdict: judged against this machine's rounding noise)."""
    if not verdict:
        return "verdict: not verified"
    line = f"verdict: {verdict['level'].upper()}: {verdict['summary']}"
    if verdict.get("reason"):
        line += f"; {verdict['reason']}. Next: {verdict['advice']}"
    return line


def export_dict(res) -> dict:
    """The JSON-safe fields of an export result."""
    if dataclasses.is_dataclass(res):
        d = dataclasses.asdict(res)
    elif hasattr(res, "to_dict"):
        d = res.to_dict()
    else:
        d = dict(vars(res))
    return json_safe(d)


def cmd_sensitivity(args, progress) -> tuple[dict, str]:
    """Rank layers (or module kinds) by how much keeping them in float helps end to end."""
    t0 = time.perf_counter()
    session = load_session(args.session, args.device)
    images, rejected, entries = evaluation_images(session, args)
    ranked = session.sensitivity(images=images, unit=args.unit, progress=progress)
    progress.close()
    base = session.last_sensitivity_baseline
    doc = {
        "command": "sensitivity",
        "session": str(args.session),
        "unit": args.unit,
        "images": images_dict(entries, rejected),
        "evaluation_images": evaluation_list(entries),
        "baseline": base.to_dict() if base is not None else None,
        "ranking": [e.to_dict() for e in ranked],
        "seconds": time.perf_counter() - t0,
    }
    text = "\n".join(
        filter(
            None,
            [
                rejected_text(rejected),
                f"Sensitivity {evaluation_text(entries)}",
                f"Baseline end to end: SQNR {fmt(base.sqnr_db)} dB, PEIR {fmt(base.peir)}" if base else "",
                table(
                    [[e.name, e.improvement_db, e.sqnr_db, e.peir] for e in ranked],
                    [f"{args.unit} kept in float", "gain dB", "SQNR dB", "PEIR"],
                ),
            ],
        )
    )
    return doc, text


COMMANDS = {"quantize": cmd_quantize, "report": cmd_report, "export": cmd_export, "sensitivity": cmd_sensitivity}
