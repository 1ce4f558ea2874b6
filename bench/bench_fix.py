"""Issue 14's measured targets in one run: the remedy sections side by side, then an export of each
remedied model verified as any other export (0 tensors without qparams, the same verdict rules).

Sections (each `run_section(args) -> list[dict]` with name, figures, target, met, notes):
bench/fix_smooth.py (SmoothQuant on the outlier model vs the gap to the clean one), bench/fix_gptq.py
(GPTQ vs min-max and vs TICO's GPTQ), bench/fix_mixed.py (mixed precision vs the greedy baseline).

    PYTHONPATH=. .venv/bin/python bench/bench_fix.py [--model tiny|e2b] [--calib 8] [--eval 4]
        [--max-soft-tokens 280] [--skip-export]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("fix_smooth", "fix_gptq", "fix_mixed")


def parse_args(argv=None) -> argparse.Namespace:
    """The flags every section accepts, plus --skip-export."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="e2b", choices=("tiny", "e2b"))
    p.add_argument("--calib", type=int, default=8, help="calibration photos")
    p.add_argument("--eval", type=int, default=4, help="evaluation photos")
    p.add_argument("--max-soft-tokens", type=int, default=280)
    p.add_argument("--skip-export", action="store_true", help="only the sections, no export of the remedied models")
    return p.parse_args(argv)


def section_rows(name: str, args) -> list[dict]:
    """The rows of one section, with the section's time in their notes."""
    module = importlib.import_module(name)
    t0 = time.perf_counter()
    rows = list(module.run_section(args))
    for row in rows:
        row.setdefault("notes", "")
        row["notes"] = f"{row['notes']} ({time.perf_counter() - t0:.0f} s section)".strip()
    return rows


def export_plans(args):
    """(name, model spec, weight dtype, remedy steps) of each remedied model exported and verified:
    each remedy on the model and precision its section measures it on."""
    from core.remedies.plan import RemedyStep

    return [
        ("smoothquant", f"{args.model}+outliers", "uint8", [RemedyStep("smoothquant", ("*",), {"alpha": 0.5})]),
        ("gptq", args.model, "uint4", [RemedyStep("gptq", ("*",))]),
        ("mixed", args.model, "uint8", [RemedyStep("mixed", params={"within_db_of_int16": 1.0})]),
    ]


def export_rows(args) -> list[dict]:
    """Fix a freshly calibrated session with each plan, export it, verify it like any other export."""
    from core.config import PTQConfig, QuantSpec
    from core.data.resources import sample_images
    from core.errors import PTQStudioError
    from core.session import Session

    images = sample_images()[: args.calib]
    rows = []
    for name, spec, weight, steps in export_plans(args):
        row = {"name": f"export after {name} ({spec}, {weight} weights)", "target": "0 tensors without qparams, verdict 'verified'", "met": False}
        try:
            config = PTQConfig(weight=QuantSpec(weight, per_channel=True))
            session = Session(spec, config, max_soft_tokens=args.max_soft_tokens)
            session.add_images(images)
            session.calibrate()
            fix = session.apply_remedies(steps)
            with tempfile.TemporaryDirectory(prefix="bench-fix-") as tmp:
                res = session.export(Path(tmp) / f"{name}.circle")
        except PTQStudioError as e:
            rows.append(row | {"figures": "-", "notes": f"failed: {e}"})
            continue
        level = res.verify.verdict.level if res.verify is not None and res.verify.verdict is not None else "none"
        row["figures"] = (
            f"SQNR {fix.sqnr_before_db:.2f} -> {fix.sqnr_after_db:.2f} dB; {res.bytes / 2**20:.2f} MiB; "
            f"{len(res.tensors_without_qparams)} without qparams; verdict {level}"
        )
        row["met"] = not res.tensors_without_qparams and level == "verified"
        row["notes"] = "" if row["met"] else (res.verify.verdict.reason if res.verify and res.verify.verdict else "")
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """One table: name, figures, target, met / not met, notes."""
    header = ("remedy", "figures", "target", "met", "notes")
    cells = [(r["name"], str(r.get("figures", "")), str(r.get("target", "")), "met" if r.get("met") else "NOT MET",
              str(r.get("notes", ""))) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    for line in (header, tuple("-" * w for w in widths), *cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv=None) -> int:
    """Run every section and the exports; print the table and the load average."""
    args = parse_args(argv)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = [row for name in SECTIONS for row in section_rows(name, args)]
    if not args.skip_export:
        rows += export_rows(args)
    print(f"bench_fix: model {args.model}, {args.calib} calibration / {args.eval} evaluation photos, "
          f"{args.max_soft_tokens} soft tokens, {time.perf_counter() - t0:.0f} s")
    print_table(rows)
    load_after = os.getloadavg()
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"after {' '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
