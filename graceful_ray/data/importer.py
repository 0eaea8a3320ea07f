"""``graceful-ray data import``: a team's own files become a graceful-ray dataset.

Two passes over the source, so memory stays bounded by one batch of features:

1. *keys*: only the label, id and split columns are read (batch by batch); the
   labels become class indices, ids are checked for duplicates (or generated
   from the row order), and every row is assigned a split, stratified by class
   and seeded unless the source says (split sub-directories or ``--split-col``);
   the rows v1 trained on become ``old_train`` when the user says which.
2. *rows*: the feature (or image) columns are streamed batch by batch,
   checked, and appended to one Parquet writer per split.

Every problem is one :class:`~graceful_ray.errors.DatasetError` naming the
source file, its row (counted from 0 within that file, the header not
counted) and the source column. The files are committed only when the whole
import succeeded (:func:`graceful_ray.data.write.publish`); a failed import
removes what it wrote and leaves an existing dataset as it was.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from graceful_ray.data import layout
from graceful_ray.data.contract import (
    FEATURES, ID, IMAGE, LABEL, OLD_TRAIN, TRAIN, DatasetInfo, Expectations,
    SplitInfo, dataset_checksum, features_type, now_iso,
)
from graceful_ray.data.images import ImageDecodeError, natural_shape, open_image
from graceful_ray.data.sources import FORMATS, IMAGE_PATH, Part, open_parts
from graceful_ray.data.validate import validate_table
from graceful_ray.data.write import DEFAULT_ROWS_PER_FILE, part_name, publish, target_entries
from graceful_ray.errors import ConfigError, DatasetError, StorageError
from graceful_ray.storage import Location, Staged, resolve

log = logging.getLogger(__name__)

VAL, TEST = "val", "test"
#: Split names a source may use for ours.
SPLIT_ALIASES = {"training": TRAIN, "validation": VAL, "valid": VAL, "dev": VAL, "testing": TEST}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_INT_TEXT = re.compile(r"^\s*-?\d+\s*$")


@dataclass(frozen=True)
class ImportOptions:
    """How to read a source and map its columns onto the data contract.

    Exactly one input: ``features_col`` (one list column; default
    ``features`` when the source has it), ``feature_cols`` (scalar columns in
    this order), ``feature_prefix`` (every column starting with it, by the
    number after the prefix), or ``image_col`` (image bytes or paths relative to
    the source). ``classes`` fixes the class order (string labels) or names the
    class indices (int labels). Splits come from the source's sub-directories or
    ``split_col``; missing ``val``/``test`` are carved from ``train`` by
    ``val_fraction``/``test_fraction``, stratified by class with ``seed``. What v1
    trained on (``old_train``): ``old_fraction`` of train, the train rows of
    ``old_classes``, the ids in the file ``old_ids``, or nothing (unknown).
    """

    format: str | None = None
    label_col: str = LABEL
    id_col: str | None = None
    features_col: str | None = None
    feature_cols: tuple[str, ...] | None = None
    feature_prefix: str | None = None
    image_col: str | None = None
    classes: tuple[str, ...] | None = None
    split_col: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    old_fraction: float | None = None
    old_classes: tuple[str, ...] | None = None
    old_ids: str | None = None
    name: str | None = None
    overwrite: bool = False
    batch_rows: int = 65_536
    rows_per_file: int = DEFAULT_ROWS_PER_FILE

    def check(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}: use one of {list(FORMATS)}")
        inputs = [n for n, v in (("--features-col", self.features_col),
                                 ("--feature-cols", self.feature_cols),
                                 ("--feature-prefix", self.feature_prefix),
                                 ("--image-col", self.image_col)) if v]
        if len(inputs) > 1:
            raise ConfigError(f"give one input: {' or '.join(inputs)}, not several")
        for n, v in (("val_fraction", self.val_fraction), ("test_fraction", self.test_fraction)):
            if not 0 <= v < 1:
                raise ConfigError(f"{n} must be in [0, 1), not {v}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError("val_fraction + test_fraction must leave at least 10% for training")
        olds = [n for n, v in (("--old-fraction", self.old_fraction),
                               ("--old-classes", self.old_classes),
                               ("--old-ids", self.old_ids)) if v is not None]
        if len(olds) > 1:
            raise ConfigError(f"say what v1 trained on once: {' or '.join(olds)}, not several")
        if self.old_fraction is not None and not 0 < self.old_fraction <= 1:
            raise ConfigError(f"old_fraction must be in (0, 1], not {self.old_fraction}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"--classes lists a class twice: {list(self.classes)}")
        if self.batch_rows < 1 or self.rows_per_file < 1:
            raise ConfigError("batch_rows and rows_per_file must be >= 1")


# --------------------------------------------------------------------------
# column mapping
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Mapping:
    label: str
    id: str | None            # None: ids are generated from the row order
    split: str | None
    kind: str                 # "features" | "image"
    columns: tuple[str, ...]  # the source columns holding the input
    listed: bool              # features: one list column (True) or scalar columns


def _prefixed(names: Sequence[str], prefix: str) -> list[str]:
    cols = [n for n in names if n.startswith(prefix) and len(n) > len(prefix)]
    suffixes = [n[len(prefix):] for n in cols]
    if cols and all(s.isdigit() for s in suffixes):  # f_2 before f_10
        cols = [c for _, c in sorted(zip((int(s) for s in suffixes), cols))]
    return cols


def _resolve_mapping(parts: list[Part], opts: ImportOptions, fmt: str) -> _Mapping:
    first = parts[0]
    names = first.columns
    if fmt == "imagefolder":
        mapping = _Mapping(LABEL, None, None, "image", (IMAGE_PATH,), False)
    else:
        id_col = opts.id_col if opts.id_col else (ID if ID in names else None)
        if opts.image_col:
            kind, cols, listed = "image", (opts.image_col,), False
        elif opts.feature_cols:
            kind, cols, listed = "features", tuple(opts.feature_cols), False
        elif opts.feature_prefix:
            cols = tuple(_prefixed(names, opts.feature_prefix))
            if not cols:
                raise DatasetError(f"no column starts with --feature-prefix {opts.feature_prefix!r}; "
                                   f"the columns are {names}", file=first.uri)
            kind, listed = "features", False
        else:
            col = opts.features_col or FEATURES
            if col not in names:
                raise DatasetError(
                    f"no input column: {col!r} is not among the columns {names}; name the input "
                    f"with --features-col, --feature-cols a,b,c, --feature-prefix or --image-col",
                    file=first.uri, column=col)
            kind, cols, listed = "features", (col,), True
        mapping = _Mapping(opts.label_col, id_col, opts.split_col, kind, cols, listed)
    needed = [mapping.label, *mapping.columns, *(c for c in (mapping.id, mapping.split) if c)]
    for part in parts:
        for c in needed:
            if c not in part.columns:
                raise DatasetError(f"missing column {c!r}; the source has {part.columns}",
                                   file=part.uri, column=c)
    if mapping.split and any(p.split for p in parts):
        raise ConfigError("the source has split sub-directories; drop --split-col or flatten it")
    return mapping


# --------------------------------------------------------------------------
# pass 1: labels, ids, splits
# --------------------------------------------------------------------------
class _Rows:
    """Maps a global row index back to (part, row within the part) for messages."""

    def __init__(self, parts: list[Part], counts: list[int]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def where(self, g: int) -> tuple[str, int]:
        i = int(np.searchsorted(self.starts, g, side="right") - 1)
        return self.parts[i].uri, int(g - self.starts[i])


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class _KeyColumn:
    """A label, id or split column gathered over every batch, compactly.

    Integers are kept as int64; strings as int32 codes into the distinct values
    seen (labels and splits: few distinct values) or as Arrow strings (ids),
    never as one Python object per row, so this pass stays small next to the
    features it does not read.
    """

    def __init__(self, what: str, column: str | None, encode: bool):
        self.what, self.column, self.encode = what, column, encode
        self.kind: str | None = None  # "int" | "str"
        self.chunks: list[Any] = []
        self.values: dict[str, int] = {}
        self.all_int_text = True

    def _set_kind(self, kind: str, file: str) -> None:
        if self.kind is not None and self.kind != kind:
            raise DatasetError(f"the {self.what} column holds integers in some files and strings "
                               f"in others; use one type", file=file, column=self.column)
        self.kind = kind

    def add(self, arr: pa.Array, file: str, row0: int) -> None:
        if arr.null_count:
            row = row0 + _first(arr.is_null().to_numpy(zero_copy_only=False))
            raise DatasetError(f"missing {self.what}: every row needs one", file=file,
                               column=self.column, row=row)
        t = arr.type
        if pa.types.is_dictionary(t):
            return self.add(arr.dictionary_decode(), file, row0)
        if pa.types.is_integer(t):
            self._set_kind("int", file)
            self.chunks.append(arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
        elif pa.types.is_floating(t):
            v = arr.to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(v) | (v != np.round(v))
            if bad.any():
                row = _first(bad)
                raise DatasetError(f"{self.what} {v[row]!r} is neither an integer nor a string",
                                   file=file, column=self.column, row=row0 + row)
            self._set_kind("int", file)
            self.chunks.append(v.astype(np.int64))
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            self._set_kind("str", file)
            arr = arr.cast(pa.string())
            if self.encode:
                enc = pc.dictionary_encode(arr)
                lut = np.array([self.values.setdefault(v, len(self.values))
                                for v in enc.dictionary.to_pylist()], dtype=np.int32)
                self.chunks.append(lut[enc.indices.to_numpy(zero_copy_only=False)])
            else:
                if self.all_int_text:
                    self.all_int_text = bool(pc.all(pc.match_substring_regex(
                        arr, _INT_TEXT.pattern)).as_py())
                self.chunks.append(arr)
        else:
            raise DatasetError(f"column holds {t}; a {self.what} must be an integer or a string",
                               file=file, column=self.column)

    def add_constant(self, value: str, n: int) -> None:
        self.kind = "str"
        code = self.values.setdefault(value, len(self.values))
        self.chunks.append(np.full(n, code, dtype=np.int32))

    def finish(self, text: bool):
        """``("int", int64 array)``; ``("str", codes, names)`` when encoded; else
        ``("str", pa.ChunkedArray)``. CSV cells are text: a column whose every
        cell is an integer comes back as integers."""
        if self.kind == "int":
            return "int", np.concatenate(self.chunks)
        if self.encode:
            names = list(self.values)
            codes = np.concatenate(self.chunks)
            if text and names and all(_INT_TEXT.match(v) for v in names):
                return "int", np.array([int(v) for v in names], dtype=np.int64)[codes]
            return "str", codes, names
        ids = pa.chunked_array(self.chunks, type=pa.string())
        if text and self.all_int_text:
            return "int", pc.cast(pc.utf8_trim_whitespace(ids), pa.int64()).to_numpy()
        return "str", ids


@dataclass
class _Keys:
    rows: _Rows
    labels: np.ndarray          # int64 class index per row
    class_names: list[str]
    ids: Any                    # int64 ndarray, pa.ChunkedArray of strings, or None (generated)
    split_of: np.ndarray        # int16 index into split_names per row
    split_names: list[str]
    old: np.ndarray | None      # bool per row: in old_train
    scenario: dict[str, Any]
    splits_from: str


def _read_keys(parts: list[Part], m: _Mapping, opts: ImportOptions):
    label = _KeyColumn("label", m.label, encode=True)
    ids = _KeyColumn("id", m.id, encode=False) if m.id else None
    split = _KeyColumn("split", m.split, encode=True) if (m.split or any(p.split for p in parts)) \
        else None
    counts = []
    cols = [m.label, *(c for c in (m.id, m.split) if c)]
    for part in parts:
        n = 0
        for b in part.batches(cols, opts.batch_rows):
            label.add(b.column(m.label), part.uri, n)
            if ids is not None:
                ids.add(b.column(m.id), part.uri, n)
            if m.split:
                split.add(b.column(m.split), part.uri, n)
            n += b.num_rows
        if n == 0:
            raise DatasetError("the file has no rows", file=part.uri)
        if part.split is not None:
            split.add_constant(part.split, n)
        counts.append(n)
    text = any(p.text for p in parts)
    split_raw = None
    if split is not None:
        s = split.finish(text=False)
        split_raw = (s[1], [str(v) for v in s[2]]) if s[0] == "str" else \
            tuple(reversed(np.unique(s[1], return_inverse=True)))
        if s[0] == "int":
            split_raw = (split_raw[0], [str(v) for v in split_raw[1]])
    return (_Rows(parts, counts), label.finish(text),
            None if ids is None else ids.finish(text), split_raw)


def _class_indices(y_key, rows: _Rows, m: _Mapping,
                   classes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    if y_key[0] == "int":
        y_raw = y_key[1]
        neg = y_raw < 0
        if neg.any():
            file, row = rows.where(_first(neg))
            raise DatasetError(f"label {int(y_raw[_first(neg)])} is negative; integer labels are "
                               f"class indices 0, 1, ...", file=file, column=m.label, row=row)
        if classes is not None:
            names = [str(c) for c in classes]
            bad = y_raw >= len(names)
            if bad.any():
                g = _first(bad)
                file, row = rows.where(g)
                raise DatasetError(f"label {int(y_raw[g])} is not among --classes ({len(names)} "
                                   f"classes, indices 0..{len(names) - 1})",
                                   file=file, column=m.label, row=row)
        else:
            names = [str(i) for i in range(int(y_raw.max()) + 1)]
        return y_raw.astype(np.int64, copy=False), names
    # String labels: the class order is --classes, else sorted (stable across imports).
    _, codes, seen = y_key
    names = [str(c) for c in classes] if classes is not None else sorted(seen)
    pos = {c: i for i, c in enumerate(names)}
    lut = np.array([pos.get(v, -1) for v in seen], dtype=np.int64)
    y = lut[codes]
    if (y < 0).any():
        g = _first(y < 0)
        file, row = rows.where(g)
        raise DatasetError(f"label {seen[codes[g]]!r} is not among --classes {names}",
                           file=file, column=m.label, row=row)
    return y, names


def _id_value(ids: Any, g: int):
    v = ids[g]
    return v.as_py() if isinstance(v, pa.Scalar) else (v.item() if isinstance(v, np.generic) else v)


def _check_unique(ids: Any, rows: _Rows, column: str) -> None:
    if len(ids) < 2:
        return
    if isinstance(ids, pa.ChunkedArray):
        if pc.count_distinct(ids).as_py() == len(ids):
            return
        ids = np.asarray(ids.to_pylist(), dtype=str)  # only on the way to the error
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    dup = s[1:] == s[:-1]
    if dup.any():
        second = int(order[1:][dup].min())
        first = _first(ids == ids[second])
        f1, r1 = rows.where(first)
        file, row = rows.where(second)
        raise DatasetError(f"duplicate id {_id_value(ids, second)!r}: {f1} row {r1} has it too; "
                           f"ids must be unique", file=file, column=column, row=row)


def _stratified_ranks(rows: np.ndarray, labels: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``rows``: a random rank within their class, their class's group
    number, and the size of every group."""
    y = labels[rows]
    order = np.lexsort((rng.random(len(rows)), y))
    ys = y[order]
    starts = np.flatnonzero(np.concatenate([[True], ys[1:] != ys[:-1]])) if len(ys) else \
        np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.concatenate([starts, [len(ys)]])).astype(np.int64)
    group_sorted = np.repeat(np.arange(len(starts)), sizes)
    rank = np.empty(len(rows), dtype=np.int64)
    group = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - starts[group_sorted]
    group[order] = group_sorted
    return rank, group, sizes


def _quotas(sizes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Rows per class for a share ``fraction``: proportional to the class sizes and
    summing to ``round(total * fraction)`` (largest remainders, seeded ties), so
    many small classes do not round a split away."""
    exact = sizes * float(fraction)
    q = np.floor(exact).astype(np.int64)
    extra = int(round(float(sizes.sum()) * fraction)) - int(q.sum())
    if extra > 0:
        order = np.lexsort((rng.random(len(sizes)), -(exact - q)))
        q[order[:extra]] += 1
    return np.minimum(q, sizes)


def _assign_splits(split_raw: np.ndarray | None, labels: np.ndarray, rows: _Rows,
                   m: _Mapping, opts: ImportOptions, rng: np.random.Generator):
    n = len(labels)
    if split_raw is None:
        names, split_of, source = [TRAIN], np.zeros(n, dtype=np.int16), "stratified"
    else:
        inv, uniq = split_raw
        names = []
        for i, u in enumerate(uniq):
            s = SPLIT_ALIASES.get(str(u).lower(), str(u))
            if not _SPLIT_NAME.match(s) or s == OLD_TRAIN:
                g = _first(inv == i)
                file, row = rows.where(g)
                raise DatasetError(f"invalid split name {str(u)!r}: use letters, digits, '_', '-', "
                                   f"'.' (and not {OLD_TRAIN!r}, which --old-* makes)",
                                   file=file, column=m.split, row=None if m.split is None else row)
            names.append(s)
        if len(set(names)) != len(names):
            raise DatasetError(f"split names {sorted(map(str, uniq))} name one split twice",
                               column=m.split)
        split_of = inv.astype(np.int16)
        source = "split column" if m.split else "source directories"
        if TRAIN not in names:
            raise DatasetError(f"the source's splits are {names}; one must be {TRAIN!r} "
                               f"(or 'training')", file=rows.parts[0].uri, column=m.split)
    carve = [(s, f) for s, f in ((TEST, opts.test_fraction), (VAL, opts.val_fraction))
             if s not in names]
    if carve:
        train_code = names.index(TRAIN)
        train_rows = np.flatnonzero(split_of == train_code)
        rank, group, sizes = _stratified_ranks(train_rows, labels, rng)
        lo = np.zeros(len(sizes), dtype=np.int64)
        for s, f in carve:
            hi = lo + _quotas(sizes, f, rng)
            take = (rank >= lo[group]) & (rank < hi[group])
            names.append(s)
            split_of[train_rows[take]] = len(names) - 1
            lo = hi
        if source != "stratified":
            source += f" ({', '.join(s for s, _ in carve)} carved from train, stratified)"
    return names, split_of, source


def _read_id_list(uri: str, id_kind: str) -> tuple[np.ndarray, list[int]]:
    loc = resolve(uri)
    try:
        text = loc.read_bytes().decode()
    except UnicodeDecodeError:
        raise DatasetError("the id list is not UTF-8 text (one id per line)", file=uri) from None
    values, lines = [], []
    for i, line in enumerate(text.splitlines()):
        v = line.strip()
        if v:
            if id_kind == "i" and not _INT_TEXT.match(v):
                raise DatasetError(f"id {v!r} on line {i + 1} is not an integer, but the dataset's "
                                   f"ids are", file=uri, row=i)
            values.append(v)
            lines.append(i)
    if not values:
        raise DatasetError("the id list is empty (one id per line)", file=uri)
    arr = np.asarray(values, dtype=np.int64 if id_kind == "i" else str)
    return arr, lines


def _old_rows(opts: ImportOptions, keys: dict[str, Any], rng: np.random.Generator):
    """(bool mask of old_train rows, scenario) from what the user says v1 saw."""
    labels, split_of, names = keys["labels"], keys["split_of"], keys["split_names"]
    class_names, ids = keys["class_names"], keys["ids"]
    train = split_of == names.index(TRAIN)
    if opts.old_fraction is not None:
        train_rows = np.flatnonzero(train)
        rank, group, sizes = _stratified_ranks(train_rows, labels, rng)
        old = np.zeros(len(labels), dtype=bool)
        old[train_rows[rank < _quotas(sizes, opts.old_fraction, rng)[group]]] = True
        return old, {"kind": "data_growth", "old_fraction": float(opts.old_fraction),
                     "old_split": OLD_TRAIN}
    if opts.old_classes is not None:
        pos = {c: i for i, c in enumerate(class_names)}
        idx = []
        for c in opts.old_classes:
            if str(c) not in pos:
                raise ConfigError(f"--old-classes: {c!r} is not a class; the classes are "
                                  f"{class_names[:20]}")
            idx.append(pos[str(c)])
        idx = sorted(set(idx))
        return train & np.isin(labels, idx), {"kind": "class_incremental", "old_classes": idx,
                                              "old_split": OLD_TRAIN}
    if opts.old_ids is not None:
        all_ids = ids if ids is not None else np.arange(len(labels), dtype=np.int64)
        is_int = isinstance(all_ids, np.ndarray)
        wanted, lines = _read_id_list(opts.old_ids, "i" if is_int else "U")
        if is_int:
            known, old = np.isin(wanted, all_ids), np.isin(all_ids, wanted)
        else:
            id_arr = all_ids.combine_chunks()
            want_arr = pa.array(wanted.tolist(), pa.string())
            known = pc.is_in(want_arr, value_set=id_arr).to_numpy(zero_copy_only=False)
            old = pc.is_in(id_arr, value_set=want_arr).to_numpy(zero_copy_only=False)
        if not known.all():
            i = _first(~known)
            raise DatasetError(f"id {_id_value(wanted, i)!r} (line {lines[i] + 1}) is not in the "
                               f"source", file=opts.old_ids, row=lines[i])
        outside = old & ~train
        if outside.any():
            g = _first(outside)
            raise DatasetError(f"id {_id_value(all_ids, g)!r} is in split {names[split_of[g]]!r}; "
                               f"the rows v1 trained on must be training rows", file=opts.old_ids)
        return old, {"kind": "data_growth",
                     "old_fraction": float(old.sum() / max(1, train.sum())),
                     "old_split": OLD_TRAIN, "old_ids": opts.old_ids}
    # v1's training set is unknown: no old_train; its outputs are computed on train.
    return None, {"kind": "none"}


def _keys(parts: list[Part], m: _Mapping, opts: ImportOptions) -> _Keys:
    rows, y_key, id_key, split_raw = _read_keys(parts, m, opts)
    labels, class_names = _class_indices(y_key, rows, m, opts.classes)
    id_raw = None if id_key is None else id_key[1]
    if id_raw is not None:
        _check_unique(id_raw, rows, m.id)  # type: ignore[arg-type]
    rng = np.random.default_rng([int(opts.seed), 13])
    names, split_of, source = _assign_splits(split_raw, labels, rows, m, opts, rng)
    old, scenario = _old_rows(opts, dict(labels=labels, split_of=split_of, split_names=names,
                                         class_names=class_names, ids=id_raw), rng)
    counts = {s: int((split_of == i).sum()) for i, s in enumerate(names)}
    if old is not None:
        counts[OLD_TRAIN] = int(old.sum())
    for s, c in counts.items():
        if c == 0:
            how = {VAL: " (raise --val-fraction or add data)", TEST: " (raise --test-fraction or "
                   "add data)", OLD_TRAIN: " (no training row matches --old-*)"}.get(s, "")
            raise DatasetError(f"split {s!r} would be empty{how}", file=parts[0].uri,
                               column=m.split if m.split else None)
    return _Keys(rows, labels, class_names, id_raw, split_of, names, old, scenario, source)


# --------------------------------------------------------------------------
# pass 2: the input columns
# --------------------------------------------------------------------------
def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _text_to_float(arr: pa.Array, file: str, column: str, row0: int) -> pa.Array:
    try:
        return pc.cast(arr, pa.float32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for i, v in enumerate(arr.to_pylist()):
            try:
                pc.cast(pa.array([v], pa.string()), pa.float32())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DatasetError(f"non-numeric feature value {v!r}", file=file, column=column,
                                   row=row0 + i) from None
        raise DatasetError("non-numeric feature value", file=file, column=column) from None


def _check_finite(values: np.ndarray, rows_of: Callable[[int], tuple[int, str]],
                  file: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        i = _first(~finite)
        row, column = rows_of(i)
        raise DatasetError(f"non-finite feature value {values[i]} (NaN or inf); features must be "
                           f"finite", file=file, column=column, row=row)


def _scalar_features(b: pa.RecordBatch, m: _Mapping, part: Part, row0: int) -> np.ndarray:
    out = np.empty((b.num_rows, len(m.columns)), dtype=np.float32)
    for j, c in enumerate(m.columns):
        arr = b.column(c)
        if arr.null_count:
            row = row0 + _first(arr.is_null().to_numpy(zero_copy_only=False))
            raise DatasetError("missing feature value", file=part.uri, column=c, row=row)
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            arr = _text_to_float(arr, part.uri, c, row0)
        elif not _is_number(arr.type):
            raise DatasetError(f"column holds {arr.type}; features must be numbers",
                               file=part.uri, column=c)
        out[:, j] = arr.to_numpy(zero_copy_only=False)
    _check_finite(out.reshape(-1), lambda i: (row0 + i // len(m.columns), m.columns[i % len(m.columns)]),
                  part.uri)
    return out


def _list_features(b: pa.RecordBatch, m: _Mapping, part: Part, row0: int,
                   want: int | None) -> np.ndarray:
    col = m.columns[0]
    arr = b.column(col)
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        hint = (" (CSV has no list type: name the feature columns with --feature-cols or "
                "--feature-prefix)" if part.text else "")
        raise DatasetError(f"column holds {t}, not a list of numbers{hint}", file=part.uri,
                           column=col)
    if arr.null_count:
        row = row0 + _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise DatasetError("missing features", file=part.uri, column=col, row=row)
    if not _is_number(t.value_type) and not pa.types.is_null(t.value_type):
        raise DatasetError(f"features hold {t.value_type}; they must be numbers",
                           file=part.uri, column=col)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    ref = want if want is not None else int(lengths[0])
    bad = lengths != ref
    if bad.any():
        row = _first(bad)
        raise DatasetError(f"ragged features: this row has {int(lengths[row])} values, the "
                           f"first row has {ref}", file=part.uri, column=col, row=row0 + row)
    if ref == 0:
        raise DatasetError("features have length 0", file=part.uri, column=col, row=row0)
    values = pc.list_flatten(arr)
    if values.null_count:
        i = _first(values.is_null().to_numpy(zero_copy_only=False))
        raise DatasetError("missing feature value inside the list", file=part.uri, column=col,
                           row=row0 + i // ref)
    flat = values.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    _check_finite(flat, lambda i: (row0 + i // ref, col), part.uri)
    return flat.reshape(b.num_rows, ref)


def _read_image(part: Part, path: str) -> bytes:
    loc = resolve(path) if ("://" in path or posixpath.isabs(path)) else part.base.join(path)
    return loc.read_bytes()


def _images(b: pa.RecordBatch, m: _Mapping, part: Part, row0: int,
            state: dict[str, Any]) -> pa.Array:
    col = m.columns[0]
    arr = b.column(col)
    if arr.null_count:
        row = row0 + _first(arr.is_null().to_numpy(zero_copy_only=False))
        raise DatasetError("missing image", file=part.uri, column=col, row=row)
    by_path = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    if not by_path and not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        raise DatasetError(f"column holds {arr.type}; an image column holds encoded PNG/JPEG "
                           f"bytes or paths relative to the source", file=part.uri, column=col)
    out = []
    for i, v in enumerate(arr.to_pylist()):
        where = dict(file=part.uri, column=col, row=row0 + i)
        if by_path:
            try:
                data = _read_image(part, v)
            except StorageError as e:
                raise DatasetError(f"unreadable image {v!r}: {e}", **where) from None
        else:
            data = v
        try:
            shape = natural_shape(open_image(data))
        except ImageDecodeError as e:
            name = f" {v!r}" if by_path else ""
            raise DatasetError(f"unreadable or corrupt image{name}: {e}", **where) from None
        if state.get("shape") is None:
            state["shape"] = shape
        elif shape[1:] != state["shape"][1:]:
            want = state["shape"]
            raise DatasetError(f"image is {shape[2]}x{shape[1]} (WxH) but the first image is "
                               f"{want[2]}x{want[1]}; resize them to one size first", **where)
        out.append(data)
    return pa.array(out, type=pa.binary())


def _converted(parts: list[Part], m: _Mapping, keys: _Keys,
               opts: ImportOptions, state: dict[str, Any]) -> Iterator[tuple[str, pa.Table]]:
    """Output rows, per split, batch by batch: ``(split, table)`` in source order."""
    g = 0
    for p_i, part in enumerate(parts):
        row0 = 0
        for b in part.batches(list(m.columns), opts.batch_rows):
            n = b.num_rows
            sl = slice(g, g + n)
            if m.kind == "image":
                inputs = _images(b, m, part, row0, state)
            else:
                x = (_list_features(b, m, part, row0, state.get("length")) if m.listed
                     else _scalar_features(b, m, part, row0))
                if state.get("length") is None:
                    state["length"] = x.shape[1]
                    state["shape"] = part.feature_shape if (
                        part.feature_shape and int(np.prod(part.feature_shape)) == x.shape[1]
                    ) else (x.shape[1],)
                elif x.shape[1] != state["length"]:
                    raise DatasetError(f"ragged features: rows have {x.shape[1]} values, earlier "
                                       f"files have {state['length']}", file=part.uri,
                                       column=m.columns[0], row=row0)
                inputs = pa.FixedSizeListArray.from_arrays(
                    pa.array(x.reshape(-1), pa.float32()), type=features_type(x.shape[1]))
            if keys.ids is None:
                ids = pa.array(np.arange(g, g + n, dtype=np.int64))
            elif isinstance(keys.ids, np.ndarray):
                ids = pa.array(keys.ids[sl])
            else:
                ids = keys.ids.slice(g, n).combine_chunks()
            table = pa.table({ID: ids, LABEL: pa.array(keys.labels[sl], pa.int64()),
                              (IMAGE if m.kind == "image" else FEATURES): inputs})
            split_of = keys.split_of[sl]
            for code, s in enumerate(keys.split_names):
                mask = split_of == code
                if mask.any():
                    yield s, table.filter(pa.array(mask))
            if keys.old is not None and keys.old[sl].any():
                yield OLD_TRAIN, table.filter(pa.array(keys.old[sl]))
            g += n
            row0 += n


class _SplitWriter:
    """One split's Parquet files, written as rows arrive, in row groups and files
    bounded by bytes (:mod:`graceful_ray.data.layout`; a file also by
    ``rows_per_file`` rows). ``feature_shape`` gives the rows' decoded shape once
    the conversion has seen the first row (it counts in a row's bytes)."""

    def __init__(self, staged: Staged, token: str, split: str, rows_per_file: int,
                 feature_shape: Callable[[], Sequence[int] | None] = lambda: None):
        self.staged, self.token = staged, token
        self.split, self.rows_per_file = split, rows_per_file
        self.feature_shape = feature_shape
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.row_bytes = 1  # the largest seen: the bound holds for every group
        self.rows = 0
        self.files: list[str] = []
        self.hashes: dict[str, str] = {}
        self._writer = self._stream = None
        self._file_rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.row_bytes = max(self.row_bytes, layout.row_bytes(table, self.feature_shape()))
        if self.pending_rows >= layout.rows_per_row_group(self.row_bytes):
            self._flush()

    def _open(self, schema: pa.Schema) -> None:
        rel = part_name(self.split, self.token, len(self.files))
        self._stream = self.staged.open_output(rel)
        self._writer = pq.ParquetWriter(self._stream, schema, compression="zstd")
        self.files.append(rel)
        self._file_rows = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = self._stream = None
            rel = self.files[-1]
            self.hashes[rel] = _sha256_file(self.staged.prefix.join(rel))

    def _flush(self, final: bool = False) -> None:
        """Write the pending rows as whole row groups, starting a new file where the
        current one is full; the rows short of a group wait for more unless ``final``."""
        if not self.pending:
            return
        table = pa.concat_tables(self.pending).combine_chunks()
        group = layout.rows_per_row_group(self.row_bytes)
        per_file = layout.rows_per_file(self.row_bytes, self.rows_per_file)
        end = table.num_rows if final else table.num_rows - table.num_rows % group
        self.pending = [table.slice(end)] if end < table.num_rows else []
        self.pending_rows = table.num_rows - end
        start = 0
        while start < end:
            if self._writer is None:
                self._open(table.schema)
            take = min(end - start, per_file - self._file_rows, group)
            self._writer.write_table(table.slice(start, take), row_group_size=group)
            self._file_rows += take
            self.rows += take
            start += take
            if self._file_rows >= per_file:
                self._close_file()

    def finish(self, subset_of: str | None) -> SplitInfo:
        self._flush(final=True)
        self._close_file()
        return SplitInfo.build(self.rows, self.files, self.hashes, subset_of)

    def abort(self) -> None:
        for obj in (self._writer, self._stream):
            try:
                if obj is not None:
                    obj.close()
            except Exception:  # noqa: BLE001 - already failing; the caller re-raises
                pass


def _sha256_file(loc: Location) -> str:
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------
def import_source(source: str, out: str, options: ImportOptions | None = None,
                  **overrides: Any) -> DatasetInfo:
    """Import ``source`` (a file or directory, local, ``s3://`` or ``gs://``) as a
    dataset at ``out``; see :class:`ImportOptions` (keyword ``overrides`` replace
    its fields). Returns the written dataset's :class:`DatasetInfo`. Raises
    :class:`DatasetError` naming file, row and column on bad input, having
    written nothing.
    """
    opts = options or ImportOptions()
    if overrides:
        known = {f.name for f in fields(ImportOptions)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown import options {unknown}; they are {sorted(known)}")
        opts = replace(opts, **overrides)
    opts.check()
    out_loc = resolve(out)
    name = opts.name or posixpath.basename(out_loc.path.rstrip("/")) or "dataset"
    fmt, parts = open_parts(source, opts.format)
    m = _resolve_mapping(parts, opts, fmt)
    keys = _keys(parts, m, opts)
    split_names = [*keys.split_names, *([OLD_TRAIN] if keys.old is not None else [])]
    existing = target_entries(out_loc, set(split_names), opts.overwrite)
    subsets = {OLD_TRAIN: TRAIN} if keys.old is not None else {}
    id_type = "string" if isinstance(keys.ids, pa.ChunkedArray) else "int64"
    state: dict[str, Any] = {}

    def expectations() -> Expectations:
        return Expectations(kind=m.kind, num_classes=len(keys.class_names),
                            feature_shape=tuple(state["shape"]), id_type=id_type)

    def run(staged: Staged, token: str) -> dict[str, SplitInfo]:
        writers = {s: _SplitWriter(staged, token, s, opts.rows_per_file,
                                   lambda: state.get("shape")) for s in split_names}
        try:
            for s, table in _converted(parts, m, keys, opts, state):
                # The contract's own check, as a guard: the conversion above has
                # already named any bad source row, so this should never fire.
                validate_table(table, file=f"{s} (converted from {source})",
                               info_or_expectations=expectations())
                writers[s].add(table)
            return {s: w.finish(subsets.get(s)) for s, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise

    def make_info(splits: dict[str, SplitInfo]) -> DatasetInfo:
        return DatasetInfo(
            name=name, kind=m.kind, num_classes=len(keys.class_names),
            class_names=list(keys.class_names), feature_shape=tuple(state["shape"]),
            splits=splits, checksum=dataset_checksum(splits), scenario=keys.scenario,
            seed=int(opts.seed), created_at=now_iso(), id_type=id_type,
            extra={"source": resolve(source).uri, "source_format": fmt, "label_col": m.label,
                   "id_col": m.id, "input_cols": list(m.columns), "splits_from": keys.splits_from,
                   "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
                   **({} if keys.old is not None else {"old_train": "unknown: v1's training "
                                                       "rows were not given"})})

    info = publish(out_loc, run, make_info, existing)
    log.info("imported %s into %s: %s, %d classes, checksum %s", source, out_loc.uri,
             ", ".join(f"{k} {v.rows}" for k, v in info.splits.items()), info.num_classes,
             info.checksum[:12])
    return info
