"""No import circles inside a package of src/ahm.

A circle makes a module's behaviour depend on which of its members is imported first: the one imported second
sees the first half-initialised. Function-level imports count as edges too, because they run the same import
machinery on first call; deferring an import hides a circle from start-up, not from that first call.

Run as a script (`python tests/test_import_graph.py`) it prints every circle across src/ahm.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "ahm"


def module_files(src: Path = SRC, root: str = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module under `src/root` (a package is its __init__.py)."""
    found = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except under `if TYPE_CHECKING:` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """`name` itself when it is a module, else its longest prefix that is one (`ahm.x.func` -> `ahm.x`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _edges_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    targets: set[str] = set()
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found = _owning_module(alias.name, modules)
                if found:
                    targets.add(found)
            continue
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            base_parts = package[:len(package) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        base_module = _owning_module(base, modules)
        if base_module is None:
            continue
        plain_names = False
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:
                targets.add(sub)
            else:
                plain_names = True
        if plain_names or base_module != base:
            targets.add(base_module)
    targets.discard(name)
    return targets


def import_graph(src: Path = SRC, root: str = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports, at module level or inside functions."""
    modules = module_files(src, root)
    return {name: _edges_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one member, each sorted, iteratively (deep chains need no recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return sorted(found)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def cycles_within(package: str, graph: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Circles among the modules of `package` alone (a circle through another package is that one's)."""
    graph = import_graph() if graph is None else graph
    inside = {m: {t for t in targets if _within(t, package)} for m, targets in graph.items() if _within(m, package)}
    return strongly_connected(inside)


def test_graph_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\n"
                                      "def g():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a.f\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub.b"]]
    assert cycles_within("pkg.sub", graph) == []


def test_no_import_circles() -> None:
    cycles = cycles_within(ROOT)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


if __name__ == "__main__":
    for cycle in strongly_connected(import_graph()):
        print(" <-> ".join(cycle))
