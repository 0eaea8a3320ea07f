"""Read and check datasets on any ``pyarrow.fs`` filesystem.

Reading verifies every file against the sha256 recorded in ``dataset.json``;
:func:`validate_dataset` checks a whole dataset (every table, ids across
splits, subsets, counts and checksums). Writing is :mod:`graceful_ray.data.write`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from graceful_ray.data.contract import (
    DATASET_JSON,
    FEATURES,
    ID,
    IMAGE,
    LABEL,
    DatasetInfo,
    Expectations,
    SplitInfo,
    dataset_checksum,
    sha256_hex,
)
from graceful_ray.data.images import decode_images
from graceful_ray.data.reader import read_parquet
from graceful_ray.data.tensors import inputs_from_arrow
from graceful_ray.data.validate import (
    IdIndex,
    check_subset,
    ids_to_numpy,
    validate_table,
)
from graceful_ray.errors import ConfigError, DatasetError, StorageError
from graceful_ray.storage import Location, resolve

PathLike = Union[str, "os.PathLike[str]"]


def as_location(root: PathLike | Location) -> Location:
    return root if isinstance(root, Location) else resolve(root)


def dataset_exists(root: PathLike) -> bool:
    """True when ``root`` holds a published dataset (its ``dataset.json``)."""
    return as_location(root).join(DATASET_JSON).exists()


def read_info(root: PathLike) -> DatasetInfo:
    """Read ``dataset.json``; a directory without one is not a dataset."""
    loc = as_location(root)
    meta = loc.join(DATASET_JSON)
    try:
        data = meta.read_bytes()
    except StorageError:
        if not meta.exists():
            raise DatasetError(
                f"no dataset at {loc.uri}: dataset.json is missing (a directory without it "
                f"is not a dataset; create one with `graceful-ray data make` or "
                f"import_dataset)", file=meta.uri) from None
        raise
    return DatasetInfo.from_json(data)


def check_info_checksums(info: DatasetInfo) -> None:
    """The recorded split and dataset checksums must follow from the file hashes."""
    for name, si in info.splits.items():
        missing = [f for f in si.files if f not in si.sha256]
        if missing:
            raise DatasetError(f"split {name!r} lists {missing[0]} without a sha256",
                               file=DATASET_JSON)
        if not si.checksum_matches():
            raise DatasetError(f"checksum of split {name!r} does not match its files' "
                               f"sha256: dataset.json was edited; re-create the dataset",
                               file=DATASET_JSON)
    if dataset_checksum(info.splits) != info.checksum:
        raise DatasetError("dataset checksum does not match the split checksums: "
                           "dataset.json was edited; re-create the dataset", file=DATASET_JSON)


def read_file(root: PathLike, rel: str, sha256: str | None = None) -> pa.Table:
    """Read one Parquet file of a dataset, verifying its sha256 when given."""
    loc = as_location(root).join(rel)
    try:
        data = loc.read_buffer()  # Arrow-owned memory: see Location.read_buffer
    except StorageError as e:
        raise DatasetError(f"cannot read a file dataset.json lists: {e}", file=rel) from None
    if sha256 is not None and sha256_hex(data) != sha256:
        raise DatasetError("sha256 mismatch: the file changed after dataset.json was "
                           "written; re-create or re-import the dataset", file=rel)
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"not a readable Parquet file: {e}", file=rel) from None


def read_split(root: PathLike, split: str, *, columns: Sequence[str] | None = None,
               verify: bool = True) -> pa.Table:
    """One split as a single table, every file checked against ``dataset.json``."""
    info = read_info(root)
    si = info.split(split)
    tables = [read_file(root, rel, si.sha256.get(rel) if verify else None) for rel in si.files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if columns is not None:
        table = table.select(list(columns))
    return table


def split_paths(root: PathLike, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, paths) of a split's files, for readers such as Ray Data."""
    loc = as_location(root)
    si = read_info(loc).split(split)
    return loc.fs, [loc.join(rel).path for rel in si.files]


def verify_split(root: PathLike, split: str) -> None:
    """Check every file of a split against its recorded sha256 (reads the bytes)."""
    loc = as_location(root)
    si = read_info(loc).split(split)
    for rel in si.files:
        try:
            data = loc.join(rel).read_bytes()
        except StorageError as e:
            raise DatasetError(f"cannot read a file dataset.json lists: {e}", file=rel) from None
        if sha256_hex(data) != si.sha256.get(rel):
            raise DatasetError("sha256 mismatch: the file changed after dataset.json was "
                               "written; re-create or re-import the dataset", file=rel)


def to_numpy(table: pa.Table, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, X, y)``: X float32 shaped ``(N, *feature_shape)``, y int64.

    Images are decoded to float32 CHW in [0, 1]; string ids come back as a
    numpy unicode array.
    """

    n = table.num_rows
    ids = ids_to_numpy(table.column(ID).combine_chunks())
    y = table.column(LABEL).to_numpy().astype(np.int64, copy=False)
    if info.kind == "features":
        arr = table.column(FEATURES).combine_chunks()
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        X = flat.astype(np.float32, copy=False).reshape((n, *info.feature_shape))
    else:
        X = decode_images(table.column(IMAGE).to_pylist(), info.feature_shape)
    return ids, X, y


def batch_to_numpy(batch: pa.Table | Mapping[str, Any],
                   info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`to_numpy` for a Ray Data batch (``"pyarrow"`` or ``"numpy"`` format).

    Ray's numpy batches hold a fixed-size list column as an object array of
    rows; this stacks it into ``(N, *feature_shape)`` float32.
    """
    if isinstance(batch, pa.Table):
        return to_numpy(batch, info)
    ids = np.asarray(batch[ID])
    y = np.asarray(batch[LABEL]).astype(np.int64, copy=False)
    if info.kind == "features":
        col = batch[FEATURES]
        X = np.stack(list(col)) if getattr(col, "dtype", None) == object else np.asarray(col)
        X = X.astype(np.float32, copy=False).reshape((len(y), *info.feature_shape))
    else:
        X = decode_images(list(batch[IMAGE]), info.feature_shape)
    return ids, X, y


def ray_dataset(root: PathLike, split: str, *, verify: bool = True, **read_kwargs: Any):
    """A ``ray.data.Dataset`` over one split (``ray.data.read_parquet``).

    ``verify`` first checks the files' sha256 on the driver (one extra read of
    the split); pass ``verify=False`` for very large datasets already checked
    with ``graceful-ray data check``.
    """

    if verify:
        verify_split(root, split)
    fs, paths = split_paths(root, split)
    return read_parquet(paths, filesystem=fs, **read_kwargs)


def validate_dataset(root: str) -> DatasetInfo:
    """Check a whole dataset: ``dataset.json``, every file's sha256, every table,
    id uniqueness across splits, subset splits, row counts and checksums.

    Returns the :class:`DatasetInfo` when everything holds.
    """
    info = read_info(root)
    check_info_checksums(info)
    exp = Expectations.from_info(info)
    main = IdIndex()
    split_ids: dict[str, np.ndarray] = {}
    # Parents before subsets, so subset membership can be checked.
    order = sorted(info.splits, key=lambda s: (info.splits[s].subset_of is not None, s))
    for split in order:
        si = info.splits[split]
        if si.subset_of is not None and (si.subset_of not in info.splits
                                         or info.splits[si.subset_of].subset_of is not None):
            raise DatasetError(f"split {split!r} is declared a subset of {si.subset_of!r}, "
                               f"which is not a primary split of this dataset",
                               file="dataset.json")
        local = IdIndex() if si.subset_of is not None else main
        rows = 0
        first_id = len(local._parts)
        for rel in si.files:
            table = read_file(root, rel, si.sha256.get(rel))
            validate_table(table, file=rel, info_or_expectations=exp, ids=local)
            rows += table.num_rows
        if rows != si.rows:
            raise DatasetError(f"split {split!r} has {rows} rows but dataset.json records "
                               f"{si.rows}", file="dataset.json")
        parts = local._parts[first_id:]
        split_ids[split] = (np.concatenate([p for _, p in parts]) if parts
                            else np.zeros(0, dtype=np.int64))
        if si.subset_of is not None:
            for rel, ids in parts:
                check_subset(rel, ids, si.subset_of, split_ids[si.subset_of])
    return info


def load_split(data: PathLike, split: str) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """One split as model inputs: ``(x, labels, info)``, x float32 ``(N, *feature_shape)``."""
    info = read_info(data)
    if split not in info.splits:
        raise ConfigError(f"dataset {data} has no split {split!r}; it has {sorted(info.splits)}")
    table = read_split(data, split)
    return inputs_from_arrow(table, info.feature_shape), table.column("label").to_numpy(), info
