"""Benchmark: peak RSS of Session.add_images with 30, 300 and 1,000 photos (issue 11.3).

    python bench/bench_images.py                         # 30, 300, 1000 photos, tiny model
    python bench/bench_images.py --counts 30 1000 --calibrate --max-soft-tokens 70
    python bench/bench_images.py --scale 4               # 4x larger photos (16x the pixels)

The photos are copies of the bundled samples, each with a few random pixels changed (so none
is rejected as a duplicate), written once to a temporary folder. Every count runs in its own
process so its peak RSS is its own: Session("tiny"), then add_images(first N photos), then
(with --calibrate) Session.calibrate(). Reported per count: the process's peak RSS
(ru_maxrss), the RSS before add_images, and the peak reached while adding (sampled).

Target: the peak grows by less than 300 MB from 30 to 1,000 photos (a session keeps each
image's path, id and hash, never its pixels; calibration decodes one batch at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import PeakRSS, run_worker  # noqa: E402

GROWTH_TARGET = 300 * 10**6  # bytes, 30 -> 1,000 photos
MIB = 2**20


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def make_photos(folder: Path, count: int, scale: float, seed: int = 0) -> list[Path]:
    """count JPEG copies of the bundled samples, each with a few random pixels changed."""
    from PIL import Image

    from core.data.resources import sample_images

    rng = random.Random(seed)
    sources = []
    for path in sample_images():
        with Image.open(path) as im:
            im = im.convert("RGB")
            if scale != 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
            sources.append((path.stem, im))
    out = []
    for i in range(count):
        stem, base = sources[i % len(sources)]
        im = base.copy()
        for _ in range(8):
            xy = (rng.randrange(im.width), rng.randrange(im.height))
            im.putpixel(xy, tuple(rng.randrange(256) for _ in range(3)))
        path = folder / f"{i:05d}_{stem}.jpg"
        im.save(path, quality=92)
        out.append(path)
    return out


def worker(folder: Path, count: int, calibrate: bool, max_soft_tokens: int) -> dict:
    """One count in this process: Session, add_images, optionally calibrate; RSS figures."""
    import psutil

    from core.session import Session

    photos = sorted(folder.glob("*.jpg"))[:count]
    session = Session("tiny", max_soft_tokens=max_soft_tokens)
    before = psutil.Process().memory_info().rss
    sampler = PeakRSS()
    t0 = time.perf_counter()
    with sampler.measure():
        result = session.add_images(photos)
    add_s = time.perf_counter() - t0
    calib_s = None
    if calibrate:
        t0 = time.perf_counter()
        session.calibrate()
        calib_s = time.perf_counter() - t0
    return {
        "count": count,
        "accepted": len(result.accepted),
        "rejected": len(result.rejected),
        "rss_before_add": before,
        "peak_during_add": sampler.peak,
        "peak_rss": _peak_rss(),
        "add_s": add_s,
        "calibrate_s": calib_s,
    }


def main() -> int:
    """Run each count in its own process and print the figures with the machine's load."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[30, 300, 1000])
    ap.add_argument("--scale", type=float, default=1.0, help="resize the bundled photos by this factor first")
    ap.add_argument("--calibrate", action="store_true", help="also calibrate on the photos (slow on many photos)")
    ap.add_argument("--max-soft-tokens", type=int, default=70)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.folder, args.count, args.calibrate, args.max_soft_tokens)))
        return 0

    counts = sorted(set(args.counts))
    tmp = Path(tempfile.mkdtemp(prefix="bench_images_"))
    try:
        t0 = time.perf_counter()
        photos = make_photos(tmp, counts[-1], args.scale)
        size = sum(p.stat().st_size for p in photos)
        print(
            f"{len(photos)} photos ({size / MIB:.0f} MiB of JPEG, scale {args.scale:g}) written in "
            f"{time.perf_counter() - t0:.0f} s; load average {_load()} on {os.cpu_count()} CPUs"
        )
        rows = []
        for n in counts:
            extra = ["--calibrate"] if args.calibrate else []
            res = run_worker(
                "bench_images.py",
                ["--folder", str(tmp), "--count", str(n), "--max-soft-tokens", str(args.max_soft_tokens), *extra],
            )
            if "error" in res:
                print(f"{n:>6} photos: failed: {res['error']}")
                return 1
            rows.append(res)
            calib = f", calibrate {res['calibrate_s']:.0f} s" if res["calibrate_s"] is not None else ""
            print(
                f"{n:>6} photos: peak RSS {res['peak_rss'] / MIB:7.0f} MiB; add_images "
                f"{res['rss_before_add'] / MIB:.0f} -> peak {res['peak_during_add'] / MIB:.0f} MiB in "
                f"{res['add_s']:.1f} s{calib}; load average {_load()}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first, last = rows[0], rows[-1]
    growth = last["peak_rss"] - first["peak_rss"]
    ok = growth < GROWTH_TARGET
    print(
        f"growth {first['count']} -> {last['count']} photos: {growth / 1e6:+.0f} MB peak RSS "
        f"(target < {GROWTH_TARGET / 1e6:.0f} MB): {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
