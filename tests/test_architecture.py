"""The shape of the package, read from its source with ``ast``: the import graph of
neumuter_cli (every intra-package import, function-level ones included) has no cycle and at
most 8 layers; no private name is used by another module; no function is over 80 lines; and
every command of cli.py is thin (at most 40 lines besides its docstring, which is its --help)."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "neumuter_cli"
MAX_LAYERS = 8
MAX_FUNCTION_LINES = 80
MAX_COMMAND_LINES = 40


@lru_cache(maxsize=None)
def trees() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}


def imported_modules(tree: ast.Module) -> dict[str, str]:
    """``{name bound in the module: package module it refers to}`` for the package modules a
    module imports (``from . import mia``), and the package modules it imports names from."""
    modules = set(trees())
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").split(".")[0] == "neumuter_cli":
                parts = (node.module or "").split(".")
                source = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
                if source in modules:
                    found[f"<names of {source}>"] = source
                for alias in node.names:
                    if not source and alias.name in modules:
                        found[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "neumuter_cli" and len(parts) > 1 and parts[1] in modules:
                    found[f"<import {alias.name}>"] = parts[1]
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: set(imported_modules(tree).values()) - {name} for name, tree in trees().items()}


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 1 + the highest layer it imports (1: imports nothing of the package)."""
    depth: dict[str, int] = {}

    def of(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(name):] + (name,))}")
        if name not in depth:
            depth[name] = 1 + max((of(other, path + (name,)) for other in graph[name]), default=0)
        return depth[name]

    for name in graph:
        of(name, ())
    return depth


def functions():
    """(module, function, lines in all, lines besides its docstring) of every function."""
    for module, tree in trees().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                docstring = (first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr)
                             and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str) else 0)
                yield module, node.name, lines, lines - docstring


def test_the_import_graph_has_no_cycle_and_few_layers():
    depth = layers(import_graph())        # raises on a cycle, naming it
    deepest = max(depth, key=depth.get)
    assert depth[deepest] <= MAX_LAYERS, f"{deepest} is {depth[deepest]} layers deep (at most {MAX_LAYERS})"


def test_only_the_entry_points_import_the_cli():
    graph = import_graph()
    assert {name for name, imported in graph.items() if "cli" in imported} <= {"__main__", "manpages"}


def test_no_private_name_crosses_a_module():
    crossing = []
    for name, tree in trees().items():
        bound = imported_modules(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("neumuter_cli")):
                crossing += [f"{name} imports {alias.name} from {node.module or '.'}" for alias in node.names
                             if alias.name.startswith("_") and not alias.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                  and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{name} uses {node.value.id}.{node.attr}")
    assert not crossing, crossing


def test_no_function_is_over_80_lines():
    long = [f"{module}.{name}: {lines} lines" for module, name, lines, _ in functions() if lines > MAX_FUNCTION_LINES]
    assert not long, long


def test_every_command_is_thin():
    commands = [(name, code) for module, name, _, code in functions() if module == "cli" and name.endswith("_cmd")]
    assert len(commands) >= 7
    assert not [f"{name}: {code} lines" for name, code in commands if code > MAX_COMMAND_LINES]
