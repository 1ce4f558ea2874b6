"""The whole analysis of N photos, old chain against one pass, measured against N FP forwards (issue 13, item 2).

    nice python bench/bench_analysis.py                        # e2b, 280 soft tokens, N = 1 and 4
    python bench/bench_analysis.py --model tiny --images 2 --max-soft-tokens 70   # quick check

Each phase runs in its own process (bench/_common.run_worker) so its peak RSS is its own:

1. calibrate  a Session calibrated on --calib-images photos, saved to a temp folder (not timed)
2. fp         the original model, one HF eager forward per photo over the N photos
3. old        Session.load, then what the GUI ran after calibrating: evaluate(N photos) +
              locate_divergence(N photos) + image_error_maps(photo) for each photo
4. one        Session.load, then Session.analyse(N photos): the same three results in one pass

Targets: the whole analysis <= 3.5x the N FP forwards' time; its peak RSS <= 1.5x one FP forward's
(peak RSS of the measured block: the loaded model included, on both sides; "loaded RSS" is the
process's RSS when the block starts, so peak - loaded is what the block itself added).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import PeakRSS, gib, run_worker  # noqa: E402
from core.data.images import DEFAULT_SOFT_TOKENS  # noqa: E402

TIME_TARGET = 3.5
RSS_TARGET = 1.5
PHASES = ("calibrate", "fp", "old", "one")


def _photos(n: int) -> list[Path]:
    from core.data.resources import sample_images

    photos = sample_images()[:n]
    if len(photos) < n:
        raise SystemExit(f"only {len(photos)} bundled sample photos; ask for at most that many")
    return photos


def _measured(call) -> dict:
    """Run call() under torch.no_grad, timing it and sampling its peak RSS."""
    import torch

    rss = PeakRSS()
    with torch.no_grad(), rss.measure():
        t0 = time.perf_counter()
        extra = call() or {}
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": rss.peak, "start_rss": rss.start_rss, **extra}


def _worker(phase: str, model: str, n: int, mst: int, session: str, calib: int, unit: str) -> dict:
    import torch

    from core.session import Session

    torch.manual_seed(0)
    photos = _photos(n)
    if phase == "calibrate":
        s = Session(model, max_soft_tokens=mst)
        s.add_images(_photos(max(calib, 1)))
        cal = s.calibrate()
        s.save(session)
        return {"seconds": cal.seconds}
    if phase == "fp":
        from core.data.images import ImagePreprocessor
        from core.models import load_model

        fp_model = load_model(model)
        pre = ImagePreprocessor(fp_model.config, max_soft_tokens=mst)
        batches = [pre([p]) for p in photos]
        patches = sum(int((b["pixel_position_ids"][0, :, 0] >= 0).sum()) for b in batches)

        def forwards() -> dict:
            for b in batches:
                fp_model(**b)
            return {"patches": patches}

        return _measured(forwards)
    s = Session.load(session)
    if phase == "old":

        def old_chain() -> dict:
            cmp_ = s.evaluate(images=photos)
            div = s.locate_divergence(images=photos, unit=unit)
            for p in photos:
                s.image_error_maps(p)
            return {"sqnr_db": cmp_.end_to_end.sqnr_db, "located": div.located.name if div.located else None}

        return _measured(old_chain)
    def one_pass() -> dict:
        res = s.analyse(images=photos, unit=unit)
        return {"sqnr_db": res.compare.end_to_end.sqnr_db, "located": res.divergence.located.name if res.divergence.located else None}

    return _measured(one_pass)


def _row(label: str, r: dict, fp: dict) -> str:
    if "error" in r:
        return f"  {label:<40}{r['error']}"
    return (f"  {label:<40}{r['seconds']:>9.1f}{r['seconds'] / fp['seconds']:>10.2f}{gib(r['peak_rss']):>12}"
            f"{r['peak_rss'] / fp['peak_rss']:>10.2f}{gib(r['start_rss']):>12}")


def _verdict(r: dict, fp: dict) -> str:
    if "error" in r or "error" in fp:
        return "not measured"
    t, m = r["seconds"] / fp["seconds"], r["peak_rss"] / fp["peak_rss"]
    time_ok = "met" if t <= TIME_TARGET else "not met"
    rss_ok = "met" if m <= RSS_TARGET else "not met"
    return f"time {t:.2f}x (<= {TIME_TARGET}x: {time_ok}), peak RSS {m:.2f}x (<= {RSS_TARGET}x: {rss_ok})"


def main() -> int:
    """Run the phases in subprocesses for each N and print the figures side by side."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="e2b")
    p.add_argument("--images", type=int, nargs="+", default=[1, 4], help="N photos per run (default 1 4)")
    p.add_argument("--max-soft-tokens", type=int, default=DEFAULT_SOFT_TOKENS)
    p.add_argument("--calib-images", type=int, default=2)
    p.add_argument("--unit", default="layer", choices=("layer", "module"))
    p.add_argument("--phases", default="old,one", help="measured besides fp: old, one or both (default both)")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        phase, model, n, mst, session, calib, unit = args.worker
        print(json.dumps(_worker(phase, model, int(n), int(mst), session, int(calib), unit)))
        return 0
    wanted = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not wanted or set(wanted) - {"old", "one"}:
        raise SystemExit(f"--phases: use old, one or both (got {args.phases!r})")
    print(f"bench_analysis: model {args.model}, max_soft_tokens {args.max_soft_tokens}, unit {args.unit}, "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as tmp:
        session = str(Path(tmp) / "bench.session")

        def run(phase: str, n: int) -> dict:
            return run_worker("bench_analysis.py", [phase, args.model, str(n), str(args.max_soft_tokens), session,
                                                    str(args.calib_images), args.unit])

        cal = run("calibrate", 1)
        if "error" in cal:
            raise SystemExit(f"calibration failed: {cal['error']}")
        print(f"  calibration on {args.calib_images} photo(s): {cal['seconds']:.1f} s (separate process, not compared)")
        for n in args.images:
            fp = run("fp", n)
            if "error" in fp:
                print(f"\nN = {n}: FP forward failed: {fp['error']}")
                continue
            results = {ph: run(ph, n) for ph in wanted}
            print(f"\nN = {n} photo(s), {fp['patches']} patches in all")
            print(f"  {'phase':<40}{'seconds':>9}{'x N FP':>10}{'peak RSS':>12}{'x FP RSS':>10}{'loaded RSS':>12}")
            print(_row(f"FP eager forwards of the {n} photo(s)", fp, fp))
            labels = {"old": "old chain (evaluate + locate + maps)", "one": "one pass (Session.analyse)"}
            for ph, r in results.items():
                print(_row(labels[ph], r, fp))
            for ph, r in results.items():
                print(f"  {labels[ph]}: {_verdict(r, fp)}")
            if "old" in results and "one" in results and "error" not in results["old"] and "error" not in results["one"]:
                print(f"  one pass / old chain: {results['one']['seconds'] / results['old']['seconds']:.2f}x time; "
                      f"same end-to-end SQNR: {results['one']['sqnr_db'] == results['old']['sqnr_db']}")
            print(f"  load average after N = {n}: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
