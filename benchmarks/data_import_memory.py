"""Peak memory of ``graceful-ray data import`` at N and 10N rows: is it bounded?

Writes a source with N and with 10N rows (20 string classes, 64 float
features, string ids), imports each in a fresh Python process and records that
process's peak RSS (``ru_maxrss``), its RSS just before the import started
(interpreter, pyarrow, numpy: the floor), the source's feature bytes and the
wall time. An importer that held the features would grow with them (10x); one
that streams them grows only by the per-row keys it keeps for the split
decision (label index, id, split: tens of bytes a row).

Sources: Parquet (row groups of 64k rows) and CSV (``--feature-prefix f_``).

Usage:  nice -n 10 python benchmarks/data_import_memory.py --rows 100000 --csv-rows 20000
Results: benchmarks/results/data_import_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FEATURES = 64
CLASSES = 20
CHUNK = 65_536

CHILD = r"""
import json, resource, sys, time
from graceful_ray.data import import_source
def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
floor = rss_mib()
src, out, fmt = sys.argv[1:4]
t0 = time.perf_counter()
info = import_source(src, out, label_col="category", id_col="sku", feature_prefix="f_",
                     old_fraction=0.5, format=fmt)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"floor_mib": floor, "peak_mib": peak, "wall_s": wall,
                  "rows": sum(info.splits[s].rows for s in ("train", "val", "test"))}))
"""


def _chunk(start: int, n: int, rng: np.random.Generator) -> pa.Table:
    y = rng.integers(0, CLASSES, n)
    x = (rng.standard_normal((n, FEATURES)) + 0.3 * y[:, None]).astype(np.float32)
    cols = {"sku": pa.array([f"sku-{i:09d}" for i in range(start, start + n)]),
            "category": pa.array([f"class-{c:02d}" for c in y])}
    cols.update({f"f_{j}": pa.array(x[:, j]) for j in range(FEATURES)})
    return pa.table(cols)


def write_source(path: str, rows: int, fmt: str, seed: int = 0) -> None:
    """Written chunk by chunk, so the benchmark itself stays small too."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, CHUNK):
        t = _chunk(start, min(CHUNK, rows - start), rng)
        if writer is None:
            writer = (pq.ParquetWriter(path, t.schema) if fmt == "parquet"
                      else pacsv.CSVWriter(path, t.schema))
        writer.write_table(t)
    writer.close()


def measure(rows: int, fmt: str, work: str) -> dict:
    src = os.path.join(work, f"src-{rows}.{'parquet' if fmt == 'parquet' else 'csv'}")
    write_source(src, rows, fmt)
    out = os.path.join(work, f"ds-{fmt}-{rows}")
    proc = subprocess.run([sys.executable, "-c", CHILD, src, out, fmt], check=True,
                          capture_output=True, text=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(format=fmt, source_rows=rows, source_mib=os.path.getsize(src) / 2**20,
               feature_mib=rows * FEATURES * 4 / 2**20)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="N for Parquet (also runs 10N)")
    p.add_argument("--csv-rows", type=int, default=20_000, help="N for CSV (also runs 10N)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_import_memory"))
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for fmt, n in (("parquet", args.rows), ("csv", args.csv_rows)):
            for rows in (n, 10 * n):
                t0 = time.perf_counter()
                r = measure(rows, fmt, work)
                print(f"{fmt:8} {rows:>9} rows: peak {r['peak_mib']:.0f} MiB (floor "
                      f"{r['floor_mib']:.0f}), features {r['feature_mib']:.0f} MiB, import "
                      f"{r['wall_s']:.1f}s (with source {time.perf_counter() - t0:.0f}s)", flush=True)
                results.append(r)
                for f in os.listdir(work):  # keep the disk use to one size at a time
                    path = os.path.join(work, f)
                    if os.path.isdir(path):
                        import shutil
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
    with open(args.out + ".json", "w") as f:
        json.dump({"features": FEATURES, "classes": CLASSES, "results": results}, f, indent=1)
    lines = ["| source | rows | source MiB | features MiB | RSS floor MiB | peak RSS MiB | "
             "peak - floor MiB | import s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['format']} | {r['source_rows']:,} | {r['source_mib']:.0f} | "
                     f"{r['feature_mib']:.0f} | {r['floor_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] - r['floor_mib']:.0f} | {r['wall_s']:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
