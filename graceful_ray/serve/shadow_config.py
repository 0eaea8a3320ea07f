"""Configuration of the shadow-mode application, as frozen dataclasses.

One :class:`ShadowConfig` describes a whole deployment: which two registry
versions are compared, where the comparison log goes, the gates, and the
resources of every deployment. It is built once (from the CLI, a Serve config
YAML's ``args``, or Python), validated here so a typo fails at deploy time with
a message instead of inside a replica, and pickled into every deployment.

The admin token itself is never part of the config: only its sha256 is, or the
name of an environment variable the router reads when it starts. That keeps the
secret out of Serve's stored deployment config and out of every log line that
prints a config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, create_model, model_validator

from graceful_ray.errors import ConfigError

# Lazy imports: Ray Serve loads only to build a deployment's autoscaling config, not to read or
# check a config.

#: Nested settings refuse unknown fields when pydantic reads them too (ShadowAppArgs).
_FORBID_EXTRA = ConfigDict(extra="forbid")

#: Roles are fixed for the life of a deployment: ``baseline`` is the model that
#: was in production when shadowing started, ``candidate`` the one on trial.
#: Which of the two is *primary* (answers callers) changes on cutover/rollback.
BASELINE = "baseline"
CANDIDATE = "candidate"
ROLES = (BASELINE, CANDIDATE)

DEFAULT_TOKEN_ENV = "GRACEFUL_RAY_ADMIN_TOKEN"

#: The largest ``max_search_k`` a deployment may allow (the searcher's own limit).
MAX_SEARCH_K = 10_000


def other(role: str) -> str:
    """The other role: the shadow of a primary and vice versa."""
    return CANDIDATE if role == BASELINE else BASELINE


def hash_token(token: str) -> str:
    """The sha256 hex digest the router compares bearer tokens against."""
    if not token or not token.strip():
        raise ConfigError("the admin token is empty: set a long random string")
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Resources:
    """What one deployment asks Ray for, per replica.

    Fractional ``num_cpus`` is the default on purpose: Serve's default of one
    CPU per replica means four replicas never start on a two-core machine.

    ``autoscaling_config`` (Serve's own fields: ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``, ...) replaces the fixed
    ``num_replicas``: Serve then scales the deployment between the bounds.
    """

    __pydantic_config__ = _FORBID_EXTRA

    num_replicas: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_ongoing_requests: int = 256
    autoscaling_config: Mapping[str, Any] | None = None

    def validate(self, what: str) -> None:
        if isinstance(self.num_replicas, bool) or not isinstance(self.num_replicas, int) \
                or self.num_replicas < 1:
            raise ConfigError(f"{what}.num_replicas must be an integer >= 1, got "
                              f"{self.num_replicas!r}")
        for name in ("num_cpus", "num_gpus"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 \
                    or not math.isfinite(v):
                raise ConfigError(f"{what}.{name} must be a number >= 0, got {v!r}")
        if not isinstance(self.max_ongoing_requests, int) or self.max_ongoing_requests < 1:
            raise ConfigError(f"{what}.max_ongoing_requests must be an integer >= 1, got "
                              f"{self.max_ongoing_requests!r}")
        if self.autoscaling_config is not None:
            self._validate_autoscaling(what)

    def _validate_autoscaling(self, what: str) -> None:
        # Serve's own model checks the fields, so a typo fails here at deploy
        # time, not in the controller; imported here because ray.serve is heavy.
        from ray.serve.config import AutoscalingConfig

        if not isinstance(self.autoscaling_config, Mapping):
            raise ConfigError(f"{what}.autoscaling_config must be a mapping of Serve's "
                              f"autoscaling fields, got {self.autoscaling_config!r}")
        if self.num_replicas != 1:
            raise ConfigError(f"{what}: give num_replicas or autoscaling_config, not both "
                              "(autoscaling_config.initial_replicas sets the start)")
        # Serve's model ignores unknown keys: a misspelled max_replicas would
        # leave the deployment at its default of one replica without a word.
        known = set(getattr(AutoscalingConfig, "model_fields", None)
                    or AutoscalingConfig.__fields__)
        unknown = sorted(set(self.autoscaling_config) - known)
        if unknown:
            raise ConfigError(f"unknown {what}.autoscaling_config field(s) {unknown}; "
                              f"known: {sorted(known)}")
        try:
            AutoscalingConfig(**self.autoscaling_config)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, TypeError
            raise ConfigError(f"invalid {what}.autoscaling_config: {e}") from None

    def actor_options(self) -> dict[str, float]:
        return {"num_cpus": float(self.num_cpus), "num_gpus": float(self.num_gpus)}

    def replica_options(self) -> dict[str, Any]:
        """How many replicas, as Serve's ``.options()`` takes it: fixed or autoscaled."""
        if self.autoscaling_config is not None:
            return {"autoscaling_config": dict(self.autoscaling_config)}
        return {"num_replicas": self.num_replicas}


@dataclass(frozen=True)
class Batching:
    """``@serve.batch`` settings: requests per model call and how long to wait for them.

    A request may carry several rows (up to ``max_inputs_per_request``); batches
    count requests, because counting rows with Serve's ``batch_size_fn`` costs
    time quadratic in the batch on every batch.
    """

    __pydantic_config__ = _FORBID_EXTRA

    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.002

    def validate(self, what: str) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"{what}.max_batch_size must be an integer >= 1, got "
                              f"{self.max_batch_size!r}")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) \
                or not 0 <= self.batch_wait_timeout_s <= 10:
            raise ConfigError(f"{what}.batch_wait_timeout_s must be in [0, 10] seconds, got "
                              f"{self.batch_wait_timeout_s!r}")

    @classmethod
    def from_user_config(cls, d: Mapping[str, Any] | None, what: str) -> "Batching":
        """A deployment's Serve ``user_config`` (``max_batch_size``,
        ``batch_wait_timeout_s``), applied by ``reconfigure`` without a restart."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{what} must be a mapping of max_batch_size and "
                              f"batch_wait_timeout_s, got {type(d).__name__}")
        batching = _from_mapping(cls, d, what)
        batching.validate(what)
        return batching


@dataclass(frozen=True)
class GateConfig:
    """When a candidate may replace the primary, and when the watch after a
    cutover rolls it back. Every rate is judged by its anytime-valid confidence
    sequence (``confidence``; :mod:`graceful_ray.metrics.sequential`), so the
    report may be watched live and the cutover retried as labels arrive: the
    NFR, disagreement and error-rate checks use the *upper* end, agreement the
    *lower*; each end errs with probability ``(1 - confidence) / 2`` over all
    looks together.
    """

    __pydantic_config__ = _FORBID_EXTRA

    min_labelled: int = 200          # labelled pairs (both decisions + true label)
    max_nfr: float = 0.02            # NFR upper bound must be <= this
    min_agreement: float = 0.90      # agreement lower bound must be >= this
    max_latency_ratio: float = 1.5   # candidate p99 <= this x baseline p99
    max_error_rate: float = 0.05     # candidate shadow-error upper bound <= this
    min_latency_samples: int = 50    # per model, before the latency check can pass
    confidence: float = 0.95
    max_disagreement: float | None = None  # disagreement upper bound <= this (None: no check)
    min_compared: int = 200          # compared pairs before a label-free bound counts
    max_slice_nfr: float | None = None  # refuse when a class or segment's NFR is shown above
                                     # this (lower bound, Bonferroni over slices; None: off)
    min_slice_labelled: int = 100    # labelled pairs before a slice is judged
    auto_rollback: bool = False      # after cutover, roll back on its own when the flips
                                     # since show the NFR (or a slice's) above its budget

    def validate(self) -> None:
        for name in ("max_disagreement", "max_slice_nfr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not 0 <= v <= 1):
                raise ConfigError(f"gates.{name} must be a rate in [0, 1] or null, got {v!r}")
        if not isinstance(self.auto_rollback, bool):
            raise ConfigError(f"gates.auto_rollback must be true or false, got "
                              f"{self.auto_rollback!r}")
        for name in ("min_labelled", "min_latency_samples", "min_compared",
                     "min_slice_labelled"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"gates.{name} must be an integer >= 0, got {v!r}")
        for name in ("max_nfr", "min_agreement", "max_error_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"gates.{name} must be a rate in [0, 1], got {v!r}")
        if isinstance(self.max_latency_ratio, bool) \
                or not isinstance(self.max_latency_ratio, (int, float)) \
                or not self.max_latency_ratio > 0:
            raise ConfigError(f"gates.max_latency_ratio must be > 0, got "
                              f"{self.max_latency_ratio!r}")
        if not isinstance(self.confidence, float) or not 0 < self.confidence < 1:
            raise ConfigError(f"gates.confidence must be in (0, 1), got {self.confidence!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "GateConfig":
        gates = _from_mapping(cls, d or {}, "gates")
        gates.validate()
        return gates


@dataclass(frozen=True)
class ShadowConfig:
    """Everything one shadow deployment needs; see the module docstring.

    ``baseline`` and ``candidate`` are registry references (``name@production``,
    ``name@v3``); :func:`graceful_ray.serve.app.build_app` pins them to exact
    versions, so a replica restarted later loads the same weights even if an
    alias has moved in the meantime.
    """

    registry: str
    baseline: str
    candidate: str
    storage: str
    shadow_fraction: float = 1.0
    shadow_timeout_s: float = 2.0
    max_shadow_inflight: int = 512       # rows in flight to the shadow, per router replica
    shadow_coalesce_s: float = 0.1       # shadow copies within this window share one call:
                                         # each call costs the shadow's replica ~4 ms of CPU
                                         # on a small model (benchmarks/results/serve_shadow.md)
    shadow_coalesce_rows: int = 64       # ...of at most this many rows (0 s: no coalescing)
    shadow_breaker_failures: int = 5     # this many failed shadow calls in a row stop the
                                         # copies (counted as circuit_open) for a cool-down,
    shadow_breaker_cooldown_s: float = 1.0  # ...doubling after each failed probe (<= 30 s);
                                         # 0 failures: always send
    max_inputs_per_request: int = 64
    max_request_bytes: int = 4 * 1024 * 1024  # larger bodies are answered 413 (any route)
    primary_in_ingress: bool = True      # run the primary inside the router (fastest)
    production_alias: str | None = "production"
    admin_token_sha256: str | None = field(default=None, repr=False)
    admin_token_env: str = DEFAULT_TOKEN_ENV
    gates: GateConfig = field(default_factory=GateConfig)
    router: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))
    baseline_resources: Resources = field(default_factory=Resources)
    candidate_resources: Resources = field(default_factory=Resources)
    comparator: Resources = field(default_factory=lambda: Resources(num_cpus=0.1,
                                                                    max_ongoing_requests=1000))
    primary_batching: Batching = field(default_factory=Batching)
    shadow_batching: Batching = field(default_factory=lambda: Batching(64, 0.005))
    comparator_shards: int = 1           # comparator deployments, records split by request
                                         # id (see serve.shards); shard 0 owns the routing
    flush_records: int = 5000            # write a Parquet file every this many records...
    flush_interval_s: float = 10.0       # ...or this often, whichever comes first
    feedback_grace_s: float = 1.0        # how long feedback waits for a record in flight
    max_tracked_records: int = 1_000_000  # request ids kept in memory for late feedback
    latency_window: int = 10_000         # latency samples per model for percentiles
    log_inputs: bool = True              # keep features in the log (needed for replay)
    torch_threads: int = 1
    background_nice: int = 10            # OS niceness added to shadow-only and comparator
                                         # processes, so they yield the CPU to the primary
    shadow_sched_idle: bool = True       # shadow-only replicas run under Linux SCHED_IDLE:
                                         # a CPU only when nothing else wants it
    app_name: str = "shadow"
    route_prefix: str = "/"
    dashboard_refresh_s: float = 2.0
    gallery: str | None = None           # gallery URI (`graceful-ray gallery build`): enables
                                         # POST /v1/search; None: the route answers 404
    search_k: int = 10                   # results per query when a search does not give k
    max_search_k: int = 100              # the largest k a caller may ask for
    gallery_poll_s: float = 2.0          # how often searchers look for a new snapshot

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("registry", "baseline", "candidate", "storage"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {v!r}")
        for name in ("baseline", "candidate"):
            if "@" not in getattr(self, name):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be a registry reference "
                                  "like 'name@production' or 'name@v3'")
        if isinstance(self.shadow_fraction, bool) \
                or not isinstance(self.shadow_fraction, (int, float)) \
                or not 0 <= self.shadow_fraction <= 1:
            raise ConfigError(f"shadow_fraction must be in [0, 1], got {self.shadow_fraction!r}")
        if not isinstance(self.shadow_timeout_s, (int, float)) or not self.shadow_timeout_s > 0:
            raise ConfigError(f"shadow_timeout_s must be > 0, got {self.shadow_timeout_s!r}")
        if not isinstance(self.shadow_coalesce_s, (int, float)) \
                or not 0 <= self.shadow_coalesce_s <= 1:
            raise ConfigError(f"shadow_coalesce_s must be in [0, 1] seconds, got "
                              f"{self.shadow_coalesce_s!r}")
        if isinstance(self.shadow_breaker_failures, bool) \
                or not isinstance(self.shadow_breaker_failures, int) \
                or self.shadow_breaker_failures < 0:
            raise ConfigError(f"shadow_breaker_failures must be an integer >= 0 (0: no breaker), "
                              f"got {self.shadow_breaker_failures!r}")
        if not isinstance(self.shadow_breaker_cooldown_s, (int, float)) \
                or isinstance(self.shadow_breaker_cooldown_s, bool) \
                or not 0 < self.shadow_breaker_cooldown_s <= 30:
            raise ConfigError(f"shadow_breaker_cooldown_s must be in (0, 30] seconds, got "
                              f"{self.shadow_breaker_cooldown_s!r}")
        if self.shadow_coalesce_s >= self.shadow_timeout_s:
            raise ConfigError(f"shadow_coalesce_s ({self.shadow_coalesce_s}) must be shorter than "
                              f"shadow_timeout_s ({self.shadow_timeout_s}): a copy waits for its "
                              "window before its call is sent, inside the same timeout")
        for name in ("max_shadow_inflight", "shadow_coalesce_rows", "max_inputs_per_request",
                     "max_request_bytes",
                     "flush_records", "max_tracked_records", "latency_window", "torch_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("flush_interval_s", "dashboard_refresh_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {v!r}")
        if isinstance(self.background_nice, bool) or not isinstance(self.background_nice, int) \
                or not 0 <= self.background_nice <= 19:
            raise ConfigError(f"background_nice must be an integer in [0, 19], got "
                              f"{self.background_nice!r}")
        if not isinstance(self.shadow_sched_idle, bool):
            raise ConfigError(f"shadow_sched_idle must be true or false, got "
                              f"{self.shadow_sched_idle!r}")
        if self.gallery is not None and (not isinstance(self.gallery, str)
                                         or not self.gallery.strip()):
            raise ConfigError(f"gallery must be a gallery path or URI (built with `graceful-ray "
                              f"gallery build`), or None; got {self.gallery!r}")
        for name in ("search_k", "max_search_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SEARCH_K:
                raise ConfigError(f"{name} must be an integer in [1, {MAX_SEARCH_K}], got {v!r}")
        if self.search_k > self.max_search_k:
            raise ConfigError(f"search_k ({self.search_k}) must not exceed max_search_k "
                              f"({self.max_search_k})")
        if isinstance(self.gallery_poll_s, bool) \
                or not isinstance(self.gallery_poll_s, (int, float)) or not self.gallery_poll_s > 0:
            raise ConfigError(f"gallery_poll_s must be > 0 seconds, got {self.gallery_poll_s!r}")
        if not isinstance(self.feedback_grace_s, (int, float)) or self.feedback_grace_s < 0:
            raise ConfigError(f"feedback_grace_s must be >= 0, got {self.feedback_grace_s!r}")
        self.gates.validate()
        for name in ("router", "baseline_resources", "candidate_resources", "comparator"):
            getattr(self, name).validate(name)
        if self.comparator.num_replicas != 1 or self.comparator.autoscaling_config is not None:
            raise ConfigError("comparator.num_replicas must be 1, without autoscaling_config: "
                              "a comparator holds its records and the routing state; scale "
                              "the router, and past one comparator's ceiling set "
                              "comparator_shards")
        if isinstance(self.comparator_shards, bool) or not isinstance(self.comparator_shards, int) \
                or not 1 <= self.comparator_shards <= 64:
            raise ConfigError(f"comparator_shards must be an integer in [1, 64], got "
                              f"{self.comparator_shards!r}")
        self.primary_batching.validate("primary_batching")
        self.shadow_batching.validate("shadow_batching")
        if self.admin_token_sha256 is not None and (
                not isinstance(self.admin_token_sha256, str)
                or len(self.admin_token_sha256) != 64):
            raise ConfigError("admin_token_sha256 must be the 64-character hex sha256 of the "
                              "token (see graceful_ray.serve.shadow_config.hash_token)")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if not isinstance(self.app_name, str) or not self.app_name \
                or not all(c.isalnum() or c in "-_" for c in self.app_name):
            raise ConfigError(f"app_name must be letters, digits, '-' or '_', got "
                              f"{self.app_name!r}")

    # ------------------------------------------------------------- helpers
    def with_admin_token(self, token: str) -> "ShadowConfig":
        """A copy whose admin token is ``token`` (only its hash is kept)."""
        return dataclasses.replace(self, admin_token_sha256=hash_token(token))

    def replace(self, **changes: Any) -> "ShadowConfig":
        return dataclasses.replace(self, **changes)

    def ref_of(self, role: str) -> str:
        return self.baseline if role == BASELINE else self.candidate

    def resources_of(self, role: str) -> Resources:
        return self.baseline_resources if role == BASELINE else self.candidate_resources

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (without the token hash) for logs and the report."""
        d = dataclasses.asdict(self)
        d.pop("admin_token_sha256", None)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShadowConfig":
        """Build from plain data (a Serve YAML's ``args``, JSON), nested dicts included."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"the shadow config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        _refuse_token(d)
        nested = {"gates": GateConfig, "router": Resources, "baseline_resources": Resources,
                  "candidate_resources": Resources, "comparator": Resources,
                  "primary_batching": Batching, "shadow_batching": Batching}
        for key, typ in nested.items():
            if key in d and isinstance(d[key], Mapping):
                d[key] = _from_mapping(typ, d[key], key)
        return _from_mapping(cls, d, "shadow config")


def _refuse_token(d: Mapping[str, Any]) -> None:
    if "admin_token" in d:
        raise ConfigError("do not put the admin token in the config: set it in the "
                          f"environment variable named by admin_token_env "
                          f"(default {DEFAULT_TOKEN_ENV}) or give admin_token_sha256")


class _ShadowArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_token(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            _refuse_token(data)
        return data

    def to_config(self) -> ShadowConfig:
        """The :class:`ShadowConfig` these arguments describe (validated)."""
        return ShadowConfig(**{name: getattr(self, name) for name in type(self).model_fields})


def _args_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(ShadowConfig)
    out = {}
    for f in dataclasses.fields(ShadowConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        out[f.name] = (hints[f.name], default)
    return out


#: The typed (pydantic) arguments of the Serve application builder, as in Serve's
#: ``doc_code`` (``def app_builder(args: ShadowAppArgs)``): Serve validates a config
#: file's ``args`` against it before building. Generated from :class:`ShadowConfig`,
#: so the two can never disagree on a field; the dataclass still runs its checks.
ShadowAppArgs = create_model("ShadowAppArgs", __base__=_ShadowArgsBase, **_args_fields())


def _from_mapping(cls: type, d: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**dict(d))
    except TypeError as e:
        raise ConfigError(f"invalid {what}: {e}") from None
