"""CALIB and QUANT forward cost of our wrappers and of TICO's, against the FP forward (e2b, one image).

Each measurement runs in its own process so peak RSS figures do not mix. Prints seconds,
ratios to the FP eager forward and the peak RSS of each phase, for 2520 and 630 patches
(max_soft_tokens 280 and 70).

    PYTHONPATH=. .venv/bin/python bench/bench_calibration.py [--tokens 280 70] [--skip-tico]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import PeakRSS, gib, run_worker  # noqa: E402

PHASES = ["fp_eager", "fp_sdpa", "ours_calib", "ours_quant", "tico_calib", "tico_quant"]


def _worker(phase: str, tokens: int, model_spec: str) -> dict:
    import torch

    from core.data.images import ImagePreprocessor
    from core.data.resources import sample_images
    from core.models import load_model

    torch.manual_seed(0)
    model = load_model(model_spec)
    batch = ImagePreprocessor(model.config, max_soft_tokens=tokens)([sample_images()[0]])
    patches = int((batch["pixel_position_ids"][0, :, 0] >= 0).sum())
    kind, _, stage = phase.partition("_")
    if phase == "fp_sdpa":
        model.config._attn_implementation = "sdpa"
    if kind == "ours":
        from core.ptq import calibrate, convert, prepare

        runner = prepare(model)
        del model  # NO_QUANT reproduces it exactly, so the pipeline never needs the original again
        gc.collect()
        if stage == "calib":
            runner.enable_calibration()
        else:
            calibrate(runner, [batch])
            convert(runner)
    elif kind == "tico":
        import tico.quantization
        from tico.quantization.config.ptq import PTQConfig

        runner = tico.quantization.prepare(copy.deepcopy(model), PTQConfig(), inplace=True)
        del model
        gc.collect()
        if stage == "quant":
            with torch.no_grad():
                runner(**batch)
            runner = tico.quantization.convert(runner, inplace=True)
    else:
        runner = model
    rss = PeakRSS()
    with torch.no_grad(), rss.measure():
        start = time.perf_counter()
        runner(**batch)
        seconds = time.perf_counter() - start
    return {"phase": phase, "seconds": seconds, "peak_rss": rss.peak, "start_rss": rss.start_rss, "patches": patches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[280, 70])
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--skip-tico", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("PHASE", "TOKENS", "MODEL"))
    args = parser.parse_args()
    if args.worker:
        phase, tokens, model = args.worker
        print(json.dumps(_worker(phase, int(tokens), model)))
        return
    phases = [p for p in PHASES if not (args.skip_tico and p.startswith("tico"))]
    for tokens in args.tokens:
        results = {p: run_worker("bench_calibration.py", [p, str(tokens), args.model]) for p in phases}
        fp = results["fp_eager"]
        patches = fp.get("patches", "?")
        print(f"\n{args.model}, one image, max_soft_tokens={tokens} ({patches} valid patches)")
        print(f"{'phase':<12}{'seconds':>10}{'x FP eager':>12}{'peak RSS':>12}{'x FP RSS':>10}")
        for phase, r in results.items():
            if "error" in r:
                print(f"{phase:<12}  {r['error']}")
                continue
            ratio = r["seconds"] / fp["seconds"]
            mem = r["peak_rss"] / fp["peak_rss"]
            print(f"{phase:<12}{r['seconds']:>10.2f}{ratio:>12.2f}{gib(r['peak_rss']):>12}{mem:>10.2f}")
        ours_c, tico_c = results.get("ours_calib", {}), results.get("tico_calib", {})
        if "seconds" in ours_c and "seconds" in tico_c:
            print(f"ours CALIB / TICO CALIB: {ours_c['seconds'] / tico_c['seconds']:.2f}")
        print(
            "targets: ours CALIB <= TICO CALIB and <= 1.15x FP at 630 patches; QUANT/FP <= 2.0;"
            " CALIB peak RSS <= 1.2x FP"
        )


if __name__ == "__main__":
    main()
