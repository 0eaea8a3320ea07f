"""Shadow mode on Ray Serve: compare a candidate with production on live traffic.

The application (:func:`graceful_ray.serve.app.build_app`) answers every request with the primary model,
sends a configurable share of them to the other model off the critical path,
records both decisions, turns late labels into negative/positive flips, and
cuts over (or rolls back) behind Wilson-interval gates without restarting a
replica. See :mod:`graceful_ray.serve.router` for the request path and
:mod:`graceful_ray.serve.comparator` for the state behind it.
"""

from graceful_ray.serve.shadow_config import (BASELINE, CANDIDATE, Batching, GateConfig, Resources,
                                              ShadowConfig, hash_token)

# The application itself (build_app, app_builder, deploy) is in graceful_ray.serve.app
# and the offline replay in graceful_ray.serve.replay: importing this package loads
# only the configuration, which the CLI reads before anything starts.
__all__ = ["BASELINE", "CANDIDATE", "Batching", "GateConfig", "Resources", "ShadowConfig", "hash_token"]
