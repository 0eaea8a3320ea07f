"""The package's import graph: every import goes down the pipeline, and none goes round.

Read from the source with ``ast`` (imports inside functions included, since a
function-level import is still a dependency), so a module that reaches up into
a later stage, or two modules that need each other, fail here rather than
surprise the next reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "graceful_ray"

#: The pipeline, bottom first. A module may import from its own layer or below.
LAYERS: list[set[str]] = [
    {"errors", "paths", "keyvalue", "storage", "raycluster"},  # shared basics
    {"data", "models", "metrics"},
    {"methods", "registry"},
    {"train"},
    {"evaluate", "tune", "interpolate"},
    {"serve", "retrieval"},
    {"cli", "demo", "__init__"},  # the command line and the demo, on top
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path) -> str:
    parts = ["graceful_ray", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _target(name: str) -> str | None:
    """The package module an imported name lives in (a module, or the module defining it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, source: str, is_package: bool = False) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            # ``from pkg import sub`` depends on pkg.sub, not on pkg's __init__
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out |= {t for n in names if n.startswith("graceful_ray") and (t := _target(n)) and t != module}
    return out


GRAPH = {m: _imports(m, p.read_text(), p.name == "__init__.py") for m, p in MODULES.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_of_the_package_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(LAYER), \
        f"place these in LAYERS: {sorted({_part(m) for m in MODULES} - set(LAYER))}"


def test_no_module_imports_from_a_later_stage():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                    if LAYER[_part(b)] > LAYER[_part(a)])
    assert not upward, "imports that reach up the pipeline:\n" + "\n".join(upward)


def test_methods_never_open_the_registry():
    """Models a method needs (LQF's parent, ELODI's references) come through the
    trainer's UpgradeContext.load_model, so methods stay below the registry's I/O."""
    opened = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a.startswith("graceful_ray.methods")
                    for b in targets if b.startswith("graceful_ray.registry"))
    assert not opened, opened


def test_no_import_cycle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_a_function_level_import_is_an_edge():
    """An import hidden in a function is still a dependency: the check must see it."""
    source = MODULES["graceful_ray.data.read"].read_text()
    late = source + "\n\ndef _late():\n    from graceful_ray.train.config import UpgradeConfig\n"
    assert "graceful_ray.train.config" not in _imports("graceful_ray.data.read", source)
    assert "graceful_ray.train.config" in _imports("graceful_ray.data.read", late)
