"""The package's import structure: no loops, a ground floor that imports nothing above it, and
three parts that never import each other. Every import counts, ``TYPE_CHECKING`` ones too: a
loop hidden from the interpreter is still a loop for whoever reads the code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("broker", "worker", "client")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base, prefix in [(ROOT / "zrouter", "zrouter"), *((ROOT / p, f"zrouter.{p}") for p in PARTS)]:
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [prefix, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not any(name.startswith(f"zrouter.{p}") for p in PARTS) or prefix != "zrouter":
                found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    # A package's __init__ re-exporting its own modules is how packages work, not a loop: leave
    # out the edges from a module to the package(s) that contain it.
    return {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}


def test_the_walk_sees_every_part() -> None:
    graph = _graph()
    for name in ("zrouter.protocol", "zrouter.broker.server", "zrouter.worker._worker", "zrouter.client._sync"):
        assert name in graph
    assert "zrouter.protocol" in graph["zrouter.broker.router"]


def test_no_import_loops() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                loops.append([*stack[stack.index(m):], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_ground_floor_and_parts_stay_apart() -> None:
    for name, targets in _graph().items():
        part = next((p for p in PARTS if name.startswith(f"zrouter.{p}")), None)
        for t in targets:
            other = next((p for p in PARTS if t.startswith(f"zrouter.{p}")), None)
            if part is None:
                assert other is None, f"{name} (ground floor) imports {t}"
            else:
                assert other in (None, part), f"{name} imports {t}: the parts never import each other"
