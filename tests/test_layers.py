"""The house's one-way layers, checked from the source: shards <- pipeline <- training <- tools.

Every import counts, at module level or inside a function (an import moved into a function to dodge a cycle is
still a dependency). A module may import its own layer and the layers below it, never one above; and no two
modules may reach each other through imports (a cycle makes both unreadable alone and their import order
fragile). Read with the standard library's `ast`, so the check needs none of the project's dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("shards", "pipeline", "training", "tools")  # lowest first


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its source: `from pkg import sub` counts as importing the
    module `pkg.sub` when that is one, else the package `pkg`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import shards.schema.x` -> the module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                    if layer(target) > layer(source))
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_see_what_they_must(tmp_path):
    """The checker itself: a known upward import and a known cycle are found, a relative import is resolved."""
    graph = {"shards.a": {"tools.x"}, "tools.x": {"tools.y"}, "tools.y": {"tools.x"}, "pipeline.b": set()}
    assert [f"{s} -> {t}" for s, ts in graph.items() for t in ts if layer(t) > layer(s)] == ["shards.a -> tools.x"]
    assert cycles(graph) == [["tools.x", "tools.y"]]
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("from . import other\nfrom .other import thing\ndef f():\n    import pkg.third\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.mod": source, "pkg.other": source,
               "pkg.third": source}
    assert imports_of("pkg.mod", source, modules) == {"pkg.other", "pkg.third"}
    graph = import_graph()
    assert "training.train" in graph and "shards.schema" in graph["pipeline.base"]
