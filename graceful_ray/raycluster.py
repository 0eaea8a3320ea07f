"""Connecting to Ray the same way from the CLI, the jobs and the demo."""

from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               include_dashboard: bool = False, quiet: bool = False) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    ``include_dashboard`` starts the Ray dashboard with a local Ray (on
    127.0.0.1; the demo does, so a new user can watch the trials and replicas).

    A local start uses ``address="local"`` on purpose: a bare ``ray.init()``
    follows a stale ``/tmp/ray/ray_current_cluster`` and tries to join a dead
    cluster. ``quiet`` keeps the workers' output (Train's worker-group lines,
    Ray Data's progress bars) in Ray's log files instead of this terminal, for
    a command that prints its own progress (the demo); the path is logged.
    Inside a Ray job (``ray job submit``) ``RAY_ADDRESS`` is set and we
    join the job's cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=not quiet, **_quiet_init(quiet))
    else:
        # Twice the cores as logical CPUs: Train workers with fractional CPUs
        # must leave room for Ray Data's read tasks or ingest starves.
        cpus = num_cpus or 2 * (os.cpu_count() or 1)
        logger.info("starting a local Ray with %d logical CPUs", cpus)
        with _dashboard_agent_port(agent_port()):
            ray.init(address="local", num_cpus=cpus, include_dashboard=include_dashboard,
                     log_to_driver=not quiet,
                     **({"dashboard_host": "127.0.0.1"} if include_dashboard else {}),
                     **_quiet_init(quiet))


#: The variable cluster/local.sh reads for the same port, so one setting moves both.
AGENT_PORT_ENV = "RAY_DASHBOARD_AGENT_PORT"


def agent_port() -> int | None:
    """The dashboard agent port a local Ray should use: ``$RAY_DASHBOARD_AGENT_PORT``,
    else ``None`` (Ray's fixed default, 52365, which a second Ray on the machine,
    e.g. one cluster/local.sh started, may already hold)."""
    from graceful_ray.errors import ConfigError

    text = os.environ.get(AGENT_PORT_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"${AGENT_PORT_ENV} must be a TCP port (1-65535), got {text!r}")
    return int(text)


@contextlib.contextmanager
def _dashboard_agent_port(port: int | None):
    """``ray.init`` has no option for the agent's port (``ray start`` has
    ``--dashboard-agent-listen-port``), but the ``RayParams`` it builds for a
    local start does; pass it there for the duration of the call."""
    if port is None:
        yield
        return
    from ray._private import parameter

    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def _quiet_init(quiet: bool) -> dict:
    """``ray.init`` options that keep Ray's own driver messages (start-up banner,
    token-auth notice) to errors; Ray sets its logger's level at init."""
    return {"logging_level": logging.ERROR} if quiet else {}
