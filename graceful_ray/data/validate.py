"""Check tables and datasets against the data contract, before anything is written.

Every violation raises one :class:`~graceful_ray.errors.DatasetError` naming
the file, the column and (where there is one) the first offending row, so a
user can open the file and look. Checks run in a fixed order (columns, types,
nulls, then values), so the same bad input always gives the same message.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graceful_ray.data.contract import (
    FEATURES, ID, IMAGE, KINDS, LABEL, DatasetInfo, Expectations, feature_column,
    features_type,
)
from graceful_ray.data.images import ImageDecodeError, natural_shape, open_image
from graceful_ray.errors import DatasetError

InfoOrExpectations = Union[DatasetInfo, Expectations, None]


def _expectations(x: InfoOrExpectations) -> Expectations:
    if x is None:
        return Expectations()
    if isinstance(x, DatasetInfo):
        return Expectations.from_info(x)
    if isinstance(x, Expectations):
        return x
    raise TypeError(f"info_or_expectations must be DatasetInfo or Expectations, not {type(x)}")


def _show(value) -> str:
    """An id for a message: 17 or 'abc', not np.int64(17)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _column(table: pa.Table, name: str, file: str) -> pa.Array:
    if name not in table.column_names:
        raise DatasetError(
            f"missing column {name!r}; the table has {table.column_names}. A dataset needs "
            f"'id' (int64 or string), 'label' (int64) and 'features' or 'image'",
            file=file, column=name)
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _check_nulls(arr: pa.Array, file: str, column: str) -> None:
    if arr.null_count:
        row = _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise DatasetError(f"null value in column {column!r}; every row needs one",
                           file=file, column=column, row=row)


def id_type_name(t: pa.DataType) -> str | None:
    if pa.types.is_int64(t):
        return "int64"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return None


def ids_to_numpy(arr: pa.Array) -> np.ndarray:
    """int64 ids as int64; string ids as a numpy unicode array (sortable, hashable)."""
    if pa.types.is_integer(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return np.asarray(arr.to_pylist(), dtype=str)


class IdIndex:
    """Ids seen so far (per file), to find a duplicate within and across files.

    A duplicate is reported at its *second* occurrence (the file being added),
    naming where the first one is.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[str, np.ndarray]] = []

    def add(self, file: str, ids: np.ndarray) -> None:
        if len(ids) > 1:
            order = np.argsort(ids, kind="stable")
            s = ids[order]
            dup = s[1:] == s[:-1]
            if dup.any():
                row = int(order[1:][dup].min())
                first = _first(ids == ids[row])
                raise DatasetError(f"duplicate id {_show(ids[row])}: row {first} of the same file "
                                   f"has it too; ids must be unique",
                                   file=file, column=ID, row=row)
        for pfile, pids in self._parts:
            if len(pids) and len(ids):
                if pids.dtype.kind != ids.dtype.kind:
                    raise DatasetError(f"id type differs from file {pfile}; use one id type "
                                       f"(int64 or string) across the dataset",
                                       file=file, column=ID)
                hit = np.isin(ids, pids)
                if hit.any():
                    row = _first(hit)
                    prow = _first(pids == ids[row])
                    raise DatasetError(f"duplicate id {_show(ids[row])}: already in file {pfile} "
                                       f"row {prow}; ids must be unique across the dataset",
                                       file=file, column=ID, row=row)
        self._parts.append((file, ids))

    def all_ids(self) -> np.ndarray:
        if not self._parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([p for _, p in self._parts])


def _check_ids(table: pa.Table, file: str, exp: Expectations) -> tuple[str, np.ndarray]:
    arr = _column(table, ID, file)
    kind = id_type_name(arr.type)
    if kind is None:
        raise DatasetError(f"column 'id' has type {arr.type}; it must be int64 or string "
                           f"(cast it, e.g. table['id'].cast(pa.int64()))", file=file, column=ID)
    if exp.id_type is not None and kind != exp.id_type:
        raise DatasetError(f"column 'id' has type {kind} but the dataset's ids are "
                           f"{exp.id_type}; use one id type across the dataset",
                           file=file, column=ID)
    _check_nulls(arr, file, ID)
    return kind, ids_to_numpy(arr)


def _check_labels(table: pa.Table, file: str, exp: Expectations) -> None:
    arr = _column(table, LABEL, file)
    if not pa.types.is_int64(arr.type):
        raise DatasetError(f"column 'label' has type {arr.type}; it must be int64 class "
                           f"indices (cast it, e.g. table['label'].cast(pa.int64()))",
                           file=file, column=LABEL)
    _check_nulls(arr, file, LABEL)
    y = arr.to_numpy(zero_copy_only=False)
    hi = exp.num_classes
    bad = (y < 0) if hi is None else ((y < 0) | (y >= hi))
    if bad.any():
        row = _first(bad)
        allowed = "a class index >= 0" if hi is None else f"in [0, {hi})"
        raise DatasetError(f"label {int(y[row])} is outside the declared classes: must be "
                           f"{allowed}", file=file, column=LABEL, row=row)


def _check_features(table: pa.Table, file: str, exp: Expectations) -> tuple[int, ...]:
    arr = _column(table, FEATURES, file)
    t = arr.type
    want_len = None if exp.feature_shape is None else int(math.prod(exp.feature_shape))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        # Variable-size lists: name the first row whose length differs, since
        # that is the actual problem; if all agree, the type is still wrong.
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        valid = ~arr.is_null().to_numpy(zero_copy_only=False)
        ref = want_len if want_len is not None else (
            int(lengths[_first(valid)]) if valid.any() else None)
        if ref is not None:
            bad = valid & (lengths != ref)
            if bad.any():
                row = _first(bad)
                raise DatasetError(f"inconsistent feature length: this row has "
                                   f"{int(lengths[row])} values, expected {ref}",
                                   file=file, column=FEATURES, row=row)
        raise DatasetError(f"column 'features' is a variable-size {t}; store it as a "
                           f"fixed-size list of float32: pa.list_(pa.float32(), {ref})",
                           file=file, column=FEATURES)
    if not pa.types.is_fixed_size_list(t):
        raise DatasetError(f"column 'features' has type {t}; it must be a fixed-size list of "
                           f"float32 (pa.list_(pa.float32(), L))", file=file, column=FEATURES)
    if not pa.types.is_float32(t.value_type):
        raise DatasetError(f"column 'features' holds {t.value_type} values; they must be "
                           f"float32 (cast to {features_type(t.list_size)})",
                           file=file, column=FEATURES)
    length = int(t.list_size)
    if want_len is not None and length != want_len:
        raise DatasetError(f"inconsistent feature length: rows have {length} values, expected "
                           f"{want_len} (feature_shape {tuple(exp.feature_shape)})",
                           file=file, column=FEATURES, row=0)
    if length == 0:
        raise DatasetError("features have length 0", file=file, column=FEATURES, row=0)
    _check_nulls(arr, file, FEATURES)
    flat = arr.flatten()
    if flat.null_count:
        row = _first(flat.is_null().to_numpy(zero_copy_only=False)) // length
        raise DatasetError("null inside a feature vector", file=file, column=FEATURES, row=row)
    values = flat.to_numpy(zero_copy_only=False)
    finite = np.isfinite(values)
    if not finite.all():
        idx = _first(~finite)
        raise DatasetError(f"non-finite feature value {values[idx]} at position "
                           f"{idx % length}; features must be finite (no NaN/inf)",
                           file=file, column=FEATURES, row=idx // length)
    return tuple(exp.feature_shape) if exp.feature_shape is not None else (length,)


def _check_images(table: pa.Table, file: str, exp: Expectations) -> tuple[int, ...]:
    arr = _column(table, IMAGE, file)
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise DatasetError(f"column 'image' has type {arr.type}; it must be binary holding "
                           f"encoded PNG or JPEG bytes", file=file, column=IMAGE)
    _check_nulls(arr, file, IMAGE)
    shape = None if exp.feature_shape is None else tuple(int(s) for s in exp.feature_shape)
    if shape is not None and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise DatasetError(f"image feature_shape must be (C, H, W) with C 1 or 3, not {shape}",
                           file=file, column=IMAGE)
    for row, data in enumerate(arr.to_pylist()):
        try:
            img = open_image(data)
        except ImageDecodeError as e:
            raise DatasetError(f"unreadable image: {e}", file=file, column=IMAGE,
                               row=row) from None
        nat = natural_shape(img)
        if shape is None:
            shape = nat
        elif nat[1:] != shape[1:]:
            raise DatasetError(f"image is {nat[2]}x{nat[1]} (WxH) but the dataset's images "
                               f"are {shape[2]}x{shape[1]}", file=file, column=IMAGE, row=row)
    return shape  # type: ignore[return-value]


def validate_table(table: pa.Table, *, file: str,
                   info_or_expectations: InfoOrExpectations = None,
                   ids: IdIndex | None = None) -> Expectations:
    """Check one table against the contract; return the resolved expectations.

    ``file`` names the table in messages. ``info_or_expectations`` gives what
    the table must match (a :class:`DatasetInfo` or :class:`Expectations`);
    unknown parts (kind, feature shape, id type) are inferred from this table
    and returned, so validating several tables in turn keeps them consistent.
    ``ids`` collects ids across tables to catch duplicates between files.
    """
    if not isinstance(table, pa.Table):
        raise DatasetError(f"expected a pyarrow.Table, got {type(table).__name__}", file=file)
    exp = _expectations(info_or_expectations)
    kind = exp.kind
    if kind is None:
        has_f, has_i = FEATURES in table.column_names, IMAGE in table.column_names
        if has_f and has_i:
            raise DatasetError("table has both 'features' and 'image'; say which one is the "
                               "input (kind='features' or kind='image')", file=file)
        kind = "image" if has_i else "features"
    elif kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}: use one of {list(KINDS)}", file=file)
    # Column presence first, in contract order, so the message names what is missing.
    for name in (ID, LABEL, feature_column(kind)):
        _column(table, name, file)
    if table.num_rows == 0:
        raise DatasetError("table has no rows", file=file)
    id_kind, id_values = _check_ids(table, file, exp)
    _check_labels(table, file, exp)
    shape = (_check_features(table, file, exp) if kind == "features"
             else _check_images(table, file, exp))
    if ids is not None:
        ids.add(file, id_values)
    return Expectations(kind=kind, num_classes=exp.num_classes, feature_shape=tuple(shape),
                        id_type=id_kind)


def check_subset(file: str, ids: np.ndarray, parent: str, parent_ids: np.ndarray) -> None:
    """A subset split (``old_train``) must only hold ids of its parent split."""
    if len(ids) and len(parent_ids):
        missing = ~np.isin(ids, parent_ids)
    else:
        missing = np.ones(len(ids), dtype=bool)
    if missing.any():
        row = _first(missing)
        raise DatasetError(f"id {_show(ids[row])} is not in split {parent!r}, of which this split "
                           f"is declared a subset", file=file, column=ID, row=row)

