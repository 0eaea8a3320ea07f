"""Build (and deploy) the shadow application from a :class:`ShadowConfig`.

The application graph::

    HTTP -> ShadowRouter (FastAPI ingress; primary in-process by default)
              |-- ModelReplica  <baseline version>   (shadow target when candidate is primary)
              |-- ModelReplica  <candidate version>  (shadow target when baseline is primary)
              `-- Comparator    (records, flips, gates, routing state; one replica,
                                 or comparator_shards of them split by request id)

With ``gallery`` set, the same graph serves ``POST /v1/search``: the primary
embeds and searches the faiss gallery in the router, the shadow does the same
in its own deployment, and the comparator records the top-k overlap (see
:mod:`graceful_ray.serve.gallery_search` for which models may search).

References are resolved against the registry *here*, once, and pinned to exact
versions, so every replica (including ones Serve restarts later) loads the same
weights even after the ``production`` alias moves on cutover.

:func:`app_builder` is the entry point a Serve config YAML names
(``import_path: graceful_ray.serve.app:app_builder``), typed as Serve's
``doc_code`` shows: Serve validates the file's ``args`` against
:data:`~graceful_ray.serve.shadow_config.ShadowAppArgs` (the fields of
:class:`ShadowConfig`) before it builds anything.

Batching is each deployment's Serve ``user_config`` (``max_batch_size``,
``batch_wait_timeout_s``): the router's is the primary's batch, a model
deployment's its shadow batch. Changing it in a Serve config
(``deployments: [{name: router, user_config: {...}}]``) reaches the running
replicas through ``reconfigure``, without restarting them.
"""

# No `from __future__ import annotations`: Serve reads app_builder's annotation
# as a class to validate a config file's args with it.
import dataclasses
import logging
import re
import time
from typing import Mapping

from graceful_ray.errors import ConfigError, IncompatibleModelError
from graceful_ray.serve.gallery_search import check_gallery
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, ROLES, ShadowAppArgs, ShadowConfig

# Lazy imports: Ray Serve, the replicas and the registry (torch) load only when the app is built,
# not for the CLI's config checks.

log = logging.getLogger(__name__)


def pin_refs(config: ShadowConfig) -> tuple[dict[str, str], list[int], dict[str, list[int]]]:
    """``(refs pinned to versions, input shape, classes per role)``; checks the pair fits.

    Both models must take the same input (callers send one input to both) and
    their decisions must live in one class-id space for agreement to mean
    anything; a pair that does not fit is refused before anything is deployed.
    """
    from graceful_ray.registry import Registry

    registry = Registry(config.registry)
    manifests = {role: registry.get(config.ref_of(role)) for role in ROLES}
    b, c = manifests[BASELINE], manifests[CANDIDATE]
    if b.ref == c.ref:
        raise ConfigError(f"baseline and candidate are the same version ({b.ref}): shadowing a "
                          "model against itself compares nothing; point --new at the candidate")
    shape_b, shape_c = tuple(b.spec.input_shape), tuple(c.spec.input_shape)
    if _numel(shape_b) != _numel(shape_c):
        raise IncompatibleModelError(
            f"{b.ref} takes inputs of shape {shape_b} but {c.ref} takes {shape_c}: a shadow "
            "must accept the same requests as the primary")
    if not set(b.classes) & set(c.classes):
        raise IncompatibleModelError(
            f"{b.ref} (classes {b.classes}) and {c.ref} (classes {c.classes}) share no class: "
            "their decisions cannot be compared")
    refs = {role: manifests[role].ref for role in ROLES}
    return refs, list(shape_b), {role: list(manifests[role].classes) for role in ROLES}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _deployment_name(ref: str) -> str:
    """``model@v3`` -> ``model-v3``: one deployment per model version."""
    return "model-" + re.sub(r"[^A-Za-z0-9_-]", "-", ref.replace("@", "-"))


def build_app(config: ShadowConfig):
    """The Serve :class:`~ray.serve.Application` for ``config`` (not yet running)."""
    from graceful_ray.serve.comparator import Comparator
    from graceful_ray.serve.replica import ModelReplica
    from graceful_ray.serve.router import ShadowRouter

    refs, shape, classes = pin_refs(config)
    if config.gallery is not None:
        check_gallery(config, refs)  # raises when the primary may not search the gallery
    models = {}
    for role in ROLES:
        res = config.resources_of(role)
        models[role] = ModelReplica.options(
            name=_deployment_name(refs[role]),
            **res.replica_options(),
            max_ongoing_requests=res.max_ongoing_requests,
            ray_actor_options=res.actor_options(),
            user_config=dataclasses.asdict(config.shadow_batching),
        ).bind(config.registry, refs[role], config.shadow_batching, res.num_gpus,
               config.torch_threads,
               # shadow-only when the primary runs in the router: background priority
               config.background_nice if config.primary_in_ingress else 0,
               config.gallery, config.gallery_poll_s,
               sched_idle=config.shadow_sched_idle and config.primary_in_ingress)
    all_classes = sorted(set(classes[BASELINE]) | set(classes[CANDIDATE]))
    def comparator_shard(name: str, shard: int, *peers):
        return Comparator.options(
            name=name, num_replicas=1,
            max_ongoing_requests=config.comparator.max_ongoing_requests,
            ray_actor_options=config.comparator.actor_options(),
        ).bind(config, refs, all_classes, shard, *peers)

    # Shard 0 keeps the name "comparator": it owns the routing state (serve.shards).
    peers = [comparator_shard(f"comparator-shard-{k}", k)
             for k in range(1, config.comparator_shards)]
    comparator = comparator_shard("comparator", 0, *peers)
    router = ShadowRouter.options(
        name="router", **config.router.replica_options(),
        max_ongoing_requests=config.router.max_ongoing_requests,
        ray_actor_options=config.router.actor_options(),
        user_config=dataclasses.asdict(config.primary_batching),
    ).bind(config, refs, shape, classes, models[BASELINE], models[CANDIDATE], comparator,
           *peers)
    log.info("shadow app %r: primary %s, shadow %s (fraction %.2f), log %s%s", config.app_name,
             refs[BASELINE], refs[CANDIDATE], config.shadow_fraction, config.storage,
             f", search gallery {config.gallery}" if config.gallery else "")
    return router


def app_builder(args: ShadowAppArgs):
    """Entry point for a Serve config file's ``import_path``; Serve passes the
    validated :data:`ShadowAppArgs` (a plain mapping is read with
    :meth:`ShadowConfig.from_dict`)."""
    if isinstance(args, Mapping):
        return build_app(ShadowConfig.from_dict(args))
    return build_app(args.to_config())


def deploy(*configs: ShadowConfig, timeout_s: float = 600.0) -> list:
    """Deploy one or more shadow applications (Serve must be started) and wait
    until every one is RUNNING; returns their ingress handles.

    Several configs are deployed in one ``serve.run_many`` call, so their
    replicas start in parallel. A deployment that fails, or that cannot be
    scheduled in time (e.g. not enough CPUs for the requested fractions), raises
    :class:`ConfigError` with Serve's own explanation instead of hanging.
    """
    from ray import serve

    if not configs:
        raise ConfigError("deploy() needs at least one ShadowConfig")
    targets = [serve.RunTarget(target=build_app(c), name=c.app_name,
                               route_prefix=c.route_prefix) for c in configs]
    handles = serve.run_many(targets, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    pending = {c.app_name for c in configs}
    while True:
        apps = serve.status().applications
        for name in list(pending):
            status = str(apps[name].status) if name in apps else ""
            if status.endswith("RUNNING"):
                pending.discard(name)
            elif status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
                raise ConfigError(f"application {name!r} failed to deploy: "
                                  f"{_why(apps[name])}")
        if not pending:
            return handles
        if time.monotonic() > deadline:
            reasons = "; ".join(f"{n}: {_why(apps[n]) if n in apps else 'not created'}"
                                for n in sorted(pending))
            raise ConfigError(f"application(s) {sorted(pending)} did not become RUNNING in "
                              f"{timeout_s:.0f}s ({reasons}); check the resources asked for "
                              "against the cluster's (`ray status`)")
        time.sleep(0.5)


def _why(app_status) -> str:
    """Serve's messages for an application and its unhealthy deployments."""
    parts = [app_status.message] if getattr(app_status, "message", "") else []
    for name, dep in getattr(app_status, "deployments", {}).items():
        if not str(dep.status).endswith("HEALTHY") and getattr(dep, "message", ""):
            parts.append(f"{name}: {dep.message}")
    return " | ".join(parts) or str(app_status.status)
