"""`ptq-studio fix`: apply remedies (GPTQ, AdaRound, SmoothQuant, CLE, mixed precision) to a saved
session, print the end-to-end SQNR and the first divergence before and after and each step's figures, and save the session
back (atomically: the earlier session stays until the new one is complete, and stays on any error).

Like core.cli.commands, it returns (json document, human text); core.cli.main registers it.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from core.cli import common
from core.errors import CancelledError, ConfigError


def glob_alpha(text: str) -> tuple[str, float | None]:
    """An argparse type: GLOB or GLOB=ALPHA (SmoothQuant's migration strength for that glob)."""
    glob, sep, alpha = text.rpartition("=")
    if not sep:
        return text, None
    try:
        return glob, float(alpha)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: ALPHA must be a number in (0, 1], e.g. '*.mlp.*=0.5'") from None


def add_parsers(sub: Any) -> None:
    """Register `fix` on core.cli.main's subparsers."""
    f = sub.add_parser(
        "fix",
        help="apply remedies to a session (GPTQ, AdaRound, SmoothQuant, CLE, mixed precision) and save it",
        description="Remedies run in a fixed order: SmoothQuant/CLE, a recalibration, GPTQ/AdaRound, mixed precision.",
    )
    f.add_argument("session", metavar="SESSION")
    f.add_argument("--gptq", nargs="+", default=[], metavar="GLOB", help="GPTQ weight rounding on these linears")
    f.add_argument("--adaround", nargs="+", default=[], metavar="GLOB", help="AdaRound weight rounding on these linears")
    f.add_argument(
        "--smoothquant", nargs="+", default=[], type=glob_alpha, metavar="GLOB[=ALPHA]",
        help="SmoothQuant on these modules, alpha per glob (default 0.5)",
    )
    f.add_argument("--cle", nargs="+", default=[], metavar="GLOB", help="cross-layer equalisation on these modules")
    target = f.add_mutually_exclusive_group()
    target.add_argument("--target-sqnr", type=float, metavar="DB", help="mixed precision: cheapest dtypes reaching this end-to-end SQNR")
    target.add_argument("--within-int16", type=float, metavar="DB", help="mixed precision: within this many dB of all-int16")
    f.add_argument("--out", metavar="SESSION", help="save into this folder instead of SESSION")
    common.add_common_flags(f)


def plan_from_args(args) -> list:
    """The remedy steps the flags ask for (ConfigError when none)."""
    from core.remedies.plan import RemedyStep  # noqa: PLC0415 -- core.remedies loads torch (seconds); --help stays fast

    steps = []
    if args.smoothquant:
        alphas = {g: a for g, a in args.smoothquant if a is not None}
        steps.append(RemedyStep("smoothquant", tuple(g for g, _ in args.smoothquant), {"alphas": alphas} if alphas else {}))
    if args.cle:
        steps.append(RemedyStep("cle", tuple(args.cle)))
    for kind in ("gptq", "adaround"):
        if getattr(args, kind):
            steps.append(RemedyStep(kind, tuple(getattr(args, kind))))
    if args.target_sqnr is not None:
        steps.append(RemedyStep("mixed", params={"target_sqnr_db": args.target_sqnr}))
    if args.within_int16 is not None:
        steps.append(RemedyStep("mixed", params={"within_db_of_int16": args.within_int16}))
    if not steps:
        raise ConfigError("fix: choose at least one remedy (--gptq, --adaround, --smoothquant, --cle, --target-sqnr or --within-int16)")
    return steps


def step_figures(report) -> str:
    """A report's scalar summary figures as 'name value' pairs, plus each kind's headline (the rest stays in --json)."""
    summary = report.summary
    parts = [f"{k} {common.fmt(v)}" for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    layers = summary.get("layers")
    if isinstance(layers, dict) and layers:
        # Rounding: how much closer each layer's output came, against rounding to nearest on the same grid.
        gains = sorted(v["rounded_db"] - v["nearest_db"] for v in layers.values()
                       if all(isinstance(v.get(k), (int, float)) and math.isfinite(v[k]) for k in ("rounded_db", "nearest_db")))
        if gains:
            parts.append(f"layer output SQNR {gains[len(gains) // 2]:+.2f} dB median vs nearest ({len(gains)} layers)")
    absmax = summary.get("input_absmax")
    if isinstance(absmax, dict) and absmax:
        # Smoothing: the largest input a smoothed linear sees, before and after.
        before = max(v["before"] for v in absmax.values())
        after = max(v["after"] for v in absmax.values())
        parts.append(f"largest linear input {common.fmt(before)} -> {common.fmt(after)}")
    return ", ".join(parts)


def remedies_line(reports) -> str:
    """One line naming the applied remedies and their globs (the report command prints it)."""
    if not reports:
        return "Remedies: none"
    return "Remedies: " + "; ".join(f"{r.step.kind} ({', '.join(r.step.globs)}: {len(r.modules)} module(s))" for r in reports)


def cmd_fix(args, progress) -> tuple[dict, str]:
    """Apply the remedies, compare before/after on the session's images, save the session."""
    out = common.check_output(args.out or args.session, "--out" if args.out else "SESSION", kind="session")
    if args.out:
        common.check_new_session_folder(out)
    session = common.load_session(args.session, args.device)
    try:
        result = session.apply_remedies(plan_from_args(args), progress=progress)
    except CancelledError:
        raise CancelledError("fix cancelled; the session on disk is unchanged") from None
    progress.close()
    saved = session.save(out)
    doc = {"command": "fix", "session": str(saved), **result.to_dict(), "applied": [r.to_json() for r in session.remedies]}
    rows = [
        [r.step.kind, ", ".join(r.step.globs), len(r.modules), len(r.summary.get("parameters", [])) + len(r.summary.get("rounded", [])), r.seconds, step_figures(r)]
        for r in result.reports
    ]
    delta = result.comparison.end_to_end_delta_db
    shift = result.divergence
    text = "\n".join(
        [
            common.table(rows, ["step", "globs", "modules", "weights changed", "seconds", "figures"]),
            f"End to end on {len(result.after.images)} image(s): SQNR {common.fmt(result.sqnr_before_db)} dB -> "
            f"{common.fmt(result.sqnr_after_db)} dB ({delta:+.2f} dB)",
            *(() if shift is None else shift.lines()),
            remedies_line(session.remedies),
            f"session saved to {saved}",
        ]
    )
    return doc, text


COMMANDS = {"fix": cmd_fix}
