"""The code's direction: the command line assembles, the library computes.

An AST scan of every import in the package (function-level ones included):
library modules never import ``calm.cli``, and no two modules import each
other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "calm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The calm modules a file imports (``from calm.x import y`` counts calm.x, or calm.x.y
    when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    mods = set(files)
    g = {m: imports(p, mods) - {m} for m, p in files.items()}
    # A package's __init__ is imported with any of its submodules: not an edge of interest.
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}


def test_library_never_imports_the_command_line():
    bad = sorted(f"{m} imports {d}" for m, deps in graph().items() if not m.startswith("calm.cli")
                 for d in deps if d == "calm.cli" or d.startswith("calm.cli."))
    # The package's entry point (python -m calm) is the one place that starts the command line.
    assert [b for b in bad if not b.startswith("calm.__main__")] == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []
