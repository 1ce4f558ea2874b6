"""`ptq-studio` diagnostics commands: images (provenance ranking), locate, recalibrate, ab.

Each command returns (json document, human text) like those of core.cli.commands; core.cli.main
registers both sets.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from core.cli import common
from core.config import OBSERVERS, build_config, parse_override_lines
from core.errors import CancelledError, ConfigError
from core.export.config_export import one_name_map, to_one_quant_config, write_one_quant_config, write_tico_ptq_yaml
from core.quant.dtypes import DTYPES


def add_parsers(sub: Any) -> None:
    """Register the diagnostics subcommands on core.cli.main's subparsers."""
    dtypes = tuple(DTYPES)
    i = sub.add_parser("images", help="calibration images ranked by how many observer extremes they set")
    i.add_argument("session", metavar="SESSION")
    i.add_argument("--top", type=common.count(0), default=0, metavar="N", help="show only the first N images (0: all)")
    common.add_common_flags(i)

    loc = sub.add_parser("locate", help="the image and patch where an observer's min or max occurred")
    loc.add_argument("session", metavar="SESSION")
    loc.add_argument("observer", metavar="OBSERVER", help="observer name, e.g. encoder.layers.0.mlp.act")
    loc.add_argument("--which", default="max", choices=("max", "min"))
    loc.add_argument("--png", metavar="FILE.png", help="write the image with the patch outlined")
    common.add_common_flags(loc)

    rc = sub.add_parser("recalibrate", help="exclude images and calibrate again on the rest (saves the session)")
    rc.add_argument("session", metavar="SESSION")
    rc.add_argument(
        "--exclude", nargs="+", required=True, metavar="IMAGE",
        help="image paths, image ids or globs over them (e.g. '*/night_*.jpg')",
    )
    rc.add_argument("--out", metavar="SESSION", help="save into this folder instead of SESSION")
    common.add_common_flags(rc)

    ab = sub.add_parser("ab", help="calibrate a second configuration B beside the session's A and compare them")
    ab.add_argument("session", metavar="SESSION")
    ab.add_argument("--b-activation", choices=dtypes, help="B's activation dtype (default: A's)")
    ab.add_argument("--b-weight", choices=dtypes, help="B's weight dtype (default: A's)")
    ab.add_argument("--b-observer", choices=OBSERVERS, help="B's observer (default: A's)")
    ab.add_argument(
        "--b-override", nargs="+", default=[], metavar="GLOB=DTYPE",
        help="B's per-module overrides, e.g. 'encoder.layers.*.self_attn=int16' or 'pooler=float'",
    )
    common.add_evaluation_flags(ab)
    ab.add_argument("--margin", type=float, default=0.5, metavar="DB", help="B must win by more than this (dB)")
    ab.add_argument("--tico-yaml", metavar="FILE.yaml", help="write the winning overrides as a TICO PTQConfig")
    ab.add_argument("--one-json", metavar="FILE.json", help="write them as a ONE one-quantize --quant_config")
    ab.add_argument(
        "--one-names", default="modules", choices=("modules", "circle"),
        help="layer names in --one-json: our module names (default), or the Circle tensor names "
        "of an export of the session (exports it to a temporary file first: slow for e2b)",
    )
    common.add_common_flags(ab)


def cmd_images(args, progress) -> tuple[dict, str]:
    """Rank the calibration images by the observer extremes they set."""
    session = common.load_session(args.session, args.device)
    ranks = session.rank_images()
    shown = ranks[: args.top] if args.top and args.top > 0 else ranks
    doc = {
        "command": "images",
        "session": str(args.session),
        "ranking": [
            {
                "image_id": r.image_id,
                "path": r.path,
                "status": getattr(r, "status", ""),
                "extremes": r.extremes,
                "min_count": r.min_count,
                "max_count": r.max_count,
                "observers": list(r.observers),
            }
            for r in ranks
        ],
    }
    text = common.table(
        [[r.image_id, r.extremes, r.min_count, r.max_count, getattr(r, "status", "")] for r in shown],
        ["image", "extremes set", "mins", "maxes", "status"],
    )
    return doc, text


def cmd_locate(args, progress) -> tuple[dict, str]:
    """Where an observer's extreme occurred: image, row, patches, pixel boxes."""
    if args.png:
        common.check_output(args.png, "--png")
    session = common.load_session(args.session, args.device)
    loc = session.locate_extreme(args.observer, args.which)
    png = None
    if args.png:
        from core.cli.charts import write_extreme_location  # noqa: PLC0415 -- numpy, PIL and matplotlib cost ~0.5 s; only the report commands draw

        png = str(write_extreme_location(args.png, loc))
    boxes = [list(map(int, b)) for b in loc.boxes]
    doc = {
        "command": "locate",
        "session": str(args.session),
        "observer": loc.observer,
        "which": loc.which,
        "value": loc.value,
        "image_id": loc.image_id,
        "path": loc.path,
        "row": loc.row,
        "level": loc.level,
        "patches": [int(p) for p in loc.patches],
        "boxes": boxes,
        "tied": bool(getattr(loc, "tied", False)),
        "png": png,
    }
    where = f"row {loc.row} ({loc.level})" if loc.level else "no patch-level row"
    text = "\n".join(
        filter(
            None,
            [
                f"{loc.observer} {loc.which} = {loc.value:.6g}, set by {loc.image_id} ({loc.path})",
                f"at {where}; patches {', '.join(map(str, doc['patches'][:12]))}"
                + (" ..." if len(doc["patches"]) > 12 else ""),
                f"pixel box(es) in the resized image: {', '.join(str(tuple(b)) for b in boxes[:4])}" if boxes else "",
                "(another image reached exactly the same value)" if doc["tied"] else "",
                f"wrote {png}" if png else "",
            ],
        )
    )
    return doc, text


def cmd_recalibrate(args, progress) -> tuple[dict, str]:
    """Exclude images and calibrate again; the session is saved only when that succeeded."""
    out = common.check_output(args.out or args.session, "--out" if args.out else "SESSION", kind="session")
    if args.out:
        common.check_new_session_folder(out)
    session = common.load_session(args.session, args.device)
    excluded_ids = common.expand_images(session, args.exclude, "--exclude")
    before = {r.name: (r.min, r.max) for r in session.observer_table()}
    cal = session.recalibrate_without(excluded_ids, progress=progress)
    progress.close()
    if cal.cancelled:
        raise CancelledError("recalibration cancelled; the session on disk is unchanged")
    saved = session.save(out)
    changed = []
    for r in session.observer_table():
        old = before.get(r.name)
        if old is None:
            continue
        if _differs(old[0], r.min) or _differs(old[1], r.max):
            changed.append(r.name)
    excluded = [e.path for e in session.images if e.status == "excluded"]
    doc = {
        "command": "recalibrate",
        "session": str(saved),
        "excluded": excluded,
        "calibration": {"images_done": cal.images_done, "total_images": cal.total_images, "seconds": cal.seconds},
        "ranges_changed": changed,
    }
    text = (
        f"excluded {len(excluded)} image(s); calibrated on {cal.images_done} in {cal.seconds:.1f} s; "
        f"{len(changed)} observer range(s) changed; session saved to {saved}"
    )
    return doc, text


def _differs(a, b) -> bool:
    import numpy as np  # noqa: PLC0415 -- numpy is kept off the --help path (tests/test_strict_inputs.py)

    if a is None or b is None:
        return a is not b
    return not np.array_equal(np.asarray(a, dtype=float), np.asarray(b, dtype=float))


def _config_b(session, args):
    """B: the session's config A with the --b-* flags applied; ConfigError when nothing differs."""
    a = session.config
    overrides = {**a.overrides, **parse_override_lines(args.b_override, "--b-override")} if args.b_override else None
    cfg = build_config(a, activation=args.b_activation, weight=args.b_weight, observer=args.b_observer, overrides=overrides)
    if cfg == a:
        raise ConfigError("config B equals the session's config A: give --b-activation, --b-weight, --b-observer or --b-override")
    return cfg


def cmd_ab(args, progress) -> tuple[dict, str]:
    """Calibrate B on A's calibration images, compare both per module, write the winners."""
    from core.analysis.abtest import ABComparison  # noqa: PLC0415 -- loads torch (seconds); --help stays fast

    t0 = time.perf_counter()
    for flag, path in (("--tico-yaml", args.tico_yaml), ("--one-json", args.one_json)):
        if path:
            common.check_output(path, flag)
    session = common.load_session(args.session, args.device)
    config_b = _config_b(session, args)
    names = common.module_names(session)
    config_b.check_globs(names, "--b-override")
    if args.one_json:
        _check_one_expressible(session.config, config_b, names)
    images, rejected, entries = common.evaluation_images(session, args)
    ab = ABComparison(session, config_b)
    ab.calibrate_b(progress=progress)
    progress.close()
    result = ab.compare(images=images, progress=progress)
    progress.close()
    written = {}
    overrides = result.winning_overrides(args.margin)
    if args.tico_yaml:
        path = write_tico_ptq_yaml(common.ensure_parent(args.tico_yaml), overrides, base=result.config_a, modules=result.module_names)
        written["tico_yaml"] = str(path)
    if args.one_json:
        name_map = _circle_name_map(session, result.module_names, progress) if args.one_names == "circle" else None
        written["one_json"] = str(
            write_one_quant_config(
                common.ensure_parent(args.one_json), overrides, name_map, base=result.config_a, modules=result.module_names
            )
        )
    doc = {
        "command": "ab",
        "session": str(args.session),
        **result.to_dict(args.margin),
        "evaluation_images": common.evaluation_list(entries),
        "written": written,
        "seconds": time.perf_counter() - t0,
    }
    lines = [common.rejected_text(rejected), common.evaluation_text(entries), *ab.summary_lines(args.margin)]
    lines += [f"wrote {v}" for v in written.values()]
    ab.release()
    return doc, "\n".join(filter(None, lines))


def _check_one_expressible(config_a, config_b, names: list[str]) -> None:
    """Refuse --one-json before calibrating when A or B holds what ONE cannot say (float layers, int8)."""
    # Placeholder tensor names: only dtypes are in question here, not the Circle names.
    name_map = {n: [n or "root"] for n in names}
    for label, cfg in (("config A", config_a), ("config B", config_b)):
        try:
            to_one_quant_config(cfg, name_map, modules=names)
        except ConfigError as e:
            raise ConfigError(
                f"--one-json: {label} cannot be written for ONE ({e.message}); drop --one-json or change {label}"
            ) from None


def _circle_name_map(session, modules, progress) -> dict[str, list[str]]:
    """Module -> Circle tensor names, from an export of the session to a temporary file."""
    with tempfile.TemporaryDirectory(prefix="ptq-names-") as tmp:
        res = session.export(Path(tmp) / "names.circle", progress=progress)
        progress.close()
    return one_name_map(res.tensor_modules, modules)


COMMANDS = {"images": cmd_images, "locate": cmd_locate, "recalibrate": cmd_recalibrate, "ab": cmd_ab}
