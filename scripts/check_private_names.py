"""A private name never crosses a module border: fails when one of our modules imports another's `_name`.

ruff's SLF001 (run by `make lint`) catches `obj._attr`; this catches what it cannot see:
`from core.x import _helper`, `import core.x as m ... m._helper` and `core.x._helper`. Third-party
private names (torch's, tico's) are ruff's business and need a `# noqa: SLF001 -- why` there.

    python scripts/check_private_names.py [root ...]    # exit 1 and one line per finding
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FIRST_PARTY = ("core", "app", "ptq_studio")
ROOTS = ("core", "app", "ptq_studio", "bench", "scripts")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in FIRST_PARTY


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of Name/Attribute nodes, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def findings(path: Path) -> list[str]:
    """One `file:line: text` per private name of another of our modules used in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: list[str] = []
    aliases: dict[str, str] = {}  # local name -> one of our modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module):
            for a in node.names:
                if _private(a.name):
                    out.append(f"{path}:{node.lineno}: imports private {node.module}.{a.name}")
                else:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _ours(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = _dotted(node.value)
            if base is None:
                continue
            head, _, rest = base.partition(".")
            if head in aliases:
                target = aliases[head] + ("." + rest if rest else "")
                if _is_module(target):
                    out.append(f"{path}:{node.lineno}: uses private {target}.{node.attr}")
    return out


def _is_module(dotted: str) -> bool:
    """Whether `dotted` names one of our modules or packages (so `x._y` is that module's private)."""
    p = Path(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path(r) for r in ROOTS if Path(r).exists()]
    files = sorted(f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py")))
    bad = [line for f in files for line in findings(f)]
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} private name(s) of another module used; make them public where they are defined")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
