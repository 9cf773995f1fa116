"""No import circles among the project's modules (module-level and function-level imports alike).

The graph is read from the source with :mod:`ast`: an edge ``a -> b`` for every ``import b`` /
``from b import x`` (and ``from b import submodule``) anywhere in ``a``, except under ``if
TYPE_CHECKING:``. A package's ``__init__`` counts as the package module. Cycles are found as the
strongly connected components of the graph (Tarjan) with more than one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("psfed_robust", "attacks", "defenses", "experiments")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    out: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name)
                if target:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_pkg else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            for alias in node.names:
                sub = resolve(f"{name}.{alias.name}")
                if sub and sub == f"{name}.{alias.name}":
                    out.add(sub)  # from package import submodule
                else:
                    target = resolve(name)
                    if target:
                        out.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    return {
        mod: _imports(ast.parse(path.read_text(), str(path)), mod, path.name == "__init__.py",
                      known)
        for mod, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sccs


def test_cycle_finder_on_a_known_graph() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(_cycles(g)) == [["a", "b", "c"], ["d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_parser_sees_function_level_and_skips_type_checking() -> None:
    src = (
        "from typing import TYPE_CHECKING\n"
        "import experiments.keys\n"
        "if TYPE_CHECKING:\n    from experiments.schema import SweepPoint\n"
        "def f():\n    from experiments import driver\n    from experiments.report import x\n"
    )
    known = {"experiments", "experiments.keys", "experiments.schema", "experiments.driver",
             "experiments.report"}
    got = _imports(ast.parse(src), "experiments.cli", False, known)
    assert got == {"experiments.keys", "experiments.driver", "experiments.report"}


def test_no_import_cycles_in_experiments() -> None:
    cycles = [c for c in _cycles(import_graph()) if any(m.startswith("experiments") for m in c)]
    assert not cycles, f"import cycles involving experiments/: {cycles}"


def test_no_import_cycles_elsewhere() -> None:
    cycles = [c for c in _cycles(import_graph())
              if not any(m.startswith("experiments") for m in c)]
    assert not cycles, f"import cycles in psfed_robust/attacks/defenses: {cycles}"
