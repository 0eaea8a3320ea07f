"""Compare an upgrade against the model it replaces, as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --data s3://bucket/data/mnist1d --registry s3://bucket/registry \
        --old digits@production --new digits@candidate --out s3://bucket/reports/v2

Prints the flip and compatibility report and writes report.json and flips.png.
"""

from __future__ import annotations

import sys

from graceful_ray.cli import main as cli_main

if __name__ == "__main__":
    sys.exit(cli_main(["evaluate", *sys.argv[1:]]))
