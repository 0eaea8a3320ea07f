"""Method names, and building a (composite) method from a spec string.

A spec names one method or several joined by ``+`` (``"bct+fd"``). Every
hyperparameter is routed by its prefix to exactly one method, so a composite is
unambiguous:

================  ==========================================================
method            hyperparameters (defaults)
================  ==========================================================
``plain``         none
``bct``           ``bct_lambda`` (1.0), ``bct_kind`` ("auto": cosine when classes are added, else linear),
                  ``bct_scale`` (16, cosine only)
``l2``            ``l2_lambda`` (1.0)
``fd``            ``fd_kind`` ("lm", or "lm-std", "kl"), ``fd_alpha`` (1), ``fd_beta`` (5),
                  ``fd_lambda`` (1), ``fd_temperature`` (100, kl only)
``fd-kl``         ``fd_alpha``, ``fd_beta``, ``fd_lambda``, ``fd_temperature``
``fd-lm``         ``fd_alpha``, ``fd_beta``, ``fd_lambda``
``kd``            ``kd_kind`` ("lm"), ``kd_lambda`` (1), ``kd_temperature`` (100)
``elodi``         ``elodi_lambda`` (1), ``elodi_xi`` (0.5), ``elodi_p`` (2),
                  ``elodi_refs`` ("": the old model; or "NAME@v1,NAME@v5": an ensemble)
``new-error``     ``ne_lambda`` (1), ``ne_kind`` ("weighted", or "strict"):
                  BackwardCompatibilityML's new-error losses
``lqf``           ``lqf_kfac`` (true), ``lqf_damping`` (1e-2), ``lqf_update_every``
                  (10), ``lqf_target_scale`` (1), ``lqf_layers`` ("all"),
                  ``lqf_momentum`` (0.9), ``lqf_init`` ("parent"),
                  ``lqf_registry`` (""), ``lqf_export_format`` ("linearized"),
                  ``lqf_head_scale`` ("auto"); squared loss instead of
                  cross-entropy (see methods/lqf/)
================  ==========================================================

Adding a method is one module with a class decorated ``@register_method(name)``,
imported by ``graceful_ray/methods/__init__.py``; the trainer does not change.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from graceful_ray.errors import ConfigError

METHODS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make the method buildable as ``name`` in a spec."""
    if not name or "+" in name or name != name.strip():
        raise ConfigError(f"invalid method name {name!r}: it must be non-empty and contain no '+' or spaces")

    def deco(cls: T) -> T:
        if name in METHODS and METHODS[name] is not cls:
            raise ConfigError(f"method name {name!r} is already registered to {METHODS[name].__name__}")
        METHODS[name] = cls
        return cls

    return deco


def parse_spec(spec: str) -> list[str]:
    """``"bct + fd"`` -> ``["bct", "fd"]``, checking every name is registered and used once."""
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
    from graceful_ray.methods.base import Composite

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
