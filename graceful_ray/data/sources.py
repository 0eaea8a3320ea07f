"""Reading a user's own files for ``graceful-ray data import``, in bounded batches.

A source is split into :class:`Part` s: one per file of a table (Parquet, CSV,
JSON Lines), one per split of an image folder, one per split of a ``.npz``.
Each part knows the split its layout implies (``ROOT/train/...``), its schema,
and scans any subset of its columns as Arrow record batches of at most
``batch_rows`` rows, in the same order every time, so the importer can read the
label and id columns first, decide the splits, and then stream the features
without holding them all. Messages name ``Part.uri`` and the row within it.

Image folders (``ROOT/[split/]class_name/*.png|jpg``) and ``.npz`` files become
small in-memory tables in the same shape: an image folder is a table of
relative paths and class names (the pixels are read later, batch by batch); a
``.npz`` is read whole, as NumPy's format requires (use Parquet for data larger
than memory).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from graceful_ray.data.contract import FEATURES, LABEL, features_type
from graceful_ray.errors import ConfigError, DatasetError, StorageError
from graceful_ray.storage import Location, resolve

FORMATS = ("parquet", "csv", "jsonl", "npz", "imagefolder")
TABLE_SUFFIXES = {
    "parquet": (".parquet", ".parq", ".pq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The image folder's table: a path relative to the folder, and the class name.
IMAGE_PATH = "image"


@dataclass
class Part:
    """One readable piece of a source: a file, or an in-memory table."""

    uri: str
    split: str | None
    schema: pa.Schema
    #: CSV: every column is read as text (the importer parses numbers itself,
    #: so a bad value is reported with its row and column).
    text: bool = False
    #: Paths in an image column are relative to this location.
    base: Location | None = None
    #: A ``.npz``'s ``x.shape[1:]`` (features may be more than 1-D there).
    feature_shape: tuple[int, ...] | None = None
    #: Parquet, CSV, JSON Lines: a function of the columns giving their record batches, one
    #: row group / text block at a time (pyarrow.dataset's scanner buffered more
    #: the larger the file: benchmarks/results/data_import_memory.md).
    reader: Callable[[list[str]], Iterator[pa.RecordBatch]] | None = field(default=None, repr=False)
    table: pa.Table | None = field(default=None, repr=False)

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def batches(self, columns: Sequence[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` (at most ``batch_rows`` rows each), in file order."""
        if self.table is not None:
            t = self.table.select(list(columns))
            for b in t.to_batches(max_chunksize=batch_rows):
                if b.num_rows:
                    yield b
            return
        if self.reader is not None:
            try:
                for b in self.reader(list(columns)):
                    for start in range(0, b.num_rows, batch_rows):
                        yield b.slice(start, batch_rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
                raise DatasetError(f"cannot read the file: {_short(e)}", file=self.uri) from None
            return
        raise AssertionError("a Part has a table or a reader")


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _basename(loc_or_path) -> str:
    path = loc_or_path.path if isinstance(loc_or_path, Location) else loc_or_path
    return posixpath.basename(path.rstrip("/"))


def _visible(name: str) -> bool:
    return not name.startswith((".", "_"))


def _children(loc: Location) -> tuple[list[str], list[str]]:
    """(files, directories) directly under ``loc``, by name, sorted, hidden ones left out."""
    files, dirs = [], []
    for e in loc.list():
        name = _basename(e.path)
        if not _visible(name):
            continue
        if e.type == pafs.FileType.Directory:
            dirs.append(name)
        elif e.type == pafs.FileType.File:
            files.append(name)
    return sorted(files), sorted(dirs)


def format_of_name(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".npz"):
        return "npz"
    for fmt, suffixes in TABLE_SUFFIXES.items():
        if low.endswith(suffixes):
            return fmt
    return None


def infer_format(loc: Location) -> str:
    """The source format from the path: a file's suffix, or what a directory holds."""
    if not loc.exists():
        raise DatasetError(f"{loc.uri} does not exist", file=loc.uri)
    if not loc.is_dir():
        fmt = format_of_name(_basename(loc))
        if fmt is None:
            raise ConfigError(f"cannot tell the format of {loc.uri} from its name; pass --format "
                              f"({'|'.join(FORMATS)})")
        return fmt
    found: set[str] = set()
    images = False
    files, dirs = _children(loc)
    names = list(files)
    for d in dirs:  # one or two levels down: split/ and split/class/
        f2, d2 = _children(loc.join(d))
        names += f2
        for dd in d2:
            names += _children(loc.join(d, dd))[0]
    for n in names:
        if n.lower().endswith(IMAGE_SUFFIXES):
            images = True
        elif (fmt := format_of_name(n)) is not None:
            found.add(fmt)
    if found and len(found) == 1 and not images:
        return found.pop()
    if images and not found:
        return "imagefolder"
    if not found and not images:
        raise DatasetError(f"{loc.uri} holds no Parquet, CSV, JSON Lines, .npz or image files",
                           file=loc.uri)
    raise ConfigError(f"{loc.uri} holds several formats ({sorted(found | ({'images'} if images else set()))}); "
                      f"pass --format")


# --------------------------------------------------------------------------
# tables: Parquet, CSV, JSON Lines
# --------------------------------------------------------------------------
def _table_part(loc: Location, fmt: str, split: str | None) -> Part:
    try:
        reader = None
        if fmt == "csv":
            delimiter = "\t" if loc.path.lower().endswith(".tsv") else ","
            parse = pacsv.ParseOptions(delimiter=delimiter)
            schema = pads.dataset(loc.path, filesystem=loc.fs,
                                  format=pads.CsvFileFormat(parse_options=parse)).schema
            schema = pa.schema([(n, pa.string()) for n in schema.names])

            def read_csv(columns: list[str]) -> Iterator[pa.RecordBatch]:
                convert = pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in columns}, include_columns=columns,
                    strings_can_be_null=True, null_values=[""])
                compression = "gzip" if loc.path.lower().endswith(".gz") else None
                with loc.fs.open_input_stream(loc.path, compression=compression) as f:
                    yield from pacsv.open_csv(f, parse_options=parse, convert_options=convert)
            reader = read_csv
        elif fmt == "jsonl":
            compression = "gzip" if loc.path.lower().endswith(".gz") else None
            with loc.fs.open_input_stream(loc.path, compression=compression) as f:
                schema = pajson.open_json(f).schema

            def read_json(columns: list[str]) -> Iterator[pa.RecordBatch]:
                with loc.fs.open_input_stream(loc.path, compression=compression) as f:
                    for b in pajson.open_json(f):
                        yield b.select(columns)
            reader = read_json
        else:
            with loc.fs.open_input_file(loc.path) as f:
                schema = pq.ParquetFile(f).schema_arrow

            def read_parquet(columns: list[str]) -> Iterator[pa.RecordBatch]:
                with loc.fs.open_input_file(loc.path) as f:
                    # pre_buffer off: on, pyarrow reads far ahead of this one-batch reader.
                    yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(
                        batch_size=65_536, columns=columns, use_threads=False)
            reader = read_parquet
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise DatasetError(f"not a readable {fmt} file: {_short(e)}", file=loc.uri) from None
    return Part(uri=loc.uri, split=split, schema=schema, text=(fmt == "csv"),
                base=Location(loc.fs, posixpath.dirname(loc.path), loc.uri.rsplit("/", 1)[0]),
                reader=reader)


def _table_files(loc: Location, fmt: str) -> list[str]:
    files, _ = _children(loc)
    return [f for f in files if format_of_name(f) == fmt]


def _table_parts(root: Location, fmt: str) -> list[Part]:
    if not root.is_dir():
        part = _table_part(root, fmt, None)
        return [part]
    files, dirs = _children(root)
    data_files = [f for f in files if format_of_name(f) == fmt]
    split_dirs = [d for d in dirs if _table_files(root.join(d), fmt)]
    if data_files and split_dirs:
        raise DatasetError(f"{root.uri} holds {fmt} files and split sub-directories "
                           f"({', '.join(split_dirs)}); use one layout", file=root.uri)
    parts = []
    if data_files:
        parts = [_table_part(root.join(f), fmt, None) for f in data_files]
    else:
        # A Hive-style directory (split=train, as Spark writes it) names its split after "=".
        parts = [_table_part(root.join(d, f), fmt, d.split("=", 1)[-1])
                 for d in split_dirs for f in _table_files(root.join(d), fmt)]
    if not parts:
        raise DatasetError(f"{root.uri} holds no {fmt} files", file=root.uri)
    for p in parts:  # paths in an image column are relative to the source root
        p.base = root
    return parts


# --------------------------------------------------------------------------
# image folders and .npz
# --------------------------------------------------------------------------
def _image_files(loc: Location) -> list[str]:
    return [f for f in _children(loc)[0] if f.lower().endswith(IMAGE_SUFFIXES)]


def _imagefolder_parts(root: Location) -> list[Part]:
    if not root.is_dir():
        raise ConfigError(f"an image folder is a directory ROOT/[split/]class_name/*.png; "
                          f"{root.uri} is a file")
    _, dirs = _children(root)
    # ROOT/class/*.png when some child holds images itself, else ROOT/split/class/*.png.
    flat = any(_image_files(root.join(d)) for d in dirs)
    layout = [(None, "", dirs)] if flat else [(d, d, _children(root.join(d))[1]) for d in dirs]
    parts = []
    for split, prefix, classes in layout:
        paths, labels = [], []
        for c in classes:
            rel_dir = posixpath.join(prefix, c) if prefix else c
            for f in _image_files(root.join(rel_dir)):
                paths.append(posixpath.join(rel_dir, f))
                labels.append(c)
        if not paths:
            continue
        table = pa.table({IMAGE_PATH: pa.array(paths, pa.string()),
                          LABEL: pa.array(labels, pa.string())})
        uri = root.join(prefix).uri if prefix else root.uri
        parts.append(Part(uri=uri, split=split, schema=table.schema, base=root, table=table))
    if not parts:
        raise DatasetError(f"{root.uri} holds no images in the layout ROOT/[split/]class_name/"
                           f"*.png|jpg", file=root.uri)
    return parts


def _npz_part(uri: str, split: str | None, x: np.ndarray, y: np.ndarray,
              ids: np.ndarray | None, keys: tuple[str, str]) -> Part:
    if x.ndim < 2 or x.shape[0] != y.shape[0] or y.ndim != 1:
        raise DatasetError(f"{keys[0]} must be (N, ...) and {keys[1]} (N,); got {x.shape} and "
                           f"{y.shape}", file=uri, column=keys[0])
    if x.dtype.kind not in "fiub":
        raise DatasetError(f"{keys[0]} holds {x.dtype}; features must be numbers",
                           file=uri, column=keys[0])
    shape = tuple(int(s) for s in x.shape[1:])
    length = int(np.prod(shape))
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    cols = {FEATURES: pa.FixedSizeListArray.from_arrays(flat, type=features_type(length)),
            LABEL: pa.array(y if y.dtype.kind != "U" else y.tolist())}
    if ids is not None:
        cols["id"] = pa.array(ids if ids.dtype.kind != "U" else ids.tolist())
    table = pa.table(cols)
    return Part(uri=uri, split=split, schema=table.schema, table=table, feature_shape=shape)


def _npz_parts(loc: Location) -> list[Part]:
    try:
        npz = np.load(io.BytesIO(loc.read_bytes()), allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
    except StorageError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DatasetError(f"not a readable .npz file: {_short(e)}", file=loc.uri) from None
    if "x" in arrays and "y" in arrays:
        return [_npz_part(loc.uri, None, arrays["x"], arrays["y"], arrays.get("id"), ("x", "y"))]
    # x_train/y_train, x_test/y_test (e.g. Keras' mnist.npz): one split each.
    splits = sorted(k[2:] for k in arrays if k.startswith("x_") and f"y_{k[2:]}" in arrays)
    if not splits:
        raise DatasetError(f"a .npz source needs arrays 'x' and 'y' (or x_<split>/y_<split>); "
                           f"it has {sorted(arrays)}", file=loc.uri)
    return [_npz_part(loc.uri, s, arrays[f"x_{s}"], arrays[f"y_{s}"], arrays.get(f"id_{s}"),
                      (f"x_{s}", f"y_{s}")) for s in splits]


def open_parts(source: str, fmt: str | None = None) -> tuple[str, list[Part]]:
    """``(format, parts)`` of a source path or URI (format inferred when ``None``)."""
    loc = resolve(source)
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: use one of {list(FORMATS)}")
    if not loc.exists():
        raise DatasetError(f"{loc.uri} does not exist", file=loc.uri)
    fmt = fmt or infer_format(loc)
    if fmt == "imagefolder":
        return fmt, _imagefolder_parts(loc)
    if fmt == "npz":
        if loc.is_dir():
            raise ConfigError(f"a .npz source is one file; {loc.uri} is a directory")
        return fmt, _npz_parts(loc)
    return fmt, _table_parts(loc, fmt)
