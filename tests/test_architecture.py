"""The shape of the package: what imports what inside `kd`.

The import graph is read from the source (the AST of every module), with the imports inside
functions counted as well as those at module level: a lazy import dodges a cycle at import time
but keeps the two modules knotted together. So does a registry of module names handed to
`importlib.import_module` (`kd.tasks.TASKS`): in a module that calls it, every string that names
a kd module is an edge. Only `if TYPE_CHECKING:` blocks (annotations, never run) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

KD = Path(__file__).resolve().parent.parent / "kd"


def modules() -> dict[str, Path]:
    """Every module of kd by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(KD.rglob("*.py")):
        parts = path.relative_to(KD.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, but those under `if TYPE_CHECKING:`."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if _type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _dynamic(tree: ast.AST, known: set[str]) -> set[str]:
    """The kd modules a module may load by name: with a call to `import_module` in it, every
    string constant that is a kd module's name."""
    calls = any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                == "import_module" for node in ast.walk(tree))
    return {node.value for node in ast.walk(tree) if calls and isinstance(node, ast.Constant)
            and isinstance(node.value, str) and node.value in known}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The kd modules `name` imports: `from a.b import c` is a.b.c when that is a module, else
    a.b; relative imports resolved against the module's package; modules loaded by name
    (`_dynamic`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    edges = _dynamic(tree, known) - {name}
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
                      ]
        for target in targets:
            while target and target not in known:  # `import kd.a.b.attr` style: the longest module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found))
            for name, path in found.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_reads_every_kind_of_import():
    edges = graph()
    assert "kd.lm" in edges["kd.tasks.causal_lm"]  # from kd import lm (a module by `from`)
    assert "kd.prepared.tokens" in edges["kd.tasks.causal_lm"]  # from kd.prepared import tokens
    assert "kd.cache" in edges["kd.tasks.causal_lm"]  # from kd.cache import Cache (a name: the package)
    assert "kd.tasks" in edges["kd.cli.eval"]  # an import inside a function
    assert "kd.tasks.causal_lm" in edges["kd.tasks"]  # a module loaded by name (TASKS)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kd_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
