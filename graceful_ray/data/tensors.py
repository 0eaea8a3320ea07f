"""Dataset rows as model inputs (and vectors back as Arrow), in one place.

Used by training (the pipeline, the old-output cache), evaluation, retrieval and
serving, so a feature vector or an image becomes the same array everywhere.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image


def inputs_from_arrow(table: pa.Table, feature_shape: Sequence[int]) -> np.ndarray:
    """``features`` (fixed-size list) or ``image`` (encoded bytes) -> float32 (N, *shape)."""
    n = table.num_rows
    if "features" in table.column_names:
        col = table.column("features").combine_chunks()
        # A copy: Arrow's buffers are read-only and torch wants writable memory.
        flat = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        return flat.reshape(n, *feature_shape)

    images = table.column("image").to_pylist()
    out = np.empty((n, *feature_shape), dtype=np.float32)
    for i, blob in enumerate(images):
        arr = np.asarray(Image.open(io.BytesIO(blob)), dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        out[i] = arr.reshape(feature_shape)
    return out


def fixed_size_list(array: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.FixedSizeListArray:
    """(N, D) numpy -> Arrow fixed-size list, the contract's type for vectors."""
    array = np.ascontiguousarray(array)
    n, d = array.shape[0], int(np.prod(array.shape[1:])) if array.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1), type=value_type), d)
