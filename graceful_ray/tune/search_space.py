"""What a search varies: method hyperparameters, the learning rate, the architecture.

A :class:`SearchSpace` is a set of named :class:`Param` ranges. Names say where a
sampled value goes in the :class:`~graceful_ray.train.config.UpgradeConfig`:

* ``lr`` (and ``weight_decay``) -> the optimizer;
* a method hyperparameter (``fd_lambda``, ``bct_lambda``, ...) -> ``cfg.hparams``
  (the prefixes make composite methods like ``bct+fd`` unambiguous);
* ``model.<kwarg>`` (``model.channels``, ``model.depth``) -> ``cfg.model_kwargs``;
* ``method`` (a choice of method specs) -> ``cfg.method``, and ``lr_schedule`` ->
  ``cfg.lr_schedule``: the default trade-off search (:func:`across_methods`) picks the
  method per trial; a trial keeps only the hyperparameters its method takes.

Spaces compose with ``+``, so the trade-off search is
``for_method("fd") + learning_rate()`` and the edge search is
``architecture("cnn1d", embedding_dim=64) + for_method("bct")``. The default
ranges of a method, and whether and how it takes part in the search across
methods, are declared in the method's own file (``METHOD_INFO``, read through
:mod:`graceful_ray.methods.catalog`); this module has no per-method knowledge.
Any range can be replaced from the command line as ``NAME=KIND:LOW:HIGH`` (see
:meth:`Param.parse`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from graceful_ray.errors import ConfigError
from graceful_ray.methods import catalog

# Lazy imports: Ray Tune and the methods' classes (torch) load only when a search space is built,
# not when the CLI checks names.

KINDS = ("loguniform", "uniform", "int", "choice")
MODEL_PREFIX = "model."
OPTIMIZER_KEYS = ("lr", "weight_decay")
METHOD_KEY = "method"
SCHEDULE_KEY = "lr_schedule"
PLAIN = "plain"


@dataclass(frozen=True)
class Param:
    """One searched dimension: a float range (log or linear), an int range, or choices."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"search parameter {self.name!r}: unknown kind {self.kind!r}; use one of {KINDS}")
        if self.kind == "choice":
            if not self.choices:
                raise ConfigError(f"search parameter {self.name!r}: a choice needs at least one value")
            return
        if self.low is None or self.high is None or not (self.low < self.high):
            raise ConfigError(f"search parameter {self.name!r}: need low < high, got {self.low}, {self.high}")
        if self.kind == "loguniform" and self.low <= 0:
            raise ConfigError(f"search parameter {self.name!r}: a log range needs low > 0, got {self.low}")

    @classmethod
    def parse(cls, name: str, text: str) -> "Param":
        """``loguniform:0.01:10``, ``uniform:0:10``, ``int:1:4`` or ``choice:8,16,32``."""
        kind, _, rest = text.partition(":")
        kind = kind.strip().lower()
        try:
            if kind == "choice":
                return cls(name, "choice", choices=tuple(_scalar(v) for v in rest.split(",") if v.strip()))
            low, high = rest.split(":")
            if kind == "int":
                return cls(name, "int", int(low), int(high))
            return cls(name, kind, float(low), float(high))
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(
                f"cannot parse search range {name}={text!r}: use loguniform:LOW:HIGH, uniform:LOW:HIGH, "
                "int:LOW:HIGH or choice:A,B,C") from None

    def to_tune(self):
        """The Ray Tune domain (OptunaSearch converts it to an Optuna distribution)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        return tune.choice(list(self.choices))

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return self.low <= value <= self.high

    def middle(self) -> Any:
        """A value inside the range: the first choice, the low int, the (geometric) midpoint."""
        if self.kind == "choice":
            return self.choices[0]
        if self.kind == "int":
            return int(self.low)
        if self.kind == "loguniform":
            return float((self.low * self.high) ** 0.5)
        return (self.low + self.high) / 2

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} ~ {self.kind}[{self.low:g}, {self.high:g}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "choices": list(self.choices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Param":
        return cls(d["name"], d["kind"], d.get("low"), d.get("high"), tuple(d.get("choices") or ()))


def _scalar(text: str) -> Any:
    text = text.strip()
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


#: The lr schedules the default search across methods tries: the schedule decides how
#: many flips there are to remove (the retrain-const rows of benchmarks/results/upgrade_methods.md).
SCHEDULES = ("cosine", "constant")

#: Architecture ranges of the small (edge) models, per zoo model.
ARCH_SPACES: dict[str, tuple[Param, ...]] = {
    "cnn1d": (Param("model.channels", "choice", choices=(4, 8, 16, 32)), Param("model.depth", "int", 1, 3)),
    "mlp": (Param("model.width", "choice", choices=(16, 32, 64, 128, 256)), Param("model.depth", "int", 1, 3)),
}


@dataclass
class SearchSpace:
    """Named ranges plus values held fixed for every trial."""

    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: "SearchSpace") -> "SearchSpace":
        clash = sorted(set(self.params) & set(other.params))
        if clash:
            raise ConfigError(f"search spaces both define {clash}; override one with SearchSpace.with_param")
        return SearchSpace({**self.params, **other.params}, {**self.fixed, **other.fixed})

    def __len__(self) -> int:
        return len(self.params)

    def with_param(self, param: Param) -> "SearchSpace":
        """A copy where ``param`` replaces (or adds) the range of that name."""
        fixed = {k: v for k, v in self.fixed.items() if k != param.name}
        return SearchSpace({**self.params, param.name: param}, fixed)

    def with_fixed(self, name: str, value: Any) -> "SearchSpace":
        """A copy where ``name`` is not searched but set to ``value`` in every trial."""
        return SearchSpace({k: v for k, v in self.params.items() if k != name}, {**self.fixed, name: value})

    def with_overrides(self, ranges: dict[str, str] | None) -> "SearchSpace":
        """Apply ``{"fd_lambda": "loguniform:0.1:100", "fd_beta": "5"}`` (a bare value fixes it)."""
        space = self
        for name, text in (ranges or {}).items():
            if isinstance(text, str) and ":" in text:
                space = space.with_param(Param.parse(name, text))
            else:
                space = space.with_fixed(name, _scalar(text) if isinstance(text, str) else text)
        return space

    def to_tune(self) -> dict[str, Any]:
        """The Tuner's ``param_space``: searched names only (fixed values travel in the trial spec)."""
        if not self.params:
            raise ConfigError("the search space is empty: nothing to tune")
        return {name: p.to_tune() for name, p in sorted(self.params.items())}

    def apply(self, base, sample: dict[str, Any]):
        """The :class:`UpgradeConfig` of one trial: ``base`` with the fixed and sampled values set."""
        values = {**self.fixed, **sample}
        hparams = dict(base.hparams)
        model_kwargs = dict(base.model_kwargs)
        top: dict[str, Any] = {}
        for name, value in values.items():
            if name in OPTIMIZER_KEYS:
                top[name] = float(value)
            elif name in (METHOD_KEY, SCHEDULE_KEY):
                top[name] = str(_plain(value))
            elif name.startswith(MODEL_PREFIX):
                model_kwargs[name[len(MODEL_PREFIX):]] = _plain(value)
            else:
                hparams[name] = _plain(value)
        if METHOD_KEY in values:  # a trial of a search across methods keeps what its method takes
            from graceful_ray.methods import valid_hyperparameters

            valid = set(valid_hyperparameters(top[METHOD_KEY]))
            hparams = {k: v for k, v in hparams.items() if k in valid}
        return replace(base, hparams=hparams, model_kwargs=model_kwargs, **top)

    @property
    def methods(self) -> tuple[str, ...]:
        """The method specs a search across methods chooses from (empty for a one-method search)."""
        p = self.params.get(METHOD_KEY)
        return tuple(str(c) for c in p.choices) if p is not None else ()

    def plain_point(self, lr: float | None = None, schedule: str | None = None) -> dict[str, Any] | None:
        """The trial every search across methods runs first: plain, at the base lr and schedule.

        Tune wants a value for every searched name; plain takes no hyperparameter,
        so the others get the middle of their range (and are dropped by :meth:`apply`).
        """
        if PLAIN not in self.methods:
            return None
        point: dict[str, Any] = {name: p.middle() for name, p in self.params.items()}
        point[METHOD_KEY] = PLAIN
        if lr is not None and "lr" in self.params:
            point["lr"] = float(lr)
        if schedule is not None and SCHEDULE_KEY in self.params:
            point[SCHEDULE_KEY] = schedule
        return point

    def validate_for(self, method: str) -> None:
        """Every method-hyperparameter name must be one ``method`` accepts (fail before any trial)."""
        from graceful_ray.methods import valid_hyperparameters

        methods = self.methods or (method,)
        valid = {h for m in methods for h in valid_hyperparameters(m)}
        method = "/".join(methods)
        names = set(self.params) | set(self.fixed)
        unknown = sorted(n for n in names if n not in OPTIMIZER_KEYS and n not in (METHOD_KEY, SCHEDULE_KEY)
                         and not n.startswith(MODEL_PREFIX) and n not in valid)
        if unknown:
            raise ConfigError(f"search space names {unknown} are not hyperparameters of method {method!r}; "
                              f"valid ones are {sorted(valid) or 'none'}, plus lr, weight_decay and model.<arg>")

    def describe(self) -> list[str]:
        return [p.describe() for _, p in sorted(self.params.items())] + \
               [f"{k} = {v!r} (fixed)" for k, v in sorted(self.fixed.items())]

    def to_dict(self) -> dict[str, Any]:
        return {"params": [p.to_dict() for _, p in sorted(self.params.items())], "fixed": dict(self.fixed)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        return cls({p["name"]: Param.from_dict(p) for p in d.get("params", [])}, dict(d.get("fixed") or {}))


def _plain(value: Any) -> Any:
    """numpy scalars (what Optuna and Tune hand out) as Python numbers, for JSON configs."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def for_method(method: str, fixed_hparams: dict[str, Any] | None = None) -> SearchSpace:
    """Default ranges for every part of ``method`` (``fd``, ``bct``, ``bct+fd`` ...).

    Each method's ranges are its declared ``space``, plus the ``space_if`` blocks
    that ``fixed_hparams`` select (``fd`` with ``fd_kind=kl`` also searches the KL
    temperature). Hyperparameters given in ``fixed_hparams`` (e.g. ``fd_kind=kl``
    or a pinned ``fd_beta``) are not searched.
    """
    from graceful_ray.methods import parse_spec  # torch: the registry imports the method modules

    fixed = dict(fixed_hparams or {})
    space = SearchSpace(fixed=fixed)
    for name in parse_spec(method):
        info = catalog.info(name)  # None: a class registered in-process without a declaration
        ranges = info.search_ranges(fixed) if info is not None else {}
        for pname, text in ranges.items():
            if pname not in fixed:
                space = space + SearchSpace({pname: Param.parse(pname, text)})
    return space


def tradeoff_methods() -> tuple[str, ...]:
    """The methods the default search across methods chooses from (besides plain), in order."""
    return tuple(i.name for i in catalog.tradeoff_methods())


def across_methods(methods: tuple[str, ...] | None = None, fixed_hparams: dict[str, Any] | None = None, *,
                   schedules: tuple[str, ...] = SCHEDULES) -> SearchSpace:
    """The default trade-off search: which method (plain always among them), its weights, the lr schedule.

    ``methods`` are methods that declare a ``tradeoff`` (default: all of them, in
    their declared order). Every trial samples every range, and
    :meth:`SearchSpace.apply` keeps the ones its method takes. ``fixed_hparams``
    (``--hp``) pin values as in :func:`for_method`.
    """
    declared = {i.name: i.tradeoff for i in catalog.tradeoff_methods()}
    names = tuple(methods) if methods else tuple(declared)
    unknown = [m for m in names if m not in declared]
    if unknown:
        raise ConfigError(f"no default search range for {unknown}; the search across methods knows "
                          f"{sorted(declared)} (or pass --method for a one-method search)")
    fixed = dict(fixed_hparams or {})
    space = SearchSpace({METHOD_KEY: Param(METHOD_KEY, "choice", choices=(PLAIN, *names))})
    for name in names:
        tradeoff = declared[name]
        assert tradeoff is not None
        space = space + SearchSpace({k: Param.parse(k, v) for k, v in tradeoff.space.items() if k not in fixed},
                                    {k: v for k, v in tradeoff.fixed.items() if k not in fixed})
    if len(schedules) > 1:
        space = space + SearchSpace({SCHEDULE_KEY: Param(SCHEDULE_KEY, "choice", choices=tuple(schedules))})
    return SearchSpace(space.params, {**space.fixed, **fixed})


def learning_rate(low: float = 1e-3, high: float = 1e-2) -> SearchSpace:
    return SearchSpace({"lr": Param("lr", "loguniform", low, high)})


def architecture(model: str, *, embedding_dim: int | None = None,
                 fixed_kwargs: dict[str, Any] | None = None) -> SearchSpace:
    """Small-model architectures for the edge search.

    ``embedding_dim`` is pinned (to the cloud model's) because BCT feeds the small
    model's embedding through the cloud model's head: the small backbone's last
    layer is then a learned projection into the cloud embedding space.
    """
    if model not in ARCH_SPACES:
        raise ConfigError(f"no architecture space for model {model!r}; built in for {sorted(ARCH_SPACES)} "
                          "(pass ranges as model.<arg>=KIND:LOW:HIGH for others)")
    fixed = {f"{MODEL_PREFIX}{k}": v for k, v in (fixed_kwargs or {}).items()}
    if embedding_dim is not None:
        fixed[f"{MODEL_PREFIX}embedding_dim"] = int(embedding_dim)
    return SearchSpace({p.name: p for p in ARCH_SPACES[model] if p.name not in fixed}, fixed)

