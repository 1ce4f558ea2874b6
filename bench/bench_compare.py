"""Benchmark: core.analysis.compare.compare and core.analysis.divergence.locate_divergence vs a plain FP forward
of the same batch, measured in one run.

    python bench/bench_compare.py                      # e2b, 8 images, max_soft_tokens 280
    python bench/bench_compare.py --model tiny --images 4 --max-soft-tokens 70   # quick check
    python bench/bench_compare.py --phases locate      # only the locator against the FP forward

Each phase runs in its own subprocess so its peak RSS (ru_maxrss) is its own:

1. calibrate  Session(model).calibrate() on --calib-images photos, saved to a temp session
              (not timed against anything: compare needs a calibrated model)
2. fp         load_model(model); model(**batch) on the --images photos as one padded batch
              (HF eager attention: the forward the wrappers mirror)
3. compare    Session.load(session) (no calibration in this process), then
              Session.evaluate(images) = core.analysis.compare.compare over the same photos
4. locate     Session.load(session), then core.analysis.divergence.locate_divergence(session, images,
              unit=--unit): float, quantized and unit-alone passes per image, streamed

Targets (issue 4): compare peak RSS <= 1.3x the FP forward's, compare time <= 2.5x.
Target (issue 6): locate peak RSS <= 1.5x the FP forward's (its time is reported, not targeted:
it runs about three forwards per image against compare's two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS_TARGET = 1.3
TIME_TARGET = 2.5
LOCATE_RSS_TARGET = 1.5


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _images(n: int) -> list[Path]:
    from core.data.resources import sample_images

    pool = sample_images()
    if n > len(pool):
        raise SystemExit(f"only {len(pool)} bundled sample photos; ask for at most that many")
    return pool[:n]


def phase_calibrate(args) -> dict:
    """Calibrate a session and save it for the compare phase."""
    from core.session import Session

    t0 = time.perf_counter()
    s = Session(args.model, max_soft_tokens=args.max_soft_tokens, device=args.device)
    s.add_images(_images(args.images)[: args.calib_images])
    cal = s.calibrate()
    s.save(args.session)
    return {"seconds": time.perf_counter() - t0, "calibration_seconds": cal.seconds, "peak_rss": _peak_rss()}


def phase_fp(args) -> dict:
    """Plain FP forward of the whole batch with the original model."""
    import torch

    from core.data.images import ImagePreprocessor
    from core.models import load_model

    model = load_model(args.model).to(args.device)
    pre = ImagePreprocessor(model.config, max_soft_tokens=args.max_soft_tokens)
    batch = {k: v.to(args.device) for k, v in pre(_images(args.images)).items()}
    rss_loaded = _rss()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(**batch).last_hidden_state
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_rss": _peak_rss(),
        "rss_loaded": rss_loaded,
        "patches": int(batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]),
        "output_rows": int(out.shape[0]),
        "attn": getattr(model.config, "_attn_implementation", "?"),
    }


def _timed_on_session(args, call) -> tuple[Any, dict]:
    """Load the saved session, run call(session, image paths) and measure it."""
    import torch

    from core.session import Session

    s = Session.load(args.session, device=args.device)
    paths = _images(args.images)
    rss_loaded = _rss()
    t0 = time.perf_counter()
    res = call(s, paths)
    if args.device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return res, {"seconds": seconds, "peak_rss": _peak_rss(), "rss_loaded": rss_loaded}


def phase_compare(args) -> dict:
    """Load the saved session and compare FP vs quantized on the same images."""
    res, figures = _timed_on_session(args, lambda s, paths: s.evaluate(images=paths))
    return {
        **figures,
        "modules": len(res.modules),
        "images": len(res.images),
        "end_to_end_sqnr_db": res.end_to_end.sqnr_db,
        "end_to_end_peir": res.end_to_end.peir,
    }


def phase_locate(args) -> dict:
    """Load the saved session and run the first-divergence locator on the same images."""
    res, figures = _timed_on_session(args, lambda s, paths: s.locate_divergence(images=paths, unit=args.unit))
    return {
        **figures,
        "unit": args.unit,
        "units": len(res.entries),
        "images": len(res.images),
        "located": res.located.name if res.located else None,
        "summary": res.summary_line(),
    }


PHASES = {"calibrate": phase_calibrate, "fp": phase_fp, "compare": phase_compare, "locate": phase_locate}


def _run_phase(name: str, args, session: Path) -> dict:
    cmd = [
        sys.executable, __file__, "--phase", name, "--session", str(session), "--model", args.model,
        "--images", str(args.images), "--calib-images", str(args.calib_images),
        "--max-soft-tokens", str(args.max_soft_tokens), "--device", args.device, "--unit", args.unit,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    """Run the three phases in subprocesses and print the figures side by side."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="e2b")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--calib-images", type=int, default=2)
    p.add_argument("--max-soft-tokens", type=int, default=280)
    p.add_argument("--device", default="cpu")
    p.add_argument("--unit", default="layer", choices=("layer", "module"), help="locator unit (default layer)")
    p.add_argument(
        "--phases", default="compare,locate",
        help="comma-separated measured phases besides fp: compare, locate (default both)",
    )
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--session", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    args = p.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return 0

    import torch

    wanted = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(wanted) - {"compare", "locate"}
    if unknown or not wanted:
        raise SystemExit(f"--phases: use compare, locate or both (got {args.phases!r})")
    with tempfile.TemporaryDirectory(prefix="bench_compare_") as tmp:
        session = Path(tmp) / "bench.session"
        cal = _run_phase("calibrate", args, session)
        fp = _run_phase("fp", args, session)
        cmp_ = _run_phase("compare", args, session) if "compare" in wanted else None
        loc = _run_phase("locate", args, session) if "locate" in wanted else None
    rss_ratio = cmp_["peak_rss"] / fp["peak_rss"] if cmp_ else None
    time_ratio = cmp_["seconds"] / fp["seconds"] if cmp_ else None
    loc_rss_ratio = loc["peak_rss"] / fp["peak_rss"] if loc else None
    loc_time_ratio = loc["seconds"] / fp["seconds"] if loc else None
    figures = {
        "model": args.model,
        "images": args.images,
        "max_soft_tokens": args.max_soft_tokens,
        "patches": fp["patches"],
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "calibrate": cal,
        "fp_forward": fp,
        "compare": cmp_,
        "rss_ratio": rss_ratio,
        "time_ratio": time_ratio,
        "rss_target": RSS_TARGET,
        "time_target": TIME_TARGET,
        "locate": loc,
        "locate_rss_ratio": loc_rss_ratio,
        "locate_time_ratio": loc_time_ratio,
        "locate_rss_target": LOCATE_RSS_TARGET,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"bench_compare: model {args.model}, {args.images} images at max_soft_tokens {args.max_soft_tokens} "
        f"({fp['patches']} patches in the FP batch), device {args.device}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  calibration (separate process, {args.calib_images} images): {cal['calibration_seconds']:.1f} s")
    print(f"  {'phase':<34}{'seconds':>10}{'peak RSS':>14}{'RSS after load':>16}")
    print(f"  {'FP forward, one batch (HF eager)':<34}{fp['seconds']:>10.1f}{_gib(fp['peak_rss']):>14}{_gib(fp['rss_loaded']):>16}")
    if cmp_:
        print(f"  {'compare (FP + QUANT per image)':<34}{cmp_['seconds']:>10.1f}{_gib(cmp_['peak_rss']):>14}{_gib(cmp_['rss_loaded']):>16}")
    if loc:
        label = f"locate ({loc['unit']}, 3 passes/image)"
        print(f"  {label:<34}{loc['seconds']:>10.1f}{_gib(loc['peak_rss']):>14}{_gib(loc['rss_loaded']):>16}")
    if cmp_:
        ok_rss = "ok" if rss_ratio <= RSS_TARGET else "OVER TARGET"
        ok_time = "ok" if time_ratio <= TIME_TARGET else "OVER TARGET"
        print(f"  peak RSS compare / FP: {rss_ratio:.2f}x (target <= {RSS_TARGET}x: {ok_rss})")
        print(f"  time     compare / FP: {time_ratio:.2f}x (target <= {TIME_TARGET}x: {ok_time})")
        print(
            f"  compare covered {cmp_['modules']} modules; end to end SQNR {cmp_['end_to_end_sqnr_db']:.2f} dB, "
            f"PEIR {cmp_['end_to_end_peir']:.4f}"
        )
    if loc:
        ok = "ok" if loc_rss_ratio <= LOCATE_RSS_TARGET else "OVER TARGET"
        print(f"  peak RSS locate / FP:  {loc_rss_ratio:.2f}x (target <= {LOCATE_RSS_TARGET}x: {ok})")
        print(f"  time     locate / FP:  {loc_time_ratio:.2f}x (not targeted)")
        print(f"  locate: {loc['units']} units over {loc['images']} image(s); {loc['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
