"""Backfill a gallery as a Ray job.

    ray job submit --working-dir . -- python jobs/backfill.py \
        --storage s3://bucket/graceful-ray --run-name mnist-v2-backfill \
        --gallery-name photos --model mnist@v2 --order uncertainty --chunks 20

Everything lives under ``--storage``: the registry (``<storage>/registry``)
and the gallery (``<storage>/galleries/<gallery-name>``, or ``--gallery URI``).
The run name is the resume key: submitting the same command again after a
crash or a stop continues with the first chunk not yet committed, and a
finished run returns at once. Thin on purpose: parse, call the package.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--storage", required=True, help="root of the registry and galleries (path or URI)")
    p.add_argument("--run-name", required=True, help="names the backfill; the same name resumes it")
    p.add_argument("--model", required=True, help="the new model, NAME@VERSION")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--gallery-name", help="gallery at <storage>/galleries/<name>")
    g.add_argument("--gallery", help="gallery URI")
    p.add_argument("--registry", help="default <storage>/registry")
    p.add_argument("--order", choices=["uncertainty", "entropy", "margin", "random"], default="uncertainty")
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--chunk-rows", type=int)
    p.add_argument("--mode", choices=["auto", "progressive", "staged"], default="auto")
    p.add_argument("--data", help="raw inputs (default: the dataset the gallery was built from)")
    p.add_argument("--split")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from graceful_ray.errors import GracefulRayError
    from graceful_ray.raycluster import runtime_env
    from graceful_ray.retrieval.backfill import BackfillConfig, run_backfill

    join = (lambda *a: posixpath.join(*a)) if "://" in args.storage else __import__("os").path.join
    gallery = args.gallery or join(args.storage, "galleries", args.gallery_name)
    registry = args.registry or join(args.storage, "registry")
    ray.init(configure_logging=False, runtime_env=runtime_env())
    try:
        res = run_backfill(BackfillConfig(
            gallery=gallery, model=args.model, registry=registry, run_name=args.run_name, order=args.order,
            chunks=args.chunks, chunk_rows=args.chunk_rows, mode=args.mode, data=args.data, split=args.split,
            batch_size=args.batch_size, num_cpus=args.num_cpus, concurrency=args.concurrency))
    except GracefulRayError as e:
        print(f"backfill failed: {e}", file=sys.stderr)
        return 2
    print(f"backfill {res.run_name}: {res.chunks_done}/{res.chunks} chunks, {res.rows_done}/{res.rows_total} "
          f"rows, {'complete' if res.done else 'stopped'}" + (" (resumed)" if res.resumed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
