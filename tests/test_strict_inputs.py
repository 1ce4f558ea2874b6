"""Issue 11: strict inputs, outputs checked first, exit codes, fast startup, a locked-down loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys; from core.cli import main; sys.exit(main())"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# startup: usage answers without torch or transformers (the time is measured by bench_startup)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["--version"], ["quantize", "--bogus"], ["report"], []])
def test_usage_answers_without_heavy_imports(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import json, sys\nfrom core.cli import main\nrc = main(sys.argv[1:]) if len(sys.argv) > 1 else None\n"
    code += "heavy = sorted(m for m in ('torch', 'transformers', 'tico', 'PySide6', 'numpy', 'PIL') if m in sys.modules)\n"
    code += "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report
    if args:
        assert report["rc"] == (0 if args[0].startswith("--") and args[0] != "--bogus" else 2)
