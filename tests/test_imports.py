"""The package's imports, read with `ast` (module level and inside functions alike): no cycle
between modules or between the package's parts, and every import points down the layers of
docs/architecture.md (or stays within its own layer)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medmoe"

# Bottom to top, as in docs/architecture.md. A part may import its own layer's parts and the ones below.
LAYERS = [
    ("errors", "settings", "config", "files", "version"),
    ("data", "adapters", "projector"),
    ("vision", "moe"),
    ("model",),
    ("generation", "conversion"),
    ("engine",),
    ("loading", "training"),
    ("evaluation", "serving"),
    ("bench", "cli", "__main__", "__init__"),
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _resolve(name: str, node: ast.ImportFrom, known: dict[str, Path]) -> str:
    """The absolute module name an `ImportFrom` in module `name` names (before its imported names)."""
    if not node.level:
        return node.module or ""
    is_package = known[name].name == "__init__.py"
    base = name.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, known: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its code. `from X import y`
    counts as an import of the module X.y when there is one, else of X."""
    found = set()
    for node in ast.walk(ast.parse(known[name].read_text(), str(known[name]))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, node, known)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import medmoe.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE.name and target != name:
                found.add(target)
    return found


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports(name, known) for name in known}


def part(module: str) -> str:
    """The top-level part of the package a module belongs to: `model` for medmoe.model.modeling."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def edges():
    return graph(modules())


def test_every_part_of_the_package_has_a_layer():
    parts = {part(name) for name in modules()}
    assert parts - set(LAYER) == set(), "add the new part to LAYERS here and in docs/architecture.md"
    assert set(LAYER) - parts == set(), "a layer names a part the package no longer has"


def test_no_import_cycle_between_modules(edges):
    assert cycles(edges) == []


def test_no_import_cycle_between_parts(edges):
    between = {}
    for source, targets in edges.items():
        between.setdefault(part(source), set()).update(part(t) for t in targets if part(t) != part(source))
    assert cycles(between) == []


def test_imports_point_down_the_layers(edges):
    upward = sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                    if LAYER[part(target)] > LAYER[part(source)])
    assert upward == []


def test_the_core_imports_nothing_of_the_engine(edges):
    core = [name for name in edges if part(name) in ("moe", "model", "generation")]
    assert core and not [f"{c} -> {t}" for c in core for t in edges[c] if part(t) == "engine"]


def test_the_layers_are_the_ones_docs_architecture_lists():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    listed = re.findall(r"^\d+\. `([^`]+)`", text, flags=re.MULTILINE)
    assert listed == [" ".join(parts) for parts in LAYERS]


def test_the_walker_sees_cycles_and_function_level_imports(tmp_path):
    pkg = tmp_path / "medmoe"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from ..b import g\n    return g\n")
    (pkg / "b.py").write_text("from .a import x\nimport medmoe.a.x\ndef g(): pass\n")
    known = modules(pkg)
    edges = graph(known)
    assert edges["medmoe.a"] == {"medmoe.a.x"}
    assert edges["medmoe.a.x"] == {"medmoe.b"}  # inside a function, one level up from a module
    assert edges["medmoe.b"] == {"medmoe.a.x"}
    assert cycles(edges) == [["medmoe.a.x", "medmoe.b"]]
