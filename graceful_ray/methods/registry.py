"""Method names, and building a (composite) method from a spec string.

A spec names one method or several joined by ``+`` (``"bct+fd"``). Every
hyperparameter is routed by its prefix to exactly one method, so a composite is
unambiguous.

A method is one file: its class, decorated ``@register_method(name)``, and its
declaration (``METHOD_INFO``: help line, hyperparameters with their defaults,
Tune ranges; see :mod:`graceful_ray.methods.catalog`). The registry imports
every declaring module (:func:`load_methods`) before it looks a name up, so
neither this file, the package's ``__init__``, the CLI nor Tune change when a
method is added. ``graceful-ray train --help`` lists the methods with their
hyperparameters and defaults.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, TypeVar

from graceful_ray.errors import ConfigError
from graceful_ray.methods import catalog
from graceful_ray.methods.base import Composite

METHODS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make the method buildable as ``name`` in a spec."""
    if not name or "+" in name or name != name.strip():
        raise ConfigError(f"invalid method name {name!r}: it must be non-empty and contain no '+' or spaces")

    def deco(cls: T) -> T:
        if name in METHODS and METHODS[name] is not cls:
            raise ConfigError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
        declared = catalog.declaration(cls.__module__, name)
        if declared is not None:  # an undeclared class (a test's) is buildable but not listed
            check_declaration(cls, declared)
        METHODS[name] = cls
        return cls

    return deco


def declared_defaults(cls: type) -> dict[str, Any]:
    """``{"<prefix>_<suffix>": default}`` of a method class's keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    return {full: params[kwarg].default for full, kwarg in cls.hyperparameter_names().items()}


def check_declaration(cls: type, info: catalog.MethodInfo) -> None:
    """``cls`` must live in the module that declares ``info`` and take exactly the
    declared hyperparameters, with the declared defaults."""
    if cls.__module__ != info.module:
        raise ConfigError(f"method name {info.name!r} is declared by {info.module}; "
                          f"{cls.__module__}.{cls.__name__} cannot register it")
    actual = declared_defaults(cls)
    if actual != info.hyperparameters:
        raise ConfigError(f"method {info.name!r}: {info.module} declares hyperparameters "
                          f"{info.hyperparameters} but {cls.__name__} takes {actual}; make them equal")


def load_methods() -> None:
    """Import every module that declares a method (each registers its classes on import)."""
    for module in catalog.modules():
        importlib.import_module(module)
    missing = [(i.name, i.module) for i in catalog.declared().values() if i.name not in METHODS]
    if missing:
        raise ConfigError(f"declared methods with no registered class: "
                          f"{', '.join(f'{n} (in {m})' for n, m in missing)}; "
                          "decorate the class with @register_method(name)")


def parse_spec(spec: str) -> list[str]:
    """``"bct + fd"`` -> ``["bct", "fd"]``, checking every name is registered and used once."""
    load_methods()
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty method spec {spec!r}; use one of {sorted(METHODS)} or several joined by '+'")
    names = [part.strip().lower() for part in spec.split("+")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(
            f"unknown method {unknown[0]!r} in spec {spec!r}; valid methods are {sorted(METHODS)} "
            "(combine several with '+', e.g. 'bct+fd')"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"method spec {spec!r} names a method twice")
    prefixes: dict[str, str] = {}
    for n in names:
        p = METHODS[n].prefix
        if p in prefixes:
            raise ConfigError(
                f"methods {prefixes[p]!r} and {n!r} in {spec!r} are variants of the same method "
                f"(both take '{p}_*' hyperparameters); pick one"
            )
        prefixes[p] = n
    return names


def valid_hyperparameters(spec: str) -> list[str]:
    """Every hyperparameter name ``build_method(spec, ...)`` accepts."""
    return sorted(h for n in parse_spec(spec) for h in METHODS[n].hyperparameter_names())


def build_method(spec: str, **hparams: Any):
    """Build the method(s) named by ``spec`` with prefixed hyperparameters.

    Always returns a :class:`~graceful_ray.methods.base.Composite` (of one method
    when ``spec`` names one), so cross-entropy is counted once and the trainer
    sees one type. Unknown names or hyperparameters raise
    :class:`~graceful_ray.errors.ConfigError` listing the valid ones.
    """
    names = parse_spec(spec)
    routes: dict[str, tuple[int, str]] = {}
    for i, n in enumerate(names):
        for full, kwarg in METHODS[n].hyperparameter_names().items():
            routes[full] = (i, kwarg)
    unknown = sorted(k for k in hparams if k not in routes)
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {unknown} for method {spec!r}; valid ones are "
            f"{sorted(routes) or 'none'}"
        )
    kwargs: list[dict[str, Any]] = [{} for _ in names]
    for full, value in hparams.items():
        i, kwarg = routes[full]
        kwargs[i][kwarg] = value
    methods = []
    for n, kw in zip(names, kwargs):
        try:
            methods.append(METHODS[n](**kw))
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid hyperparameters for method {n!r}: {e}") from e
    return Composite(methods)
