"""Reading Parquet with Ray Data, with the reader chosen by the size of the read.

Ray 2.60 reads Parquet through its DataSource V2 by default. V2 lists files and
reads their footers with a pool of actors, which pays off over thousands of
files; for the few files of a split or a cached-output table it is start-up cost.
Measured on a 2-core machine: one 14,000-row MNIST-1D split (one file), read and
iterated to the end while a benchmark kept both cores busy, took 20-37 s through
V2 and 0.2-1 s through V1; on the quiet machine a whole 10-epoch training run,
which reads two splits, took 1.31x as long with V2 (41.9 s against 32.0 s,
benchmarks/results/train_overhead.md).

So reads of up to ``SMALL_READ_FILES`` files go through V1, larger ones (and
reads that need V2-only arguments) through Ray's default. V1 plans one read task
per file (and splits each task's output into the blocks its autodetected
parallelism asks for), V2 plans by row groups: either way a read is as large as
the layout lets it be, which is why datasets are written in bounded files and
row groups (:mod:`graceful_ray.data.layout`); no ``override_num_blocks`` is set. ``paths`` are files,
not directories. Setting ``RAY_DATA_USE_DATASOURCE_V2`` in the environment is an
explicit choice and always wins: then the ``DataContext`` decides, as in plain
Ray. (A ``DataContext.use_datasource_v2 = True`` set in code without the
variable is Ray's default as far as this module can tell, and is overridden for
small reads.)
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

# Lazy imports: Ray Data loads only when a split is read as a Ray Dataset; the Arrow readers need no Ray.

#: Up to this many files, a read goes through Ray Data's V1 Parquet reader.
SMALL_READ_FILES = 64
#: CPUs each read task asks for unless the caller says otherwise. Ray Data's default
#: is 1, and a node whose CPUs Train workers and Tune trials hold down to a fraction
#: (two trials of 1.25 CPUs on cluster/local.sh's 2 nodes x 2 CPUs) never has a whole
#: CPU free: the reads pend forever while the workers wait for them. A read is mostly
#: I/O and Arrow decoding; the fraction is a scheduling share, not a core limit.
READ_TASK_CPUS = 0.25
#: Ray Data's own switch; when it is set, we leave the choice to Ray.
RAY_READER_ENV = "RAY_DATA_USE_DATASOURCE_V2"
#: Arguments only V2 implements (V1 raises on them).
V2_ONLY_ARGUMENTS = ("ignore_missing_paths", "skip_paths")
# The DataContext is one object per process: two threads flipping it at once
# could leave it flipped.
_context_lock = threading.Lock()


def uses_v1_reader(num_files: int) -> bool:
    """Whether :func:`read_parquet` picks the V1 reader for a read of ``num_files`` files."""
    return RAY_READER_ENV not in os.environ and num_files <= SMALL_READ_FILES


def read_parquet(paths: Sequence[str] | str, *, filesystem: Any = None, **kwargs: Any):
    """``ray.data.read_parquet`` with the reader chosen as the module docstring says,
    each read task asking for ``READ_TASK_CPUS`` unless ``num_cpus`` or
    ``ray_remote_args`` says otherwise."""
    import ray.data

    paths = [paths] if isinstance(paths, str) else list(paths)
    if "num_cpus" not in (kwargs.get("ray_remote_args") or {}):
        kwargs.setdefault("num_cpus", READ_TASK_CPUS)
    if not uses_v1_reader(len(paths)) or any(kwargs.get(k) for k in V2_ONLY_ARGUMENTS):
        return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
    # The reader is picked when the read is planned, here on the driver; the
    # dataset keeps that plan, so the context is restored at once.
    with _context_lock:
        ctx = ray.data.DataContext.get_current()
        saved = ctx.use_datasource_v2
        ctx.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
        finally:
            ctx.use_datasource_v2 = saved
