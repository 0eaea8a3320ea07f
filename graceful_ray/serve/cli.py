"""`graceful-ray serve` (run the shadow service) and `graceful-ray shadow replay`.

``serve`` starts (or joins) Ray, starts Serve's HTTP proxy on ``--host/--port``,
deploys the application and blocks until interrupted; on Ctrl-C it deletes the
application gracefully, which writes the last records to Parquet. ``--detach``
leaves it running on a long-lived cluster instead (what ``jobs/deploy_shadow.py``
does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from typing import Any

import yaml

from graceful_ray.errors import ConfigError
from graceful_ray.keyvalue import parse_gates
from graceful_ray.paths import registry_root, under_root
from graceful_ray import raycluster  # looked up when called: see train/cli.py
from graceful_ray.serve.app import deploy
from graceful_ray.serve.ingress import choose_ingress, cluster_ingress
from graceful_ray.serve.replay import replay
from graceful_ray.serve.report_text import format_shadow_report
from graceful_ray.serve.shadow_config import ShadowConfig

# Lazy imports: Ray and Ray Serve load only after the shadow config is read and checked.

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "$GRACEFUL_RAY_ROOT/shadow"


def _load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different families
        raise ConfigError(f"{path} is not valid {'YAML' if path.endswith('ml') else 'JSON'}: "
                          f"{e}") from None
    if isinstance(data, dict) and "applications" in data:  # a Serve config: take its args
        apps = data["applications"]
        if len(apps) != 1:
            raise ConfigError(f"{path} holds {len(apps)} applications; give a file with one")
        data = apps[0].get("args", {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of ShadowConfig fields")
    return data


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by ``graceful-ray serve`` and ``jobs/deploy_shadow.py``."""
    p.add_argument("--old", help="baseline (current production) reference, e.g. digits@production")
    p.add_argument("--new", help="candidate reference, e.g. digits@candidate")
    p.add_argument("--registry", default=None,
                   help="registry root (default $GRACEFUL_RAY_ROOT/registry)")
    p.add_argument("--storage", default=None,
                   help=f"where the comparison log goes (local path or s3://...; default "
                        f"{DEFAULT_STORAGE}/<old>__<new>)")
    p.add_argument("--shadow-fraction", type=float, default=None,
                   help="share of requests also sent to the shadow (default 1.0)")
    p.add_argument("--shadow-timeout", type=float, default=None,
                   help="seconds before a shadow call counts as timed out (default 2)")
    p.add_argument("--gallery", default=None, metavar="PATH",
                   help="gallery (built by `graceful-ray gallery build`; local path or s3://...) "
                        "to serve POST /v1/search from; the primary must live in its embedding "
                        "space. Without it /v1/search answers 404")
    p.add_argument("--search-k", type=int, default=None,
                   help="results per search when a request gives no k (default 10)")
    p.add_argument("--config", help="YAML/JSON of ShadowConfig fields (or a Serve config file); "
                                    "command-line options override it")
    p.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help="gate threshold, repeatable: min_labelled, max_nfr, min_agreement, "
                        "max_latency_ratio, max_error_rate, min_latency_samples, "
                        "max_disagreement, min_compared, max_slice_nfr, min_slice_labelled, "
                        "auto_rollback (true/false), confidence")
    p.add_argument("--router-replicas", type=int, default=None,
                   help="router (ingress) replicas; every replica records into the same "
                        "comparator, so none loses or double-counts a record")
    p.add_argument("--comparator-shards", type=int, default=None,
                   help="split the records over this many comparator deployments by request "
                        "id, past one comparator's ceiling (benchmarks/results/"
                        "comparator_ceiling.md); default 1")
    p.add_argument("--router-cpus", type=float, default=None)
    p.add_argument("--router-gpus", type=float, default=None)
    p.add_argument("--model-cpus", type=float, default=None, help="CPUs per model replica")
    p.add_argument("--model-gpus", type=float, default=None, help="GPUs per model replica")
    p.add_argument("--primary-in-deployment", action="store_true",
                   help="serve the primary from its own deployment instead of inside the router "
                        "(slower on small models; use when the router must stay CPU-only)")
    p.add_argument("--admin-token-env", default=None,
                   help="environment variable holding the admin bearer token "
                        "(default GRACEFUL_RAY_ADMIN_TOKEN)")
    p.add_argument("--admin-token-sha256", default=None, metavar="HEX",
                   help="the admin token's sha256 instead of the token itself: safe on a command "
                        "line, so `ray job list` never shows the token (a Ray job's entrypoint and "
                        "runtime_env env_vars are listed in plain text)")
    p.add_argument("--name", default=None, help="Serve application name (default 'shadow')")
    p.add_argument("--route-prefix", default=None, help="HTTP route prefix (default '/')")


def config_from_args(args: argparse.Namespace):
    """A validated :class:`ShadowConfig` from a config file plus command-line options."""

    data: dict[str, Any] = _load_config_file(args.config) if args.config else {}

    def set_if(key: str, value: Any) -> None:
        if value is not None:
            data[key] = value

    set_if("baseline", args.old)
    set_if("candidate", args.new)
    set_if("registry", args.registry)
    data.setdefault("registry", registry_root())
    set_if("storage", args.storage)
    set_if("shadow_fraction", args.shadow_fraction)
    set_if("shadow_timeout_s", args.shadow_timeout)
    set_if("admin_token_env", args.admin_token_env)
    if args.admin_token_sha256 is not None:
        digest = args.admin_token_sha256.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError("--admin-token-sha256 takes the 64 hex digits of the token's sha256 "
                              "(printf %s \"$GRACEFUL_RAY_ADMIN_TOKEN\" | sha256sum), not the token")
        data["admin_token_sha256"] = digest
    set_if("app_name", args.name)
    set_if("route_prefix", args.route_prefix)
    set_if("gallery", getattr(args, "gallery", None))
    search_k = getattr(args, "search_k", None)
    if search_k is not None:
        data["search_k"] = search_k
        if search_k > int(data.get("max_search_k", 100)):
            data["max_search_k"] = search_k  # asking for a larger default raises the cap
    if args.primary_in_deployment:
        data["primary_in_ingress"] = False
    for key in ("baseline", "candidate"):
        if not data.get(key):
            raise ConfigError(f"give --{'old' if key == 'baseline' else 'new'} (the {key} "
                              "reference) or set it in --config")
    if "storage" not in data:
        safe = lambda r: r.replace("@", "-").replace("/", "-")  # noqa: E731
        data["storage"] = under_root("shadow",
                                       f"{safe(data['baseline'])}__{safe(data['candidate'])}")
    gates = {**(data.get("gates") or {}), **parse_gates(args.gate)}
    if gates:
        data["gates"] = gates
    if args.comparator_shards is not None:
        data["comparator_shards"] = args.comparator_shards
    for key, flag, field in (("router", "router_replicas", "num_replicas"),
                             ("router", "router_cpus", "num_cpus"),
                             ("router", "router_gpus", "num_gpus"),
                             ("baseline_resources", "model_cpus", "num_cpus"),
                             ("candidate_resources", "model_cpus", "num_cpus"),
                             ("baseline_resources", "model_gpus", "num_gpus"),
                             ("candidate_resources", "model_gpus", "num_gpus")):
        value = getattr(args, flag)
        if value is not None:
            data[key] = {**(data.get(key) or {}), field: value}
    config = ShadowConfig.from_dict(data)
    token = os.environ.get(config.admin_token_env)
    if token and config.admin_token_sha256 is None:
        # Replicas may run on other nodes, without this shell's environment: only
        # the token's hash travels with the application's config.
        config = config.with_admin_token(token)
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    config = config_from_args(args)
    stop = threading.Event()
    if not args.detach:  # Ctrl-C while deploying also ends in a clean shutdown
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not joined and not ray.is_initialized():
        # HAProxy and Serve's throughput levers are read by Serve's processes when
        # they start: only a Ray started here gets them (a cluster: its nodes' env).
        log.info("%s", choose_ingress(args.python_proxy))
    else:
        log.info("%s", cluster_ingress(args.python_proxy))
    started = raycluster.ensure_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    deploy(config)
    base = f"http://{args.host}:{args.port}{config.route_prefix.rstrip('/')}"
    log.info("shadow service up: %s/v1/predict, report %s/v1/shadow/report, dashboard "
             "%s/dashboard (primary %s, shadow %s, fraction %.2f, log %s)", base, base, base,
             config.baseline, config.candidate, config.shadow_fraction, config.storage)
    if config.gallery:
        log.info("search: %s/v1/search over gallery %s (k %d, at most %d)", base,
                 config.gallery, config.search_k, config.max_search_k)
    if args.detach:
        return 0
    stop.wait()
    log.info("shutting down: writing the last records to %s", config.storage)
    serve.delete(config.app_name)
    raycluster.end_serve(started_local_ray=started, joined=joined)  # a joined cluster keeps Serve running
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    gates = parse_gates(args.gate)  # on top of the gates the service used
    report = replay(args.log, registry_root(args.registry), candidate=args.candidate,
                    baseline=args.baseline, gates=gates)
    if args.out:  # the whole report as JSON for tools; the terminal gets the table
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        log.info("report written to %s", args.out)
    print(format_shadow_report(report))
    return 0


def add_ingress_argument(parser: argparse.ArgumentParser) -> None:
    """``--python-proxy``: the one switch off the default HAProxy ingress."""
    parser.add_argument("--python-proxy", "--no-fast", dest="python_proxy", action="store_true",
                        help="run Serve's Python proxy without the throughput-optimized mode "
                             "(default on a Ray started here: HAProxy ingress, "
                             "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1; "
                             "the Python proxy anyway where no HAProxy binary is found)")


def add_parser(subparsers) -> None:
    """Add ``serve`` and ``shadow`` to the top-level CLI."""
    p = subparsers.add_parser(
        "serve", help="serve the production model with a candidate in shadow mode",
        description="Serve NAME@production on HTTP, shadow NAME@candidate on live traffic, "
                    "compare decisions, count flips from feedback, cut over behind gates. "
                    "The admin token is read from $GRACEFUL_RAY_ADMIN_TOKEN.")
    add_serve_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: RAY_ADDRESS, else start a local Ray)")
    add_ingress_argument(p)
    p.add_argument("--detach", action="store_true",
                   help="deploy and return, leaving the app on the (long-lived) cluster")
    p.set_defaults(func=_cmd_serve)

    s = subparsers.add_parser("shadow", help="offline tools for shadow-mode logs",
                              description="Offline tools for the shadow service's logs.")
    sub = s.add_subparsers(dest="shadow_command", metavar="ACTION", required=True)
    r = sub.add_parser("replay", help="replay recorded traffic through a candidate (Ray Data)",
                       description="Run the inputs recorded by a shadow service through a "
                                   "candidate offline and print the same report as "
                                   "GET /v1/shadow/report.")
    r.add_argument("--log", required=True, help="the service's storage path")
    r.add_argument("--registry", default=None, help="registry root (default $GRACEFUL_RAY_ROOT/registry)")
    r.add_argument("--candidate", help="candidate reference (default: the log's candidate)")
    r.add_argument("--baseline", help="baseline reference (default: the log's baseline)")
    r.add_argument("--gate", action="append", default=[], metavar="NAME=VALUE",
                   help="gate thresholds (default: those the service used)")
    r.add_argument("--out", help="write the JSON report here instead of stdout")
    r.set_defaults(func=_cmd_replay)
