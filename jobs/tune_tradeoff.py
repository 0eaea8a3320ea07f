"""Search the accuracy / flip-rate trade-off as a Ray job (or edge architectures with --search edge).

Submit it to a cluster; storage must be shared (s3://, gs:// or a path every
node mounts) so trials, the registry and a later resume all see the same runs::

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune_tradeoff.py --data s3://bucket/data/mnist1d \
        --registry s3://bucket/registry --storage s3://bucket/tune \
        --study-url postgresql://optuna@db/optuna \
        --old mnist1d@production --method fd --trials 32 --workers-per-trial 2 --gpu \
        --flip-budget 0.02 --run-name fd-sweep

(With local or NFS storage the Optuna study is a SQLite file in the run
directory and --study-url can be left out.) Inside a job RAY_ADDRESS is set, so
the script joins the job's cluster. If the job dies, submit it again with
``--resume fd-sweep`` (and the same --storage): finished trials are kept.
Exit status 3: no trial met the selection rule, nothing was published.
"""

from __future__ import annotations

import argparse
import sys

from graceful_ray.cli import run_job
from graceful_ray.tune.cli import add_tune_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser)
    return run_job(["tune"], parser, argv)


if __name__ == "__main__":
    sys.exit(main())
