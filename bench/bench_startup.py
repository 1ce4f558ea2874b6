"""How fast `ptq-studio` answers when no work is asked for: --help, --version, a usage error.

Each command runs in a fresh interpreter, a few times; the median wall time and the median peak
RSS (the child's own, from wait4) are printed next to `python -c "import torch"` for scale,
with the load average (the figures mean little on a busy machine). Target: each well under
0.5 s, and nothing like the cost of importing torch.

    .venv/bin/python bench/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5

# What the `ptq-studio` console script runs (pyproject: ptq-studio = "ptq_studio.launcher:main").
_ENTRY = "import sys; from ptq_studio.launcher import main; sys.exit(main())"

CASES = {
    "ptq-studio --help": [sys.executable, "-c", _ENTRY, "--help"],
    "ptq-studio --version": [sys.executable, "-c", _ENTRY, "--version"],
    "ptq-studio quantize (usage error)": [sys.executable, "-c", _ENTRY, "quantize", "--bogus"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def run_once(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in bytes and exit code of one run of `cmd`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the maximum over all of them.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def main() -> None:
    """Measure every case and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; {args.repeats} runs each")
    print(f"{'command':<36} {'median s':>9} {'min s':>7} {'peak RSS MiB':>13} {'exit':>5}")
    for label, cmd in CASES.items():
        runs = [run_once(cmd) for _ in range(args.repeats)]
        walls = [r[0] for r in runs]
        rss = statistics.median(r[1] for r in runs) / 2**20
        codes = sorted({r[2] for r in runs})
        flag = "" if label.startswith("python") or statistics.median(walls) < TARGET_S else "  SLOW"
        print(
            f"{label:<36} {statistics.median(walls):>9.3f} {min(walls):>7.3f} {rss:>13.1f} "
            f"{','.join(map(str, codes)):>5}{flag}"
        )


if __name__ == "__main__":
    main()
