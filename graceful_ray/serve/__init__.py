"""Shadow mode on Ray Serve: compare a candidate with production on live traffic.

The application (``build_app``) answers every request with the primary model,
sends a configurable share of them to the other model off the critical path,
records both decisions, turns late labels into negative/positive flips, and
cuts over (or rolls back) behind Wilson-interval gates without restarting a
replica. See :mod:`graceful_ray.serve.router` for the request path and
:mod:`graceful_ray.serve.comparator` for the state behind it.
"""

from graceful_ray.serve.shadow_config import (BASELINE, CANDIDATE, Batching, GateConfig, Resources,
                                       ShadowConfig, hash_token)

__all__ = ["BASELINE", "CANDIDATE", "Batching", "GateConfig", "Resources", "ShadowConfig",
           "hash_token", "build_app", "app_builder", "deploy", "replay"]


def __getattr__(name: str):
    # Ray Serve and Ray Data are imported only when the app or replay is used,
    # so `import graceful_ray.serve` stays cheap for the CLI and for configs.
    if name in ("build_app", "app_builder", "deploy"):
        from graceful_ray.serve import app

        return getattr(app, name)
    if name == "replay":
        from graceful_ray.serve.replay import replay

        return replay
    raise AttributeError(f"module 'graceful_ray.serve' has no attribute {name!r}")
