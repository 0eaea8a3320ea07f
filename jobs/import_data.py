"""Import a team's own data as a graceful-ray dataset, as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/import_data.py s3://bucket/raw/products.csv --out s3://bucket/data/products \
        --label-col category --feature-prefix f_ --old-fraction 0.5

The same as ``graceful-ray data import``: reads in batches (bounded memory),
checks every row, and publishes the dataset only when the whole import succeeded.
"""

from __future__ import annotations

import argparse
import sys

from graceful_ray.cli import run_job
from graceful_ray.data.cli import add_import_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_import_arguments(parser)
    return run_job(["data", "import"], parser, argv)


if __name__ == "__main__":
    sys.exit(main())
