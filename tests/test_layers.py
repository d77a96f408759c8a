"""The package's structure: every module sits in one layer and imports only from its layer or below.

Invariant protected: no import circle, no upward import, and no forkpoint module imported inside a
function (a function-local import is how a circle hides). docs/architecture.md has the same map.
Read from the source with ``ast``: nothing is imported or run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(__file__).resolve().parent.parent / "forkpoint"

LAYERS: dict[str, list[str]] = {
    "os": ["_errors", "_record", "_clone", "_prctl", "_sigutil", "_procfs", "_elfsym", "_nativepools", "_locks",
           "_connections", "_terminal"],
    "data and wire": ["_channel", "arena", "policy", "_rundir", "_qkeys", "_qtable", "_qhost", "_threadmarks"],
    "shepherd": ["_loop", "_faultreport", "_budget", "_orphans", "_control", "_qredis", "_qkeeper",
                 "_witness", "_notify", "_registry", "_shepherd_signals", "_shepherd_restores", "_shepherd_limits",
                 "_shepherd"],
    "program side": ["_identity", "_children", "_cputime", "_eventloop", "_logqueues", "_asgiloop", "_qlookup", "_runtime", "_frozen",
                     "_fdholder"],
    "public api": ["snapshots", "persist", "recovery", "watchdog", "checkpointed", "_serving", "wsgi", "asgi"],
    "faces": ["__init__", "__main__", "operator", "_qadmin", "cli", "demo", "bench"],
}
RANK = {mod: i for i, mods in enumerate(LAYERS.values()) for mod in mods}


def _imports(path: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(module-level imports, imports inside a function or class) of forkpoint modules."""
    tree = ast.parse(path.read_text(), str(path))
    top: list[tuple[str, int]] = []
    nested: list[tuple[str, int]] = []

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name.split(".")[1] if a.name.startswith("forkpoint.") else "__init__"
                    for a in node.names if a.name.split(".")[0] == "forkpoint"]
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "forkpoint":
                return []
            base = (node.module or "") if node.level else (node.module or "").removeprefix("forkpoint")
            base = base.lstrip(".")
            if base:
                return [base.split(".")[0]]
            return [a.name for a in node.names]       # from . import x, y
        return []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            found = names(child)
            (nested if inside else top).extend((n, child.lineno) for n in found)  # type: ignore[attr-defined]
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                                      ast.ClassDef)))

    visit(tree, False)
    return top, nested


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(RANK))
    assert not missing, f"modules with no layer in tests/test_layers.py (and docs/architecture.md): {missing}"


def test_imports_go_down_or_sideways_only():
    upward = []
    for mod, path in _modules().items():
        top, _ = _imports(path)
        for target, line in top:
            assert target in RANK, f"{path.name}:{line} imports unknown forkpoint module {target!r}"
            if RANK[target] > RANK[mod]:
                upward.append(f"{mod} ({_layer(mod)}) -> {target} ({_layer(target)}) at line {line}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_forkpoint_import_inside_a_function():
    local = [f"{path.name}:{line} imports {target}" for mod, path in _modules().items()
             for target, line in _imports(path)[1]]
    assert not local, "function-local imports of forkpoint modules:\n" + "\n".join(local)


def test_no_import_circle():
    graph = {mod: {t for t, _ in _imports(path)[0] if t != mod} for mod, path in _modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for nxt in sorted(graph.get(mod, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def _layer(mod: str) -> str:
    return next(name for name, mods in LAYERS.items() if mod in mods)


def test_the_checker_sees_what_it_checks(tmp_path):
    """The rules above would catch a function-local import and a relative one (the checker works)."""
    p = tmp_path / "x.py"
    p.write_text("from . import _clone\nfrom .arena import Arena\nimport forkpoint\n"
                 "def f():\n    from . import snapshots\n    import forkpoint.operator\n")
    top, nested = _imports(p)
    assert [t for t, _ in top] == ["_clone", "arena", "__init__"]
    assert [t for t, _ in nested] == ["snapshots", "operator"]
