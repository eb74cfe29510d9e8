"""The installed package's import graph (read with ast, nothing imported): no circles, and
imports that go one way -- cli over server over engine, routes over services over state."""

from __future__ import annotations

import ast
from pathlib import Path

import tiller.engine
import tiller.server

import tiller

PACKAGES = {"tiller": Path(tiller.__file__).parent,
            "tiller.engine": Path(tiller.engine.__file__).parent,
            "tiller.server": Path(tiller.server.__file__).parent}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the tiller modules it imports (anywhere in it, functions included)."""
    mods = modules()
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from . import kernels` imports a module; `from .. import __version__` a name
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_graph_reads_every_module() -> None:
    edges = graph()
    assert {"tiller.cli", "tiller.engine.forward", "tiller.server.app"} <= set(edges)
    assert "tiller.engine.kernels" in edges["tiller.engine.forward"]  # `from . import kernels`
    assert "tiller.server.state" in edges["tiller.server.app"]


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_cycles_are_found() -> None:  # the check itself can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_imports_go_one_way() -> None:
    edges = graph()
    for name, targets in edges.items():
        for t in targets:
            if name.startswith("tiller.engine"):
                assert not t.startswith(("tiller.server", "tiller.cli")), (name, t)
            if name.startswith("tiller.server"):
                assert t != "tiller.cli", (name, t)
            if t == "tiller.server.app":
                assert name == "tiller.cli", f"{name} imports the composition root"
            if name.endswith("_routes") and t.endswith("_routes"):
                raise AssertionError(f"route module {name} imports route module {t}")
