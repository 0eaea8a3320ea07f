"""Connecting to Ray the same way from the CLI, the jobs and the demo."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    A local start uses ``address="local"`` on purpose: a bare ``ray.init()``
    follows a stale ``/tmp/ray/ray_current_cluster`` and tries to join a dead
    cluster. Inside a Ray job (``ray job submit``) ``RAY_ADDRESS`` is set and we
    join the job's cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # Twice the cores as logical CPUs: Train workers with fractional CPUs
        # must leave room for Ray Data's read tasks or ingest starves.
        cpus = num_cpus or 2 * (os.cpu_count() or 1)
        logger.info("starting a local Ray with %d logical CPUs", cpus)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
