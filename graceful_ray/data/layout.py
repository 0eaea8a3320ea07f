"""How a split is laid out in Parquet: row groups and files bounded by bytes.

A reader works in units of the layout: pyarrow decodes a whole row group at a
time, Ray Data's V2 Parquet reader plans its read tasks by row groups and its V1
reader (which small reads use, see :mod:`graceful_ray.data.reader`) by files. A
split written as one file of one row group (pyarrow's default up to a million
rows) is one read task that holds the whole split before the next stage sees a
row. Bounding both by bytes keeps every read, and what the decode stage makes of
it, a bounded piece of the split however large the split is.

The bytes of a row are the larger of its Arrow size and its decoded size (the
float32 model input, ``4 * prod(feature_shape)``): a 32x32 PNG is ~3 KiB in
Parquet but 12 KiB once decoded, and it is the decoded rows that sit in Ray's
object store while the workers train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa

#: Upper bound on a row group's bytes (as counted above). Small enough that a
#: row group of decoded images is a few decode batches, large enough that a
#: feature dataset (MNIST-1D: ~180 B a row) keeps ~90k rows per group.
ROW_GROUP_BYTES = 16 << 20
#: Upper bound on a file's bytes: a V1 read task reads one file into one block.
FILE_BYTES = 64 << 20


def decoded_row_bytes(feature_shape: Sequence[int] | None) -> int:
    """Bytes of one row's float32 model input (0 when the shape is not known)."""
    return 4 * math.prod(feature_shape) if feature_shape else 0


def row_bytes(table: pa.Table, feature_shape: Sequence[int] | None = None) -> int:
    """Bytes a row of ``table`` takes: the larger of its Arrow and decoded sizes."""
    arrow = math.ceil(table.nbytes / table.num_rows) if table.num_rows else 0
    return max(1, arrow, decoded_row_bytes(feature_shape))


def rows_per_row_group(bytes_per_row: int, target: int = ROW_GROUP_BYTES) -> int:
    """Rows in a row group of at most ``target`` bytes (at least one row)."""
    return max(1, target // max(1, bytes_per_row))


def rows_per_file(bytes_per_row: int, max_rows: int, target: int = FILE_BYTES,
                  group_target: int = ROW_GROUP_BYTES) -> int:
    """Rows in a file of at most ``target`` bytes and ``max_rows`` rows: a whole
    number of row groups unless ``max_rows`` says fewer."""
    group = rows_per_row_group(bytes_per_row, group_target)
    by_bytes = group * max(1, target // (group * max(1, bytes_per_row)))
    return max(1, min(max_rows, by_bytes))
