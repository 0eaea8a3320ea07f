"""What methods exist, read from their own files without importing them.

Each method's file holds, beside its class, a module-level literal::

    METHOD_INFO = {
        "fd": {
            "help": "one line for `graceful-ray train --help`",
            "hyperparameters": {"fd_lambda": 1.0, ...},  # names and defaults
            "space": {"fd_lambda": "loguniform:1e-5:10"},  # tune --method fd
            "space_if": {"fd_kind=kl": {"fd_temperature": "loguniform:1:200"}},
            "tradeoff": {"order": 10, "space": {...}, "fixed": {"fd_kind": "lm-std"}},
        },
    }

* ``hyperparameters``: every ``<prefix>_<name>`` the class takes, with its
  default. They must equal the class's keyword arguments:
  :func:`graceful_ray.methods.registry.register_method` refuses a class that
  disagrees with its declaration, so the two cannot drift apart.
* ``space``: Tune's default ranges for a search of this method, in the
  ``--space`` syntax (``KIND:LOW:HIGH`` or ``choice:A,B``); ``space_if`` adds
  ranges when a search fixes a hyperparameter to a value (``--hp fd_kind=kl``
  searches the KL temperature too). Both optional.
* ``tradeoff``: the method takes part in the default search across methods
  (``graceful-ray tune`` without ``--method``), at position ``order``, with
  these ranges (default: ``space``) and values held fixed. Optional.

A file may declare several names (the variants ``fd-kl`` and ``fd-lm`` beside
``fd``). The built-in methods are the files under ``graceful_ray/methods/`` that
hold a ``METHOD_INFO``; methods from elsewhere are the modules named in
``$GRACEFUL_RAY_METHOD_MODULES`` (comma-separated, importable names), read the
same way. The registry imports every declaring module before it builds a
method, so a new method is one file and nothing else changes.

Why a literal that is *read* (``ast.literal_eval``), not imported: the method
files are torch modules, and importing torch takes seconds. The CLI lists the
methods in ``--help`` and refuses an unknown ``--method`` at once, and neither
may import torch (tests/test_cli_validation.py). Reading a literal keeps the
declaration in the method's own file, next to the code it describes, where a
separate torch-free metadata file per method would split every method in two
and a lazy torch import in every method file would be easy to break by
accident; flit reads a module's ``__version__`` the same way. The price is that
the declaration must be a plain literal (no names, no calls), which this module
checks and reports with the file's path.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graceful_ray.errors import ConfigError

#: Comma-separated modules, outside the package, that declare methods.
MODULES_ENV = "GRACEFUL_RAY_METHOD_MODULES"
DECLARATION = "METHOD_INFO"
PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = __name__.rpartition(".")[0]

_KEYS = {"help", "hyperparameters", "space", "space_if", "tradeoff"}
_TRADEOFF_KEYS = {"order", "space", "fixed"}
_DECLARES = re.compile(rf"^{DECLARATION}\b", re.MULTILINE)


@dataclass(frozen=True)
class Tradeoff:
    """How a method takes part in the default search across methods."""

    order: int
    space: dict[str, str]
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    """One declared method: see the module docstring for the fields."""

    name: str
    module: str
    help: str
    hyperparameters: dict[str, Any]
    space: dict[str, str] = field(default_factory=dict)
    space_if: dict[str, dict[str, str]] = field(default_factory=dict)
    tradeoff: Tradeoff | None = None

    def search_ranges(self, fixed: dict[str, Any] | None = None) -> dict[str, str]:
        """Tune's default ranges, given the hyperparameters a search holds ``fixed``:
        ``space``, plus every ``space_if`` block whose ``NAME=VALUE`` holds in ``fixed``."""
        fixed = fixed or {}
        ranges = dict(self.space)
        for condition, more in self.space_if.items():
            key, _, value = condition.partition("=")
            if key in fixed and str(fixed[key]) == value:
                ranges.update(more)
        return ranges


def declared() -> dict[str, MethodInfo]:
    """Every declared method by name: the built-in ones, then those of ``$GRACEFUL_RAY_METHOD_MODULES``."""
    out = dict(_builtin())
    for info in _extensions(os.environ.get(MODULES_ENV, "")):
        if info.name in out:
            raise ConfigError(f"method {info.name!r} of module {info.module} is already declared by "
                              f"{out[info.name].module}; pick another name")
        out[info.name] = info
    return out


def names() -> list[str]:
    """The declared method names, in declaration order."""
    return list(declared())


def info(name: str) -> MethodInfo | None:
    """The declaration of ``name`` (``None``: no file declares it)."""
    return declared().get(name)


def modules() -> list[str]:
    """The modules that declare methods, each once: importing them registers the classes."""
    return list(dict.fromkeys(i.module for i in declared().values()))


def tradeoff_methods() -> list[MethodInfo]:
    """The methods of the default search across methods, in their declared order."""
    return sorted((i for i in declared().values() if i.tradeoff is not None),
                  key=lambda i: (i.tradeoff.order, i.name))  # type: ignore[union-attr]


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, MethodInfo]:
    out: dict[str, MethodInfo] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        source = path.read_text()
        if not _DECLARES.search(source):  # most files declare nothing: skip parsing them
            continue
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        module = ".".join([PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)])
        for info_ in read_declarations(source, module, str(path)):
            if info_.name in out:
                raise ConfigError(f"method {info_.name!r} is declared by both {out[info_.name].module} "
                                  f"and {module}")
            out[info_.name] = info_
    return out


def declaration(module: str, name: str) -> MethodInfo | None:
    """What ``module`` itself declares for ``name`` (``None``: nothing), reading no
    other module: registering a class never depends on the rest of the catalogue."""
    if module.startswith(PACKAGE + "."):
        found = [i for i in _builtin().values() if i.module == module]
    else:
        found = list(_read_module(module) or ())
    return next((i for i in found if i.name == name), None)


@functools.lru_cache(maxsize=8)
def _extensions(value: str) -> tuple[MethodInfo, ...]:
    out: list[MethodInfo] = []
    for module in dict.fromkeys(m.strip() for m in value.split(",") if m.strip()):
        found = _read_module(module)
        if found is None:
            raise ConfigError(f"${MODULES_ENV} names {module!r}, which is not an importable Python source "
                              "file (is its directory on PYTHONPATH?)")
        if not found:
            raise ConfigError(f"${MODULES_ENV} names {module!r}, but it declares no method "
                              f"(a module-level {DECLARATION} = {{...}})")
        out.extend(found)
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _read_module(module: str) -> tuple[MethodInfo, ...] | None:
    """The declarations in ``module``'s source, found without executing it (``None``: no source)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    source = Path(spec.origin).read_text()
    if not _DECLARES.search(source):
        return ()
    return tuple(read_declarations(source, module, spec.origin))


def read_declarations(source: str, module: str, where: str = "") -> list[MethodInfo]:
    """The methods a module's source declares in its top-level ``METHOD_INFO`` literal (none: ``[]``)."""
    where = where or module
    node = None
    for stmt in ast.parse(source, filename=where).body:
        targets = (stmt.targets if isinstance(stmt, ast.Assign)
                   else [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == DECLARATION for t in targets):
            node = stmt.value
    if node is None:
        return []
    try:
        table = ast.literal_eval(node)
    except ValueError:
        raise ConfigError(f"{where}: {DECLARATION} must be a plain literal (dicts, strings, numbers; "
                          "no names or calls), because it is read without importing the module") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {DECLARATION} must map method names to their declarations")
    return [_method_info(name, entry, module, where) for name, entry in table.items()]


def _method_info(name: Any, entry: Any, module: str, where: str) -> MethodInfo:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: {DECLARATION}[{name!r}]: {what}")

    if not isinstance(name, str) or not name or "+" in name or name != name.strip() or " " in name:
        raise bad("a method name must be non-empty and contain no '+' or spaces")
    if not isinstance(entry, dict):
        raise bad("the declaration must be a dict")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise bad(f"unknown keys {unknown}; a declaration has {sorted(_KEYS)}")
    help_ = entry.get("help")
    if not isinstance(help_, str) or not help_.strip() or "\n" in help_:
        raise bad("'help' must be one non-empty line")
    hparams = entry.get("hyperparameters", {})
    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise bad("'hyperparameters' must map names to defaults")
    space = _ranges(entry.get("space", {}), bad, "space")
    space_if = entry.get("space_if", {})
    if not isinstance(space_if, dict) or not all(isinstance(k, str) and "=" in k for k in space_if):
        raise bad("'space_if' must map 'NAME=VALUE' to ranges")
    space_if = {k: _ranges(v, bad, f"space_if[{k!r}]") for k, v in space_if.items()}
    tradeoff = None
    if "tradeoff" in entry:
        t = entry["tradeoff"]
        if not isinstance(t, dict) or set(t) - _TRADEOFF_KEYS or not isinstance(t.get("order"), int):
            raise bad(f"'tradeoff' must be a dict with an int 'order' (keys {sorted(_TRADEOFF_KEYS)})")
        fixed = t.get("fixed", {})
        if not isinstance(fixed, dict):
            raise bad("'tradeoff'['fixed'] must map names to values")
        tradeoff = Tradeoff(t["order"], _ranges(t.get("space", space), bad, "tradeoff space"), dict(fixed))
    names_used = set(space) | {k for r in space_if.values() for k in r} | \
        {k.partition("=")[0] for k in space_if} | (set(tradeoff.space) | set(tradeoff.fixed) if tradeoff else set())
    foreign = sorted(names_used - set(hparams))
    if foreign:
        raise bad(f"{foreign} are searched or fixed but are not among its hyperparameters {sorted(hparams)}")
    return MethodInfo(name, module, help_.strip(), dict(hparams), space, space_if, tradeoff)


def _ranges(value: Any, bad, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and ":" in v
                                              for k, v in value.items()):
        raise bad(f"{what!r} must map hyperparameter names to ranges such as 'loguniform:0.01:10'")
    return dict(value)
