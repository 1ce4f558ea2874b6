"""core/ must never import Qt (PySide6, pyqtgraph) or the app package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("PySide6", "shiboken6", "pyqtgraph", "app")

_PROBE = r"""
import importlib, json, pkgutil, sys
import core
names = ["core"]
for info in pkgutil.walk_packages(core.__path__, prefix="core."):
    importlib.import_module(info.name)
    names.append(info.name)
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden})
print(json.dumps({{"imported": names, "forbidden": forbidden}}))
"""


def test_core_and_every_submodule_import_without_qt() -> None:
    code = _PROBE.format(forbidden=repr(set(FORBIDDEN)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"core.errors", "core.cancel", "core.models", "core.data.images", "core.data.resources"}
    assert expected <= set(report["imported"])
    assert report["forbidden"] == [], f"core imported Qt/app modules: {report['forbidden']}"


@pytest.mark.parametrize("module", ["core.models", "core.data.images", "core.errors", "core.cancel", "core.data.resources"])
def test_module_has_public_docstrings(module: str) -> None:
    import importlib
    import inspect

    mod = importlib.import_module(module)
    assert mod.__doc__
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"{module}.{name} has no docstring"
