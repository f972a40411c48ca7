"""The package's modules import one another without cycles, counting imports inside functions and under
TYPE_CHECKING: a cycle means two modules that cannot be understood, tested or moved apart."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moe_merge": "moe_merge", "kernels": "moe_merge.kernels", "routers": "moe_merge.routers"}


def modules() -> dict[str, Path]:
    """Every module of the installed package by its import name (kernels/ installs as moe_merge.kernels)."""
    out = {}
    for folder, package in PACKAGES.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = [p for p in file.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = file
    return out


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports anywhere in its file (a name imported from a package counts as its
    module when it is one, else as the package)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                out.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_lazy_import_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import p.b\n")
    b.write_text("def f():\n    from p import a\n")
    known = {"p.a": a, "p.b": b}
    assert cycles({n: imports(n, f, known) for n, f in known.items()}) == [["p.a", "p.b"]]


def test_the_package_has_no_import_cycles():
    known = modules()
    assert "moe_merge.kernels.dispatch" in known and "moe_merge.config" in known
    graph = {name: imports(name, file, known) for name, file in known.items()}
    assert graph["moe_merge.config"] >= {"moe_merge.methods", "moe_merge.merge"}  # the graph sees real edges
    assert cycles(graph) == []
