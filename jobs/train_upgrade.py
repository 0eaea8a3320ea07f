"""Train one model upgrade as a Ray job.

Submit it to a cluster (storage on s3://, gs:// or a shared path so every node
and every later stage sees the same registry and runs)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train_upgrade.py --data s3://bucket/data/mnist1d \
        --registry s3://bucket/registry --storage s3://bucket/runs \
        --old digits@production --method bct+fd --workers 4 --gpu --run-name v2-bct-fd

Inside a job RAY_ADDRESS is set, so the script joins the job's cluster. Re-using
--run-name resumes that run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from graceful_ray.cli import run_job
from graceful_ray.train.cli import add_train_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.add_argument("--alias", help="registry alias to point at the new version (e.g. candidate)")
    return run_job(["train"], parser, argv)


if __name__ == "__main__":
    sys.exit(main())
