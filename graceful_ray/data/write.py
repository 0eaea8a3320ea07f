"""Write and publish datasets on any ``pyarrow.fs`` filesystem.

Writing validates every split first, so a bad input writes nothing. Publishing
is all-or-nothing for readers, the same way on every filesystem: the split files
are written under names of their own (:func:`part_name`), then ``dataset.json``,
which lists them, is committed through :class:`~graceful_ray.storage.Staged` (a
prefix without it is not a dataset, and readers read only the files it lists).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from graceful_ray.data import layout
from graceful_ray.data.contract import (
    DATASET_JSON,
    FEATURES,
    ID,
    IMAGE,
    LABEL,
    OLD_TRAIN,
    SCENARIOS,
    TRAIN,
    DatasetInfo,
    Expectations,
    SplitInfo,
    dataset_checksum,
    features_type,
    now_iso,
    sha256_hex,
)
from graceful_ray.data.read import PathLike, as_location, read_info
from graceful_ray.data.validate import IdIndex, check_subset, validate_table
from graceful_ray.errors import ConfigError, DatasetError, StorageError
from graceful_ray.storage import Location, Staged, resolve

log = logging.getLogger(__name__)

#: Rows per Parquet file at most; files and their row groups are also bounded by
#: bytes (graceful_ray.data.layout), so a split of images is several files that
#: Ray Data reads in bounded pieces.
DEFAULT_ROWS_PER_FILE = 250_000
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STAGING = ".staging-"
_TRASH = ".trash-"


def _normalize_scenario(scenario: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if scenario is None:
        return {"kind": "none"}
    if isinstance(scenario, str):
        scenario = {"kind": scenario}
    d = dict(scenario)
    if d.get("kind") not in SCENARIOS:
        raise ConfigError(f"unknown scenario {d.get('kind')!r}: use one of {list(SCENARIOS)}")
    return d


def _default_subsets(splits: Iterable[str], subsets: Mapping[str, str] | None) -> dict[str, str]:
    names = set(splits)
    if subsets is None:
        return {OLD_TRAIN: TRAIN} if {OLD_TRAIN, TRAIN} <= names else {}
    out = dict(subsets)
    for child, parent in out.items():
        if child not in names or parent not in names:
            raise ConfigError(f"subset {child!r} of {parent!r}: both must be splits "
                              f"(have {sorted(names)})")
        if parent in out:
            raise ConfigError(f"split {parent!r} is itself a subset; nest subsets one level only")
    return out


def _validate_splits(sources: Mapping[str, Sequence[tuple[str, pa.Table]]],
                     exp: Expectations, subsets: Mapping[str, str]) -> Expectations:
    """Validate every table of every split (parents before subsets)."""
    if not sources:
        raise ConfigError("no splits given: pass at least one, e.g. {'train': table}")
    main = IdIndex()
    split_ids: dict[str, np.ndarray] = {}
    order = sorted(sources, key=lambda s: (s in subsets, s))
    for split in order:
        if not _SPLIT_NAME.match(split):
            raise ConfigError(f"invalid split name {split!r}: use letters, digits, '_', '-', '.'")
        if not sources[split]:
            raise DatasetError(f"split {split!r} has no files or tables", file=split)
        local = IdIndex() if split in subsets else main
        start = len(local._parts)
        for file, table in sources[split]:
            exp = validate_table(table, file=file, info_or_expectations=exp, ids=local)
        parts = local._parts[start:]
        split_ids[split] = np.concatenate([p for _, p in parts])
        if split in subsets:
            for file, ids in parts:
                check_subset(file, ids, subsets[split], split_ids[subsets[split]])
    return exp


def _is_ours(name: str, split_names: set[str]) -> bool:
    return (name == DATASET_JSON or name in split_names or name.startswith(_STAGING)
            or name.startswith(_TRASH))


def target_entries(loc: Location, split_names: set[str], overwrite: bool) -> list[str]:
    """Refuse to write over a dataset (unless ``overwrite``) or over foreign files.

    Returns the names of existing entries to remove on overwrite.
    """
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        raise DatasetError(f"{loc.uri} is a file; give a directory for the dataset",
                           file=loc.uri)
    if info.type == pafs.FileType.NotFound:
        return []
    names = sorted(posixpath.basename(e.path.rstrip("/")) for e in loc.list())
    if not names:
        return []
    old_splits: set[str] = set()
    if DATASET_JSON in names:
        try:
            old = read_info(loc)
            old_splits = set(old.splits)
            desc = f"dataset {old.name!r} (checksum {old.checksum[:12]})"
        except DatasetError:
            desc = "a dataset with an unreadable dataset.json"
        if not overwrite:
            raise DatasetError(f"{loc.uri} already holds {desc}; pass overwrite=True "
                               f"(--overwrite) to replace it", file=loc.join(DATASET_JSON).uri)
    foreign = [n for n in names if not _is_ours(n, split_names | old_splits)]
    if foreign:
        raise DatasetError(f"{loc.uri} is not empty and holds files that are not part of a "
                           f"dataset ({', '.join(foreign[:5])}); choose an empty or new "
                           f"directory", file=loc.uri)
    if DATASET_JSON not in names and not overwrite:
        raise DatasetError(f"{loc.uri} holds an incomplete dataset (split files without "
                           f"dataset.json, e.g. from an interrupted write); pass "
                           f"overwrite=True (--overwrite) to replace it", file=loc.uri)
    return names


def check_target(root: PathLike, split_names: Iterable[str], overwrite: bool = False) -> None:
    """Raise now if writing a dataset to ``root`` would be refused later.

    Lets slow producers (dataset generators) fail before doing the work.
    """
    target_entries(as_location(root), set(split_names), overwrite)


def _parquet_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows)
    return buf.getvalue().to_pybytes()


def part_name(split: str, token: str, index: int) -> str:
    """The name of a split's ``index``-th file in the publish ``token``: unique
    to that publish, so a write never touches a file a reader may be reading."""
    return f"{split}/part-{token}-{index:05d}.parquet"


def _write_splits(staged: Staged, token: str, tables: Mapping[str, pa.Table],
                  subsets: Mapping[str, str], rows_per_file: int,
                  feature_shape: Sequence[int] | None) -> dict[str, SplitInfo]:
    out: dict[str, SplitInfo] = {}
    for split in sorted(tables):
        table = tables[split]
        files, hashes = [], {}
        size = layout.row_bytes(table, feature_shape)
        group_rows = layout.rows_per_row_group(size)
        file_rows = layout.rows_per_file(size, rows_per_file)
        n_files = max(1, -(-table.num_rows // file_rows))
        for i in range(n_files):
            part = table.slice(i * file_rows, file_rows)
            rel = part_name(split, token, i)
            data = _parquet_bytes(part, group_rows)
            staged.write(rel, data)
            files.append(rel)
            hashes[rel] = sha256_hex(data)
        out[split] = SplitInfo.build(table.num_rows, files, hashes, subsets.get(split))
        log.debug("wrote split %s: %d rows in %d files, row groups of up to %d rows", split,
                  table.num_rows, n_files, group_rows)
    return out


def _publish(loc: Location, tables: Mapping[str, pa.Table], subsets: Mapping[str, str],
             make_info, existing: list[str], rows_per_file: int,
             feature_shape: Sequence[int] | None) -> DatasetInfo:
    return publish(loc, lambda staged, token: _write_splits(
        staged, token, tables, subsets, rows_per_file, feature_shape), make_info, existing)


def _replaced_files(loc: Location, existing: list[str]) -> list[Location]:
    """The files an overwrite removes once it has committed: those the current
    ``dataset.json`` lists, or, where there is none (an interrupted write the
    user asked to replace), every file in ``existing``. Unlisted files beside a
    dataset are left alone: they may be another writer's, not yet committed."""
    if DATASET_JSON in existing:
        try:
            return [loc.join(rel) for si in read_info(loc).splits.values() for rel in si.files]
        except DatasetError:  # unreadable: what it listed cannot be known
            return []
    found = []
    for name in existing:
        child = loc.join(name)
        info = loc.fs.get_file_info(child.path)
        if info.type == pafs.FileType.File:
            found.append(child)
        elif info.type == pafs.FileType.Directory:
            for f in loc.fs.get_file_info(pafs.FileSelector(child.path, recursive=True)):
                if f.type == pafs.FileType.File:
                    found.append(loc.join(posixpath.relpath(f.path, loc.path)))
    return found


def publish(loc: Location, write_splits: Callable[[Staged, str], dict[str, SplitInfo]],
            make_info: Callable[[dict[str, SplitInfo]], DatasetInfo],
            existing: list[str]) -> DatasetInfo:
    """Publish a dataset all-or-nothing through :class:`~graceful_ray.storage.Staged`.

    ``write_splits(staged, token)`` writes the split files through ``staged``
    under names made by :func:`part_name` with ``token`` and returns their
    :class:`SplitInfo`; ``make_info`` turns those into ``dataset.json``, the
    pointer that commits them. A new dataset is committed only if no other
    writer published one there meanwhile; ``overwrite`` replaces the pointer in
    one atomic write, so readers see the old dataset or the new one, never
    neither, and then the old dataset's files are removed (``existing``, from
    :func:`target_entries`, says what was there before this write began). If
    anything fails before the commit, the files written here are removed and an
    existing dataset is untouched.
    """
    replacing = DATASET_JSON in existing
    old_files = _replaced_files(loc, existing)
    token = uuid.uuid4().hex[:12]
    try:
        with Staged(loc) as staged:
            info = make_info(write_splits(staged, token))
            if not staged.commit(loc.join(DATASET_JSON), info.to_json().encode(),
                                 replace=replacing):
                raise DatasetError(f"another writer published a dataset at {loc.uri} while "
                                   f"this one was being written; this write was discarded",
                                   file=loc.join(DATASET_JSON).uri)
    except OSError as e:
        raise StorageError(f"cannot write dataset to {loc.uri}: {e}") from e
    for old in old_files:  # the replaced dataset's files; no reader is sent to them any more
        try:
            old.delete_file()
        except StorageError as e:  # committed already: what is left is debris, not data
            log.warning("published %s but could not remove a replaced file: %s", loc.uri, e)
    for name in existing:  # split directories the new dataset no longer has
        loc.join(name).remove_empty_dirs()
    return info


def _write_validated(loc: Location, tables: Mapping[str, pa.Table], exp: Expectations, *,
                     name: str, num_classes: int, class_names: Sequence[str] | None,
                     scenario: dict[str, Any], seed: int | None, subsets: Mapping[str, str],
                     extra: Mapping[str, Any] | None, existing: list[str],
                     rows_per_file: int) -> DatasetInfo:
    names = [str(c) for c in class_names] if class_names is not None else [
        str(i) for i in range(num_classes)]

    def make_info(splits: dict[str, SplitInfo]) -> DatasetInfo:
        return DatasetInfo(
            name=name, kind=exp.kind or "features", num_classes=int(num_classes),
            class_names=names, feature_shape=tuple(exp.feature_shape or ()),
            splits=splits, checksum=dataset_checksum(splits), scenario=scenario,
            seed=None if seed is None else int(seed), created_at=now_iso(),
            extra=dict(extra or {}), id_type=exp.id_type or "int64")

    info = _publish(loc, tables, subsets, make_info, existing, rows_per_file, exp.feature_shape)
    log.info("wrote dataset %s to %s: %s, checksum %s", name, loc.uri,
             ", ".join(f"{k} {v.rows}" for k, v in info.splits.items()), info.checksum[:12])
    return info


def _check_args(name: str, num_classes: int | None, class_names: Sequence[str] | None,
                feature_shape: Sequence[int] | None, kind: str | None,
                rows_per_file: int) -> tuple[int, ...] | None:
    if not name or not isinstance(name, str):
        raise ConfigError("a dataset needs a non-empty name")
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, not {num_classes!r}")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ConfigError(f"class_names has {len(class_names)} names but num_classes is "
                          f"{num_classes}")
    if kind is not None and kind not in ("features", "image"):
        raise ConfigError(f"kind must be 'features' or 'image', not {kind!r}")
    if rows_per_file < 1:
        raise ConfigError("rows_per_file must be >= 1")
    if feature_shape is None:
        return None
    shape = tuple(int(s) for s in feature_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"feature_shape must be positive sizes, not {feature_shape!r}")
    return shape


def write_dataset(root: PathLike, splits: Mapping[str, pa.Table], *, name: str,
                  num_classes: int, class_names: Sequence[str] | None = None,
                  feature_shape: Sequence[int] | None = None,
                  scenario: str | Mapping[str, Any] | None = None, seed: int | None = None,
                  overwrite: bool = False, kind: str | None = None,
                  subsets: Mapping[str, str] | None = None,
                  extra: Mapping[str, Any] | None = None,
                  rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> DatasetInfo:
    """Validate every split, then write them as Parquet plus ``dataset.json``.

    ``splits`` maps split name to table. ``feature_shape`` defaults to
    ``(L,)`` for features and to the first image's ``(C, H, W)``; ``kind`` is
    inferred from the columns. ``subsets`` maps a split to the split it draws
    its rows from (default ``{"old_train": "train"}`` when both exist): its ids
    repeat the parent's, every other id is unique across the dataset.
    Nothing is written when any check fails; an existing dataset is replaced
    only with ``overwrite=True``. A split's files hold at most ``rows_per_file``
    rows, and files and row groups are bounded by bytes too
    (:mod:`graceful_ray.data.layout`).
    """
    shape = _check_args(name, num_classes, class_names, feature_shape, kind, rows_per_file)
    if num_classes is None:
        raise ConfigError("write_dataset needs num_classes")
    scen = _normalize_scenario(scenario)
    subs = _default_subsets(splits, subsets)
    loc = as_location(root)
    existing = target_entries(loc, set(splits), overwrite)
    exp = Expectations(kind=kind, num_classes=int(num_classes), feature_shape=shape)
    exp = _validate_splits({s: [(f"{s} (input table)", t)] for s, t in splits.items()},
                           exp, subs)
    return _write_validated(loc, dict(splits), exp, name=name, num_classes=int(num_classes),
                            class_names=class_names, scenario=scen, seed=seed, subsets=subs,
                            extra=extra, existing=existing, rows_per_file=rows_per_file)



# --------------------------------------------------------------------------
# a directory of the user's own Parquet, already in the contract's columns
# --------------------------------------------------------------------------
def conform(table: pa.Table) -> pa.Table:
    """Lossless-in-practice casts toward the contract, for imported Parquet.

    Integer ids and labels become int64, large strings/binaries their normal
    variants, float features fixed-size float32 lists when every row has the
    same length. Anything else is left for validation to report.
    """
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        t = col.type
        target = None
        if name in (ID, LABEL) and pa.types.is_integer(t) and not pa.types.is_int64(t):
            target = pa.int64()
        elif name == ID and pa.types.is_large_string(t):
            target = pa.string()
        elif name == IMAGE and pa.types.is_large_binary(t):
            target = pa.binary()
        elif name == FEATURES and (pa.types.is_list(t) or pa.types.is_large_list(t)
                                   or pa.types.is_fixed_size_list(t)) \
                and pa.types.is_floating(t.value_type):
            if pa.types.is_fixed_size_list(t):
                if not pa.types.is_float32(t.value_type):
                    target = features_type(t.list_size)
            elif col.null_count == 0 and table.num_rows:
                lengths = pc.list_value_length(col)
                lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
                if lo == hi and lo:
                    target = features_type(lo)
        if target is not None:
            try:
                col = col.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # validation names the problem
        cols[name] = col
    return pa.table(cols, metadata=table.schema.metadata)


def _parquet_files(loc: Location) -> list[Location]:
    if not loc.is_dir():
        if not loc.exists():
            raise DatasetError(f"{loc.uri} does not exist", file=loc.uri)
        return [loc]
    files = [e for e in loc.list() if e.type == pafs.FileType.File]
    names = sorted(posixpath.basename(e.path) for e in files
                   if not posixpath.basename(e.path).startswith(("_", "."))
                   and posixpath.basename(e.path).endswith((".parquet", ".parq", ".pq")))
    return [loc.join(n) for n in names]


def _gather_sources(src: Any, split: str) -> dict[str, list[Location]]:
    if isinstance(src, Mapping):
        out = {}
        for s, paths in src.items():
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            out[str(s)] = [f for p in paths for f in _parquet_files(resolve(p))]
        return out
    if isinstance(src, (list, tuple)):
        return {split: [f for p in src for f in _parquet_files(resolve(p))]}
    loc = resolve(src)
    if loc.is_dir():
        subdirs = sorted(posixpath.basename(e.path.rstrip("/")) for e in loc.list()
                         if e.type == pafs.FileType.Directory
                         and not posixpath.basename(e.path.rstrip("/")).startswith((".", "_")))
        if subdirs:
            return {d: _parquet_files(loc.join(d)) for d in subdirs}
    return {split: _parquet_files(loc)}


def import_dataset(src: Any, out: PathLike, *, name: str | None = None,
                   num_classes: int | None = None, class_names: Sequence[str] | None = None,
                   feature_shape: Sequence[int] | None = None, kind: str | None = None,
                   scenario: str | Mapping[str, Any] | None = None, seed: int | None = None,
                   overwrite: bool = False, split: str = "train", cast: bool = True,
                   subsets: Mapping[str, str] | None = None,
                   extra: Mapping[str, Any] | None = None,
                   rows_per_file: int = DEFAULT_ROWS_PER_FILE) -> DatasetInfo:
    """Turn a user's own Parquet into a dataset with ``dataset.json``.

    ``src`` is a directory with one sub-directory per split, a directory or
    list of Parquet files forming the single split ``split``, or a mapping
    ``{split: file(s) or directory}`` (local or any URI :func:`resolve` takes).
    Each source file is validated under its own name, so an error points at
    the user's file and row. ``num_classes`` defaults to the largest label + 1;
    ``cast`` applies :func:`conform` first.
    """
    out_loc = as_location(out)
    name = name or posixpath.basename(out_loc.path.rstrip("/")) or "dataset"
    shape = _check_args(name, num_classes, class_names, feature_shape, kind, rows_per_file)
    scen = _normalize_scenario(scenario)
    sources = _gather_sources(src, split)
    for s, files in sources.items():
        if not files:
            raise DatasetError(f"split {s!r}: no Parquet files found", file=str(s))
    subs = _default_subsets(sources, subsets)
    existing = target_entries(out_loc, set(sources), overwrite)
    loaded: dict[str, list[tuple[str, pa.Table]]] = {}
    for s, files in sources.items():
        for f in files:
            try:
                t = pq.read_table(f.path, filesystem=f.fs)
            except (pa.ArrowInvalid, OSError) as e:
                raise DatasetError(f"not a readable Parquet file: {e}", file=f.uri) from None
            loaded.setdefault(s, []).append((f.uri, conform(t) if cast else t))
    exp = Expectations(kind=kind, num_classes=num_classes, feature_shape=shape)
    exp = _validate_splits(loaded, exp, subs)
    if num_classes is None:
        num_classes = 1 + max(int(pc.max(t.column(LABEL)).as_py())
                              for ts in loaded.values() for _, t in ts)
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"class_names has {len(class_names)} names but the labels "
                              f"imply {num_classes} classes; pass num_classes")
    tables = {}
    for s, ts in loaded.items():
        parts = [t.select(ts[0][1].column_names) if t.column_names != ts[0][1].column_names
                 else t for _, t in ts]
        try:
            tables[s] = pa.concat_tables(parts).combine_chunks()
        except (pa.ArrowInvalid, KeyError) as e:
            raise DatasetError(f"the files of split {s!r} have different schemas: {e}",
                               file=ts[0][0]) from None
    return _write_validated(out_loc, tables, exp, name=name, num_classes=int(num_classes),
                            class_names=class_names, scenario=scen, seed=seed, subsets=subs,
                            extra=extra, existing=existing, rows_per_file=rows_per_file)
