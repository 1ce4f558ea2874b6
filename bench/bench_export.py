"""Circle export of e2b (QUANT) with our library and with TICO's own QuantGemma4VisionModel, side by side.

Both sides use the same model, the same calibration images and the same profile (one image at
max_soft_tokens). Each side runs in its own interpreter so its peak RSS is its own; TICO's side
runs under a time limit and is reported as "did not finish in N min" when it hits it, with the
stages it completed. Prints stage times (torch.export, decompositions, converter passes,
serialisation, Circle optimisation), peak RSS and file sizes.

    PYTHONPATH=. .venv/bin/python bench/bench_export.py [--max-soft-tokens 280] [--calib 2]
        [--tico-timeout 15] [--skip-tico] [--no-verify] [--profile ours.prof]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["torch.export", "decompositions", "converter passes", "serialisation", "circle optimisation", "write", "verify"]


def _emit(kind: str, **data) -> None:
    print(json.dumps({"kind": kind, **data}), flush=True)


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _calibration(config, tokens: int, count: int):
    from core.data.images import ImagePreprocessor
    from core.data.resources import sample_images

    pre = ImagePreprocessor(config, max_soft_tokens=tokens)
    images = sample_images()
    batches = [pre([p]) | {"image_ids": [p.name]} for p in images[:count]]
    return batches, pre([images[0]])


# ------------------------------------------------------------------ workers (one per process)
def worker_ours(args) -> None:
    import torch

    from core.export.pipeline import export_circle
    from core.models import load_model
    from core.ptq import calibrate, convert, prepare

    torch.manual_seed(0)
    t = time.perf_counter()
    model = load_model(args.model)
    q = prepare(model)
    del model
    calib, example = _calibration(q.config, args.max_soft_tokens, args.calib)
    calibrate(q, calib)
    convert(q)
    _emit("setup", seconds=time.perf_counter() - t, rss_gb=_maxrss_gb())

    last = [time.perf_counter()]

    def progress(done: int, total: int, message: str) -> None:
        now = time.perf_counter()
        _emit("stage", message=message, seconds=now - last[0], rss_gb=_maxrss_gb())
        last[0] = now

    out = Path(args.out_dir) / "ours_e2b.circle"
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    r = export_circle(q, example, out, verify=not args.no_verify, progress=progress)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    v = r.verify
    _emit(
        "result",
        seconds=r.seconds,
        timings=r.timings,
        bytes=r.bytes,
        rss_gb=_maxrss_gb(),
        nodes=r.graph_nodes,
        ops=sum(r.op_counts.values()),
        op_counts=r.op_counts,
        unquantized=r.tensors_without_qparams,
        verify=None
        if v is None
        else {
            "max_abs_diff": v.max_abs_diff,
            "within_one_step": v.within_one_step,
            "max_steps": v.max_steps,
            "vs_runtime_forward": v.vs_runtime_forward,
            "export_vs_forward": v.export_vs_forward,
        },
    )


def worker_tico(args) -> None:
    import tico.quantization
    import tico.quantization.config.ptq
    import torch

    from core.export.runtime import convert_to_circle
    from core.models import load_model

    torch.manual_seed(0)
    t = time.perf_counter()
    model = load_model(args.model)
    calib, example = _calibration(model.config, args.max_soft_tokens, args.calib)
    q = tico.quantization.prepare(model, tico.quantization.config.ptq.PTQConfig(), inplace=True)
    with torch.no_grad():
        for b in calib:
            q(pixel_values=b["pixel_values"], pixel_position_ids=b["pixel_position_ids"])
    q = tico.quantization.convert(q, inplace=True)
    wrapped = getattr(q, "wrapped", q)
    module = wrapped.as_export_module(mode="prefill", pixel_position_ids=example["pixel_position_ids"]).eval()
    _emit("setup", seconds=time.perf_counter() - t, rss_gb=_maxrss_gb())

    timings: dict[str, float] = {}
    last = [time.perf_counter()]

    def step(message: str) -> None:
        now = time.perf_counter()
        _emit("stage", message=message, seconds=now - last[0], rss_gb=_maxrss_gb())
        last[0] = now

    start = time.perf_counter()
    t = time.perf_counter()
    with torch.no_grad():
        # tico.convert's own default: strict export.
        program = torch.export.export(module, (example["pixel_values"],), strict=True)
    timings["torch.export"] = time.perf_counter() - t
    nodes = sum(1 for n in program.graph.nodes if n.op == "call_function")
    step(f"torch.export done ({nodes} nodes)")
    data = convert_to_circle(program, timings, step, None, True, None)
    out = Path(args.out_dir) / "tico_e2b.circle"
    t = time.perf_counter()
    out.write_bytes(data)
    timings["write"] = time.perf_counter() - t
    step("wrote")
    _emit(
        "result",
        seconds=time.perf_counter() - start,
        timings=timings,
        bytes=len(data),
        rss_gb=_maxrss_gb(),
        nodes=nodes,
        ops=None,
        verify=None,
    )


# ------------------------------------------------------------------ parent
def run_side(name: str, argv: list[str], timeout_s: float | None) -> dict:
    """Run one worker, echo its stage lines as they come, stop it at `timeout_s`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    stages: list[dict] = []
    state: dict = {"name": name, "stages": stages}
    stderr_tail: list[str] = []

    def read_err() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            stderr_tail.append(line.rstrip())
            del stderr_tail[:-20]

    threading.Thread(target=read_err, daemon=True).start()
    start = time.perf_counter()

    def read_out() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg["kind"] == "stage":
                stages.append(msg)
                print(f"  [{name}] {time.perf_counter() - start:7.1f}s  {msg['message']:<40} "
                      f"+{msg['seconds']:.1f}s  maxrss {msg['rss_gb']:.2f} GiB", flush=True)
            elif msg["kind"] == "setup":
                state["setup"] = msg
                print(f"  [{name}] setup (load, prepare, calibrate, convert) {msg['seconds']:.1f}s", flush=True)
            elif msg["kind"] == "result":
                state["result"] = msg

    reader = threading.Thread(target=read_out, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        state["timeout"] = timeout_s
    reader.join(timeout=5)
    if proc.returncode not in (0, None) and "result" not in state and "timeout" not in state:
        state["error"] = " | ".join(stderr_tail[-3:])
    return state


def _fmt(state: dict, export_timeout_min: float | None = None) -> list[str]:
    lines = [f"{state['name']}:"]
    r = state.get("result")
    if "timeout" in state:
        done = [s["message"] for s in state["stages"]]
        lines.append(f"  did not finish in {state['timeout'] / 60:.0f} min (completed: {', '.join(done) or 'nothing'})")
        peak = max([s["rss_gb"] for s in state["stages"]] + [state.get("setup", {}).get("rss_gb", 0.0)])
        lines.append(f"  peak RSS so far {peak:.2f} GiB")
        for s in state["stages"]:
            lines.append(f"    {s['message']:<40} {s['seconds']:8.1f} s")
        return lines
    if r is None:
        lines.append(f"  failed: {state.get('error', 'no result')}")
        return lines
    t = r["timings"]
    conv = sum(t.get(k, 0.0) for k in ("torch.export", "decompositions", "converter passes", "serialisation", "circle optimisation"))
    lines.append(f"  total {r['seconds']:.1f} s (export+convert {conv:.1f} s), peak RSS {r['rss_gb']:.2f} GiB, "
                 f"file {r['bytes'] / 2**20:.1f} MiB, {r['nodes']} graph nodes" + (f", {r['ops']} Circle ops" if r.get("ops") else ""))
    for k in STAGES:
        if k in t:
            lines.append(f"    {k:<22} {t[k]:8.1f} s")
    if r.get("verify"):
        v = r["verify"]
        lines.append(f"  verify: max|diff| {v['max_abs_diff']:.4g}, within one step {100 * v['within_one_step']:.2f}%, "
                     f"max {v['max_steps']:.2f} steps, vs runtime forward {v['vs_runtime_forward']:.4g}, "
                     f"forward_export vs forward {v['export_vs_forward']:.2g}")
    if r.get("unquantized") is not None:
        lines.append(f"  tensors without qparams: {len(r['unquantized'])}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["ours", "tico"])
    ap.add_argument("--model", default="e2b")
    ap.add_argument("--max-soft-tokens", type=int, default=280)
    ap.add_argument("--calib", type=int, default=2, help="calibration images (bundled samples)")
    ap.add_argument("--tico-timeout", type=float, default=15.0, help="minutes for TICO's side (setup included)")
    ap.add_argument("--skip-tico", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="ours: skip running the written file")
    ap.add_argument("--profile", default="", help="ours: write a cProfile of export_circle here")
    ap.add_argument("--out-dir", default="")
    args = ap.parse_args()
    if args.worker:
        (worker_ours if args.worker == "ours" else worker_tico)(args)
        return

    import tempfile

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_export_")
    common = ["--model", args.model, "--max-soft-tokens", str(args.max_soft_tokens), "--calib", str(args.calib), "--out-dir", out_dir]
    print(f"Circle export of {args.model}, QUANT, max_soft_tokens {args.max_soft_tokens}, "
          f"{args.calib} calibration images, {os.cpu_count()} CPUs; files in {out_dir}")
    results = []
    if not args.skip_ours:
        extra = (["--no-verify"] if args.no_verify else []) + (["--profile", args.profile] if args.profile else [])
        results.append(run_side("ours", common + extra, None))
    if not args.skip_tico:
        results.append(run_side("tico", common, args.tico_timeout * 60))
    print()
    for state in results:
        print("\n".join(_fmt(state)))
    ours = next((s.get("result") for s in results if s["name"] == "ours"), None)
    if ours:
        conv = ours["seconds"] - ours["timings"].get("verify", 0.0)
        peak_bytes = ours["rss_gb"] * 2**30  # the strict reading of "4 GB": 4e9 bytes (3.73 GiB)
        print(f"\ntarget: ours <= 10 min and <= 4 GB: export {conv / 60:.1f} min "
              f"({'met' if conv <= 600 else 'NOT met'}), peak RSS {ours['rss_gb']:.2f} GiB = {peak_bytes / 1e9:.2f} GB "
              f"({'met' if peak_bytes <= 4e9 else 'NOT met'})")
    if args.profile:
        import pstats

        print(f"\ncProfile of ours ({args.profile}), top 25 by cumulative time:")
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
