"""Compare an upgrade against the model it replaces, as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --root s3://bucket/graceful-ray --data s3://bucket/data/mnist1d \
        --old digits@production --new digits@candidate --run-name v2-report

Prints the flip and compatibility report and writes report.json and flips.png
to ROOT/reports/<run-name> (or --out). With ``--generations m@v1 m@v2 m@v3`` it
prints the compatibility matrix M(v_i, v_j) with AC and AM instead.
"""

from __future__ import annotations

import argparse
import sys

from graceful_ray.cli import run_job
from graceful_ray.evaluate import add_evaluate_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluate_arguments(parser)
    return run_job(["evaluate"], parser, argv)


if __name__ == "__main__":
    sys.exit(main())
