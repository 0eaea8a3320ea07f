"""The test session's local Ray: started once per session (conftest), and by a test
that needs one of its own (the README guide's, with the guide's PYTHONPATH)."""

from __future__ import annotations

import os
import shutil
import tempfile

from tests.helpers import free_port

# HAProxy's files: Ray's default is one fixed /tmp/haproxy-serve per machine, where
# two test sessions (or a session and a real service) would share a config and an
# admin socket. Each session gets its own.
HAPROXY_PATHS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
                 "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}


_HAPROXY_DIRS: list[str] = []  # removed when the session's Ray stops


def _serve_ingress() -> None:
    """Serve in the tests runs behind HAProxy, as ``graceful-ray serve`` does by
    default (GRACEFUL_RAY_TEST_PYTHON_PROXY=1: Serve's Python proxy instead)."""
    from graceful_ray.serve.ingress import choose_ingress

    if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ:
        # short: Serve adds a 56-character node id, and HAProxy's socket paths
        # must stay under 98 characters
        base = tempfile.mkdtemp(prefix="grh-", dir="/tmp")
        _HAPROXY_DIRS.append(base)
        for key, name in HAPROXY_PATHS.items():
            os.environ.setdefault(key, os.path.join(base, name) if name else base)
        # and its own stats/metrics ports (Serve's are fixed: 8404, 9101)
        for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ.setdefault(key, str(free_port()))
    choose_ingress(python_proxy=bool(os.environ.get("GRACEFUL_RAY_TEST_PYTHON_PROXY")))


# Behind HAProxy, Serve keeps a deleted app's ingress replica reachable for this long
# before it stops, so that an external load balancer (an ALB) can deregister it; 30 s
# by default, which every app deletion and Ctrl-C in the tests waited out. In the tests
# nothing but this session's own HAProxy fronts Serve, and no request is in flight then.
DRAIN_ENV, TEST_DRAIN_S = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2"


# Serve's controller kills its proxy (here HAProxy's manager actor) after 3 health checks
# in a row that take over 10 s, and a `serve.start` waiting on it then raises
# ActorDiedError. On a 2-core machine with another process on one core and a Ray
# Train test beside it, that check was seen to take longer (issue 16's busy-core
# runs: every Serve test of one module failed on it). The tests give it a minute;
# the package keeps Ray's defaults.
PROXY_CHECK_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                   "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def start_local_ray(attempts: int = 3):
    """Start the test Ray; retried because Ray waits a fixed 30 s for its raylet,
    which a heavily loaded 2-core machine can miss."""
    import ray

    _serve_ingress()  # read by Serve's processes when they start: before Ray
    os.environ.setdefault(DRAIN_ENV, TEST_DRAIN_S)  # likewise (every Ray worker inherits it)
    for key, value in PROXY_CHECK_ENV.items():
        os.environ.setdefault(key, value)
    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            break
        except Exception as e:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()
    ray.data.DataContext.get_current().enable_progress_bars = False


def remove_haproxy_dirs() -> None:
    """Remove the HAProxy folders this session made (once its Ray has stopped)."""
    while _HAPROXY_DIRS:
        shutil.rmtree(_HAPROXY_DIRS.pop(), ignore_errors=True)
