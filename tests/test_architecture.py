"""The house's one-way doors, checked on the source (module-level imports).

Layers, lowest first: ``config`` (data) <- ``transports`` (the wire) <-
``processors`` (frame in, frame out; they may use the transport's frame and
call-control vocabulary) <- ``pipelines`` (composition, the server, commands)
<- ``bench`` (emulators and harness). An arrow may only point down. The product
imports ``bench`` only lazily, inside the commands that need an emulator.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "transports", "processors", "pipelines", "bench")
LAYER = {name: i for i, name in enumerate(PACKAGES)}
# What a lower layer may still import from a higher one: vocabulary, not behaviour.
ALLOWED_UP: dict[str, set[str]] = {}
# Product modules that exist to run emulators (imported lazily by the CLI only).
EMULATOR_COMMANDS = {"pipeswitch.pipelines.emulated", "pipeswitch.pipelines.demo"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return "pipeswitch." + ".".join(parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-level) pipeswitch imports of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing-only imports do not run
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            for n in names:
                if n.startswith("pipeswitch."):
                    (lazy if inner else top).add(n)
            visit(child, inner)

    visit(tree, False)
    return top, lazy


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    top: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "results" in path.parts:
                continue
            name = _module_name(path)
            top[name], lazy[name] = _imports(path)
    return top, lazy


def _package(module: str) -> str:
    return module.split(".")[1]


GRAPH, LAZY = _graph()


def test_the_graph_was_read() -> None:
    assert "pipeswitch.transports.server" in GRAPH
    assert "pipeswitch.config.settings" in GRAPH["pipeswitch.transports.server"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_arrows_point_down(module: str) -> None:
    src = _package(module)
    for target in GRAPH[module]:
        dst = _package(target)
        if LAYER[dst] <= LAYER[src] or target in ALLOWED_UP.get(module, set()):
            continue
        if module in EMULATOR_COMMANDS and dst == "bench":
            continue  # they exist to run emulators; nothing imports them eagerly (below)
        pytest.fail(f"{module} imports {target}: {src} may not depend on {dst}")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _package(m) != "bench"))
def test_product_imports_bench_only_lazily(module: str) -> None:
    if module in EMULATOR_COMMANDS:
        return
    eager = sorted(t for t in GRAPH[module] if _package(t) == "bench")
    assert not eager, f"{module} imports {eager} at import time (import it inside the command)"


def test_emulator_command_modules_are_only_imported_lazily() -> None:
    for module, targets in GRAPH.items():
        if _package(module) == "bench":
            continue
        eager = targets & EMULATOR_COMMANDS
        assert not eager, f"{module} imports {eager} at import time"


def test_no_import_cycles() -> None:
    """No cycle among imports, lazy ones included (Tarjan's strongly connected components).

    A lazy import that closes a cycle is still a cycle: it only hides it from Python.
    """
    graph = {m: GRAPH[m] | LAZY[m] for m in GRAPH}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, set()):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def top_level_arrows() -> dict[str, set[str]]:
    """Package -> packages it imports at module level (for the README and notes)."""
    arrows: dict[str, set[str]] = defaultdict(set)
    for module, targets in GRAPH.items():
        for t in targets:
            if _package(t) != _package(module):
                arrows[_package(module)].add(_package(t))
    return arrows
