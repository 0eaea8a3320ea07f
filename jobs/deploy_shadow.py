"""Ray job: deploy the shadow-mode service onto the cluster and exit.

Serve applications outlive the job that deployed them, so this job returns as
soon as the application is RUNNING; the service keeps answering on the
cluster's Serve proxy (port 8000 by default)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/deploy_shadow.py --old digits@production --new digits@candidate \\
            --root s3://bucket/registry --storage s3://bucket/shadow/digits \\
            --shadow-fraction 0.5 --gallery s3://bucket/galleries/digits --router-replicas 2

``--router-replicas N`` runs N router (ingress) replicas (``--config`` takes a
``router.autoscaling_config`` instead); ``--comparator-shards N`` splits the
records over N comparators by request id. ``--gallery`` (optional) also serves ``POST /v1/search`` from a gallery built by
``graceful-ray gallery build``; the primary must live in the gallery's
embedding space, or the job fails before anything is deployed.

The admin token never travels with the job: give its sha256 with
``--admin-token-sha256 $(printf %s "$GRACEFUL_RAY_ADMIN_TOKEN" | sha256sum | cut -c1-64)``
(the router only ever compares hashes). ``ray job list`` shows every job's
entrypoint and ``runtime_env`` env_vars in plain text, so a token passed with
``--runtime-env-json`` is readable by anyone who can list jobs; the hash is not
usable as a token. ($GRACEFUL_RAY_ADMIN_TOKEN in the job's environment, or
--admin-token-env NAME, still works for a driver started by hand.)

Ingress: HAProxy and Serve's throughput-optimized mode are read by Serve's processes
when they start, so on a cluster they come from every node's environment
(``RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, set by
``cluster/kuberay/*.yaml`` and ``cluster/*-gpu.yaml``); the job says in one line
which one the cluster runs. With ``--address local`` the job starts its own Ray
with both, unless ``--python-proxy``.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("deploy_shadow")


def main(argv: list[str] | None = None) -> int:
    from graceful_ray.cli import add_root_argument, apply_root
    from graceful_ray.errors import GracefulRayError
    from graceful_ray.raycluster import runtime_env
    from graceful_ray.serve.cli import add_ingress_argument, add_serve_arguments, config_from_args
    from graceful_ray.serve.ingress import choose_ingress, cluster_ingress

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    add_root_argument(parser)
    parser.add_argument("--host", default="0.0.0.0", help="Serve HTTP host (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="Serve HTTP port (default 8000)")
    parser.add_argument("--address", default="auto", help="Ray address (default: this job's)")
    add_ingress_argument(parser)
    args = parser.parse_args(argv)
    apply_root(args.shared_root)  # registry and comparison log default to ROOT/registry, ROOT/shadow
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        import ray
        from ray import serve

        from graceful_ray.serve.app import deploy

        config = config_from_args(args)
        if args.address == "local" and not ray.is_initialized():
            log.info("%s", choose_ingress(args.python_proxy))  # a Ray started here
        else:
            log.info("%s", cluster_ingress(args.python_proxy))
        ray.init(address=args.address, runtime_env=runtime_env())
        serve.start(http_options={"host": args.host, "port": args.port})
        deploy(config)
    except GracefulRayError as e:
        log.error("%s", e)
        return 2
    log.info("shadow service %r deployed: primary %s, shadow %s, fraction %.2f, log %s%s",
             config.app_name, config.baseline, config.candidate, config.shadow_fraction,
             config.storage, f", search gallery {config.gallery}" if config.gallery else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
