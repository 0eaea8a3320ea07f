"""Reading Parquet with Ray Data, with the reader chosen by the size of the read.

Ray 2.60 reads Parquet through its DataSource V2 by default. V2 lists files and
reads their footers with a pool of actors, which pays off over thousands of
files; for the few files of a split or a cached-output table it is pure start-up
cost. Measured on a 2-core machine, one 14,000-row MNIST-1D split (one file),
iterated to the end: 20-37 s through V2, 0.2-1 s through V1
(benchmarks/results/train_overhead.md). Every training run reads two splits, so
that was most of a short run's wall time.

So reads of up to ``SMALL_READ_FILES`` files go through V1, larger ones through
Ray's default. Setting ``RAY_DATA_USE_DATASOURCE_V2`` in the environment is an
explicit choice and always wins: then the ``DataContext`` decides, as in plain Ray.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

#: Up to this many files, a read goes through Ray Data's V1 Parquet reader.
SMALL_READ_FILES = 64
#: Ray Data's own switch; when it is set, we leave the choice to Ray.
RAY_READER_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def uses_v1_reader(num_files: int) -> bool:
    """Whether :func:`read_parquet` picks the V1 reader for a read of ``num_files`` files."""
    return RAY_READER_ENV not in os.environ and num_files <= SMALL_READ_FILES


def read_parquet(paths: Sequence[str] | str, *, filesystem: Any = None, **kwargs: Any):
    """``ray.data.read_parquet`` with the reader chosen as the module docstring says."""
    import ray.data

    paths = [paths] if isinstance(paths, str) else list(paths)
    if not uses_v1_reader(len(paths)):
        return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
    # The reader is picked when the read is planned, here on the driver; the
    # dataset keeps that plan, so the context is restored at once.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
    finally:
        ctx.use_datasource_v2 = saved
