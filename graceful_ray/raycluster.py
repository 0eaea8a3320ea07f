"""Connecting to Ray the same way from the CLI, the jobs and the demo."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from graceful_ray.errors import ConfigError

# Lazy imports: Ray loads only when a cluster is started or joined, after the CLI has checked its arguments.

logger = logging.getLogger(__name__)


#: The logger of Ray's token-auth notice ("Token authentication is enabled for this
#: Ray cluster ..."), which every command that starts or joins a Ray printed.
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

#: Ray warns ("N PYTHON worker processes have been started ... which is 4x the
#: maximum expected startup concurrency") once a node's worker processes reach 4x
#: the number it starts at once, by default the node's cores: 8 on 2 cores, which
#: the demo's Train, Tune and Serve actors pass by design (fractional-CPU actors).
#: A local Ray starts at least this many at once, so the warning means 32.
MIN_STARTUP_CONCURRENCY = 8

#: Driver variables Ray's workers (Train workers, Tune trials, Serve replicas, Data
#: tasks) need the same value of: the modules that declare users' methods and
#: formats (graceful_ray.methods.catalog.MODULES_ENV), without which a remote
#: worker answers "unknown method".
FORWARDED_ENV = ("GRACEFUL_RAY_METHOD_MODULES",)

#: Where Ray hands a submitted job's config (its runtime_env) to the job's driver.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def runtime_env(base: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``base`` (a runtime_env of the caller's, not modified) with the set
    :data:`FORWARDED_ENV` variables added to its ``env_vars``, for ``ray.init``.

    A variable ``base`` or the submitted job's own runtime_env already sets is
    left to them (Ray refuses a driver runtime_env that repeats a job's variable).
    ``None`` when there is nothing to pass.
    """
    env = dict(base or {})
    env_vars = dict(env.get("env_vars") or {})
    taken = set(env_vars) | set(_job_env_vars())
    env_vars.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k) and k not in taken})
    if env_vars:
        env["env_vars"] = env_vars
    return env or None


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (``ray job submit --runtime-env-json``)."""
    try:
        config = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return {}
    return dict((config.get("runtime_env") or {}).get("env_vars") or {})


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None,
               include_dashboard: bool = False, quiet: bool = False) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; True
    when this call started a local Ray (which then ends with this process).

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
        return False
    token_notice = logging.getLogger(TOKEN_NOTICE_LOGGER)
    if token_notice.level == logging.NOTSET:  # unless a user configured it
        # Its warning says token auth is on (Ray's default since 2.5x) with a link; the
        # setting that would silence it, RAY_AUTH_MODE=token, must be set before
        # `import ray` (set later, it breaks token auth), so the notice is what goes.
        token_notice.setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=not quiet, runtime_env=runtime_env(), **_quiet_init(quiet))
        return False
    # Twice the cores as logical CPUs: Train workers with fractional CPUs
    # must leave room for Ray Data's read tasks or ingest starves.
    cpus = num_cpus or 2 * (os.cpu_count() or 1)
    # Ray's own default is the cores (at most the CPUs); only small machines get more.
    startup = max(MIN_STARTUP_CONCURRENCY, min(os.cpu_count() or 1, cpus))
    logger.info("starting a local Ray with %d logical CPUs", cpus)
    with _dashboard_agent_port(agent_port()):
        ray.init(address="local", num_cpus=cpus, include_dashboard=include_dashboard,
                 log_to_driver=not quiet, runtime_env=runtime_env(),
                 _system_config={"worker_maximum_startup_concurrency": startup},
                 **({"dashboard_host": "127.0.0.1"} if include_dashboard else {}),
                 **_quiet_init(quiet))
    return True


def end_serve(*, started_local_ray: bool, joined: bool) -> None:
    """Stop Serve after a command that deployed its application and deleted it.

    On a local Ray this command started, Ray itself is shut down: it would end
    with the process anyway, and ``serve.shutdown()`` made Ray print
    ``Task ServeController.graceful_shutdown failed ... will be retried`` (the
    controller's intended exit, reported as a failed task; no switch turns the
    line off). A cluster joined through an address keeps Serve and its other
    applications; a Ray someone else started in this process loses only Serve.
    """
    import ray
    from ray import serve

    if started_local_ray:
        ray.shutdown()
    elif not joined:
        serve.shutdown()


#: The variable cluster/local.sh reads for the same port, so one setting moves both.
AGENT_PORT_ENV = "RAY_DASHBOARD_AGENT_PORT"


def agent_port() -> int | None:
    """The dashboard agent port a local Ray should use: ``$RAY_DASHBOARD_AGENT_PORT``,
    else ``None`` (Ray's fixed default, 52365, which a second Ray on the machine,
    e.g. one cluster/local.sh started, may already hold)."""

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
