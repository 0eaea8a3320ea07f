"""A gallery: embeddings as Parquet plus a faiss index, published as atomic snapshots.

Rows are ``(id, embedding, model_version, embedding_space, label, transform)``:
which model produced each vector and in which embedding space it lives, so a
gallery that is part-way through a backfill (rows from two model versions of
one space) is searched correctly, and a query model can be checked against the
registry before it searches.

Layout under the gallery URI (local path, ``s3://``, ``gs://``)::

    segments/<uuid>.parquet                 immutable row segments
    snapshots/<seq>-<uuid>/snapshot.json    what one snapshot is (segments, index, space, progress)
    snapshots/<seq>-<uuid>/index.faiss      its index (approximate kinds; an exact index is
                                            rebuilt from the vectors on load, they are the same bytes)
    commits/<parent seq>.json               the commit: "snapshot <seq> follows <parent seq>"
    HEAD.json                               a hint: the latest commit known to its writer

**Publication.** A writer writes the new segments, the index and
``snapshot.json`` first, then commits by *creating* ``commits/<parent>.json``
exclusively (``graceful_ray.storage.Staged``: a hard link locally, an ``If-None-Match: *`` PUT on
S3): the pointer is written last, and it can be written once. A reader finds
the current snapshot by starting at ``HEAD.json`` and following
``commits/<seq>.json`` until there is none, so it only ever opens snapshots
whose files were complete before their commit existed -- a search never sees
a half-built index -- and a writer that crashed after committing but before
moving ``HEAD.json`` loses nothing. Two writers that start from the same
snapshot race for the same commit name; one wins, the other gets
:class:`ConcurrentUpdateError` instead of silently dropping the winner's rows.

**Segments.** A snapshot lists its segments in order; a row's current version
is its *last* occurrence. A backfill chunk therefore writes only the rows it
re-embedded (one new segment) and reuses the rest; a snapshot with many
segments is compacted into one (``max_segments``). The merged view is sorted
by id, and that order is the faiss index's row order.

Old snapshots are deleted after ``keep`` newer ones exist (a searcher holds
its snapshot in memory, so deleting the files does not disturb it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graceful_ray.data import read_info
from graceful_ray.errors import StorageError
from graceful_ray.retrieval.embed import embed_split, embeddings_of
from graceful_ray.retrieval.errors import ConcurrentUpdateError, GalleryError
from graceful_ray.retrieval.index import (IndexConfig, IndexReport, build_index, deserialize, serialize,
                                          set_search_params)
from graceful_ray.storage import Location, Staged, resolve
from graceful_ray.data.tensors import fixed_size_list

# Lazy imports: the registry (torch) loads only when a gallery is embedded, not to read one.

log = logging.getLogger(__name__)

FORMAT = "graceful-ray-gallery"
FORMAT_VERSION = 1
HEAD_FILE = "HEAD.json"
SNAPSHOT_FILE = "snapshot.json"
INDEX_FILE = "index.faiss"
COLUMNS = ("id", "embedding", "model_version", "embedding_space", "label", "transform")
DEFAULT_KEEP = 3
DEFAULT_MAX_SEGMENTS = 16


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


# --------------------------------------------------------------------------- rows
def make_rows(ids: Any, embeddings: np.ndarray, *, model_version: str | Sequence[str],
              embedding_space: str | Sequence[str], labels: Any = None,
              transform: str | Sequence[str | None] | None = None) -> pa.Table:
    """A gallery row table, validated: unique ids, finite 2-D float embeddings."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[1] == 0:
        raise GalleryError(f"embeddings must be a 2-D (rows, dim) array, got shape {emb.shape}")
    n = emb.shape[0]
    id_arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(ids))
    if isinstance(id_arr, pa.ChunkedArray):
        id_arr = id_arr.combine_chunks()
    if not (pa.types.is_integer(id_arr.type) or pa.types.is_string(id_arr.type)
            or pa.types.is_large_string(id_arr.type)):
        raise GalleryError(f"ids must be integers or strings, got {id_arr.type}")
    if pa.types.is_integer(id_arr.type):
        id_arr = id_arr.cast(pa.int64())
    elif pa.types.is_large_string(id_arr.type):
        id_arr = id_arr.cast(pa.string())
    if len(id_arr) != n:
        raise GalleryError(f"{len(id_arr)} ids for {n} embeddings")
    if id_arr.null_count:
        raise GalleryError("ids must not be null")
    if not np.isfinite(emb).all():
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        raise GalleryError(f"{len(bad)} embedding row(s) hold NaN or inf (first ids: "
                           f"{id_arr.take(pa.array(bad[:5])).to_pylist()}); the model that produced "
                           "them diverged -- fix it before indexing")

    def column(value: Any, name: str, nullable: bool = False) -> pa.Array:
        if value is None:
            if not nullable:
                raise GalleryError(f"{name} is required")
            return pa.nulls(n, type=pa.string())
        if isinstance(value, str):
            return pa.array([value] * n, type=pa.string())
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        arr = value.cast(pa.string()) if isinstance(value, pa.Array) else pa.array(list(value), type=pa.string())
        if len(arr) != n:
            raise GalleryError(f"{name} has {len(arr)} values for {n} rows")
        return arr

    label_arr = (pa.nulls(n, type=pa.int64()) if labels is None
                 else pa.array(np.asarray(labels).astype(np.int64)))
    if len(label_arr) != n:
        raise GalleryError(f"{len(label_arr)} labels for {n} rows")
    table = pa.table({
        "id": id_arr,
        "embedding": fixed_size_list(emb.astype(np.float32, copy=False)),
        "model_version": column(model_version, "model_version"),
        "embedding_space": column(embedding_space, "embedding_space"),
        "label": label_arr,
        "transform": column(transform, "transform", nullable=True),
    })
    _check_unique(table)
    return table


def _check_unique(table: pa.Table) -> None:
    ids = table.column("id").to_numpy(zero_copy_only=False)
    uniq = np.unique(ids)
    if len(uniq) != len(ids):
        vals, counts = np.unique(ids, return_counts=True)
        raise GalleryError(f"duplicate ids in one segment: {vals[counts > 1][:5].tolist()}")


def merge_rows(tables: Sequence[pa.Table]) -> pa.Table:
    """The merged view of ordered segments: each id's last occurrence, sorted by id."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise GalleryError("a gallery snapshot needs at least one row")
    t = (tables[0] if len(tables) == 1 else pa.concat_tables(tables)).combine_chunks()
    ids = t.column("id").to_numpy(zero_copy_only=False)
    if len(tables) == 1:
        if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
            return t
        return t.take(pa.array(np.argsort(ids, kind="stable")))
    # np.unique on the reversed ids gives, per id, its first position in the reversed
    # array = its last occurrence in segment order; the result is sorted by id.
    _, first_rev = np.unique(ids[::-1], return_index=True)
    return t.take(pa.array(len(ids) - 1 - first_rev))


def _conform(t: pa.Table) -> pa.Table:
    return t.select(list(COLUMNS))


def embeddings_array(table: pa.Table) -> np.ndarray:
    return embeddings_of(table)


# ------------------------------------------------------------------ snapshots
@dataclass
class Snapshot:
    """What ``snapshot.json`` records: one published state of a gallery."""

    seq: int
    parent_seq: int | None
    path: str  # relative to the gallery root
    created_at: str
    embedding_space: str
    dim: int
    rows: int
    id_type: str
    segments: list[dict[str, Any]]  # {"path", "rows", "sha256"}
    index: dict[str, Any]  # {"path" | None, "sha256" | None, "report": IndexReport dict, "config": ...}
    models: dict[str, int] = field(default_factory=dict)  # model_version -> rows
    transforms: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] | None = None  # {"data", "split", "dataset_checksum"}
    backfills: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> progress
    pending: dict[str, Any] | None = None  # a staged backfill's segments, not yet visible
    note: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def index_report(self) -> IndexReport:
        return IndexReport.from_dict(self.index["report"])

    @property
    def content_key(self) -> tuple:
        """What a searcher serves: two snapshots with the same key answer identically."""
        return (tuple(s["path"] for s in self.segments), self.index.get("path"),
                json.dumps(self.index.get("report", {}).get("params", {}), sort_keys=True))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, data: bytes | str, source: str = "snapshot.json") -> "Snapshot":
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            if int(d.get("format_version", 0)) > FORMAT_VERSION:
                raise GalleryError(f"{source} was written by a newer graceful-ray (format "
                                   f"{d['format_version']}); upgrade graceful-ray to read it")
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise GalleryError(f"{source} is damaged ({e}); the gallery cannot be read") from None

    def summary(self) -> str:
        models = ", ".join(f"{m}: {n}" for m, n in sorted(self.models.items()))
        lines = [f"snapshot {self.seq} ({self.created_at}): {self.rows} rows x {self.dim} in space "
                 f"{self.embedding_space!r}", f"  models: {models}",
                 f"  index: {self.index_report.summary()}",
                 f"  segments: {len(self.segments)}"]
        if self.transforms:
            lines.append("  transforms: " + ", ".join(f"{k} ({v['old']} -> {v['new']})"
                                                      for k, v in self.transforms.items()))
        for run, p in sorted(self.backfills.items()):
            state = "done" if p.get("done") else "in progress"
            lines.append(f"  backfill {run!r} ({p.get('mode')}, {p.get('order')} order, model "
                         f"{p.get('model')}): {p.get('chunks_done')}/{p.get('chunks')} chunks, "
                         f"{p.get('rows_done')}/{p.get('rows_total')} rows, {state}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_optional(loc: Location) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        if not loc.exists():
            return None
        raise StorageError(f"cannot read {loc.uri}: {e}") from e


def _read_optional_buffer(loc: Location) -> pa.Buffer | None:
    """Like :func:`_read_optional`, in Arrow-owned memory for Parquet (see
    ``Location.read_buffer``: Python bytes under Arrow can abort the exit)."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return f.read_buffer()
    except FileNotFoundError:
        return None
    except OSError as e:
        if not loc.exists():
            return None
        raise StorageError(f"cannot read {loc.uri}: {e}") from e


class Gallery:
    """One gallery on storage: read snapshots, write segments, publish atomically."""

    def __init__(self, uri: str | os.PathLike | Location) -> None:
        self.loc = uri if isinstance(uri, Location) else resolve(uri)
        self._snapshots: dict[str, Snapshot] = {}  # immutable once committed

    def __repr__(self) -> str:
        return f"Gallery({self.uri!r})"

    @property
    def uri(self) -> str:
        return self.loc.uri

    # ------------------------------------------------------------- reading
    def head_commit(self) -> dict[str, Any] | None:
        """The latest commit record (``{"seq", "snapshot", "sha256"}``), or None for no gallery."""
        commit = None
        hint = _read_optional(self.loc.join(HEAD_FILE))
        if hint:
            try:
                commit = json.loads(hint)
            except ValueError:
                commit = None  # a damaged hint: fall back to walking from the start
        seq = int(commit["seq"]) if commit else 0
        for _ in range(1_000_000):
            data = _read_optional(self._commit_loc(seq))
            if data is None:
                return commit
            try:
                commit = json.loads(data)
            except ValueError as e:
                raise GalleryError(f"commit record {self._commit_loc(seq).uri} is damaged ({e})") from None
            seq = int(commit["seq"])
        raise GalleryError(f"commit chain of {self.uri} does not end")  # pragma: no cover

    def head(self) -> Snapshot | None:
        """The current snapshot, or None when nothing was ever published here."""
        commit = self.head_commit()
        return None if commit is None else self._load_snapshot(commit)

    def require_head(self) -> Snapshot:
        snap = self.head()
        if snap is None:
            raise GalleryError(f"no gallery at {self.uri}: nothing was published there; build one "
                               "with `graceful-ray gallery build --gallery URI --data DATA --split "
                               "SPLIT --model NAME@VERSION`")
        return snap

    def _commit_loc(self, parent_seq: int) -> Location:
        return self.loc.join("commits", f"{parent_seq:010d}.json")

    def _load_snapshot(self, commit: dict[str, Any]) -> Snapshot:
        rel = commit["snapshot"]
        cached = self._snapshots.get(rel)
        if cached is not None:
            return cached
        loc = self.loc.join(rel, SNAPSHOT_FILE)
        data = _read_optional(loc)
        if data is None:
            raise GalleryError(f"snapshot {commit['seq']} of {self.uri} is gone ({loc.uri}): it was "
                               "retired by a newer publish; read the head again")
        if commit.get("sha256") and _sha256(data) != commit["sha256"]:
            raise GalleryError(f"{loc.uri} does not match its commit's sha256: the file was changed "
                               "after publishing")
        snap = Snapshot.from_json(data, source=loc.uri)
        self._snapshots[rel] = snap
        return snap

    def read_segment(self, seg: dict[str, Any], columns: Sequence[str] | None = None,
                     verify: bool = True) -> pa.Table:
        loc = self.loc.join(seg["path"])
        data = _read_optional_buffer(loc)
        if data is None:
            raise GalleryError(f"segment {loc.uri} is missing: the gallery is damaged or the snapshot "
                               "was retired while being read; read the head again")
        if verify and seg.get("sha256") and _sha256(data) != seg["sha256"]:
            raise GalleryError(f"segment {loc.uri} does not match its recorded sha256")
        return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)

    def read_rows(self, snap: Snapshot, columns: Sequence[str] | None = None,
                  segments: Sequence[dict[str, Any]] | None = None) -> pa.Table:
        """The merged rows of a snapshot (or of the given ``segments``), sorted by id."""
        cols = None if columns is None else list(dict.fromkeys(["id", *columns]))
        segs = snap.segments if segments is None else segments
        tables = [self.read_segment(s, cols) for s in segs]
        if cols is not None:
            tables = [t.select(cols) for t in tables]
        return merge_rows(tables)

    def read_index(self, snap: Snapshot, embeddings: np.ndarray | None = None):
        """The snapshot's faiss index, with its tuned search parameters applied."""

        info = snap.index
        report = snap.index_report
        if info.get("path") is None:
            if embeddings is None:
                embeddings = embeddings_array(self.read_rows(snap, ["embedding"]))
            index, _ = build_index(embeddings, IndexConfig(kind="flat"))
        else:
            loc = self.loc.join(info["path"])
            data = _read_optional(loc)
            if data is None:
                raise GalleryError(f"index {loc.uri} is missing; read the head again")
            if info.get("sha256") and _sha256(data) != info["sha256"]:
                raise GalleryError(f"index {loc.uri} does not match its recorded sha256")
            index = deserialize(data)
        if index.ntotal != snap.rows:
            raise GalleryError(f"index of snapshot {snap.seq} holds {index.ntotal} vectors for "
                               f"{snap.rows} rows: the gallery is damaged")
        set_search_params(index, report.params)
        return index

    def history(self) -> list[dict[str, Any]]:
        """Every commit record, oldest first."""
        out, seq = [], 0
        while (data := _read_optional(self._commit_loc(seq))) is not None:
            out.append(json.loads(data))
            seq = out[-1]["seq"]
        return out

    # ------------------------------------------------------------- writing
    def write_segment(self, table: pa.Table) -> dict[str, Any]:
        """Store one immutable segment; returns its record for :meth:`publish`."""
        table = _conform(table)
        _check_unique(table)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        rel = f"segments/{uuid.uuid4().hex}.parquet"
        self.loc.join(rel).write_bytes(data)
        return {"path": rel, "rows": table.num_rows, "sha256": _sha256(data)}

    def discard_segments(self, segments: Iterable[dict[str, Any]]) -> None:
        """Delete segments this writer wrote but could not commit (best effort)."""
        for seg in segments:
            try:
                self.loc.join(seg["path"]).delete_file()
            except StorageError as e:  # pragma: no cover - best effort
                log.warning("could not delete %s: %s", seg["path"], e)

    def publish(self, rows: pa.Table, *, parent: Snapshot | None, segments: list[dict[str, Any]],
                index_config: IndexConfig | None = None, index_like: Any = None,
                queries: np.ndarray | None = None, reuse_index: bool = False,
                source: dict[str, Any] | None = None, backfills: dict[str, Any] | None = None,
                pending: dict[str, Any] | None = None, transforms: dict[str, Any] | None = None,
                note: str = "", keep: int = DEFAULT_KEEP, index: Any = None,
                report: IndexReport | None = None) -> tuple[Snapshot, Any]:
        """Commit a snapshot of ``rows`` (the merged view of ``segments``) on top of ``parent``.

        Returns ``(snapshot, faiss index)``. ``parent=None`` creates the gallery
        (fails if one exists). ``reuse_index`` keeps the parent's index (rows
        unchanged, e.g. a staged backfill chunk). Raises
        :class:`ConcurrentUpdateError` when another writer committed on top of
        ``parent`` first; the index and ``snapshot.json`` this call wrote are
        removed then, the caller's new segments are the caller's to remove.
        """
        spaces = rows.column("embedding_space").unique().to_pylist()
        if len(spaces) != 1:
            raise GalleryError(f"a gallery snapshot must live in one embedding space, these rows "
                               f"come from {sorted(map(str, spaces))}; transform or backfill the "
                               "rest first")
        emb = embeddings_array(rows)
        if reuse_index:
            if parent is None:
                raise GalleryError("reuse_index needs a parent snapshot")
            index_info = dict(parent.index)
            if index is None:
                index = self.read_index(parent)
        else:
            if index is None:
                index, report = build_index(emb, index_config or IndexConfig(), like=index_like,
                                            queries=queries)
            index_info = {"path": None, "sha256": None, "report": report.to_dict(),
                          "config": (index_config or IndexConfig()).to_dict()}
        seq = 1 if parent is None else parent.seq + 1
        snap_dir = f"snapshots/{seq:010d}-{uuid.uuid4().hex[:12]}"
        # Staged: the snapshot's files under its own prefix, then the commit
        # record only if no other writer committed on top of the same parent
        with Staged(self.loc.join(snap_dir)) as staged:
            if not reuse_index and index_info["report"]["kind"] != "flat":
                data = serialize(index)
                staged.write(INDEX_FILE, data)
                index_info.update(path=f"{snap_dir}/{INDEX_FILE}", sha256=_sha256(data))
            id_type = "int64" if pa.types.is_integer(rows.column("id").type) else "string"
            mv = rows.column("model_version").value_counts().to_pylist()
            snap = Snapshot(
                seq=seq, parent_seq=None if parent is None else parent.seq, path=snap_dir,
                created_at=utc_now(), embedding_space=str(spaces[0]), dim=int(emb.shape[1]),
                rows=rows.num_rows, id_type=id_type, segments=list(segments), index=index_info,
                models={str(d["values"]): int(d["counts"]) for d in mv},
                transforms=dict(transforms if transforms is not None else (parent.transforms if parent else {})),
                source=source if source is not None else (parent.source if parent else None),
                backfills=dict(backfills if backfills is not None else (parent.backfills if parent else {})),
                pending=pending, note=note)
            body = snap.to_json().encode()
            staged.write(SNAPSHOT_FILE, body)
            commit = {"seq": seq, "snapshot": snap_dir, "sha256": _sha256(body),
                      "parent": None if parent is None else parent.seq, "committed_at": utc_now()}
            if not staged.commit(self._commit_loc(0 if parent is None else parent.seq),
                                 json.dumps(commit).encode()):
                theirs = self.head_commit()
                raise ConcurrentUpdateError(
                    f"gallery {self.uri} moved on while this writer worked: snapshot "
                    f"{(theirs or {}).get('seq')} was committed on top of "
                    f"{0 if parent is None else parent.seq}, the snapshot this writer started "
                    "from. Read the head again and redo the change (a backfill resumes by "
                    "running it again with the same run name)" if parent is not None else
                    f"a gallery already exists at {self.uri}; use another location or publish "
                    "on top of its head")
        self._snapshots[snap_dir] = snap
        try:
            self.loc.join(HEAD_FILE).write_bytes(json.dumps(commit).encode())
        except StorageError as e:  # the commit stands; readers follow the chain past the hint
            log.warning("published snapshot %d but could not move %s: %s", seq, HEAD_FILE, e)
        log.info("gallery %s: published snapshot %d (%d rows, space %s)", self.uri, seq, snap.rows,
                 snap.embedding_space)
        if keep:
            self.retire(keep)
        return snap, index

    def retire(self, keep: int = DEFAULT_KEEP) -> list[int]:
        """Delete snapshots older than the newest ``keep`` and the segments only they used.

        Best effort: a failure leaves garbage, never damage. Segments written
        by an uncommitted writer are not touched (they are referenced by no
        retired snapshot).
        """
        history = self.history()
        if len(history) <= keep:
            return []
        kept = [self._safe_snapshot(c) for c in history[-keep:]]
        used = set()
        for s in kept:
            if s is None:
                return []
            used |= {x["path"] for x in s.segments}
            used |= {x["path"] for x in (s.pending or {}).get("segments", [])}
            if s.index.get("path"):
                used.add(s.index["path"])
        retired = []
        for c in history[:-keep]:
            snap_dir = self.loc.join(c["snapshot"])
            if not snap_dir.exists():
                continue
            old = self._safe_snapshot(c)
            if old is not None:
                for s in old.segments + list((old.pending or {}).get("segments", [])):
                    if s["path"] not in used:
                        self.loc.join(s["path"]).delete_file()
            try:
                for info in snap_dir.list():
                    if old is not None and old.index.get("path") in used and \
                            info.path.endswith(INDEX_FILE):
                        continue
                    snap_dir.fs.delete_file(info.path)
                if not any(True for _ in snap_dir.list()):
                    snap_dir.delete_dir()
            except (OSError, StorageError) as e:  # pragma: no cover - best effort
                log.warning("could not retire %s: %s", snap_dir.uri, e)
            retired.append(int(c["seq"]))
        return retired

    def _safe_snapshot(self, commit: dict[str, Any]) -> Snapshot | None:
        try:
            return self._load_snapshot(commit)
        except GalleryError:
            return None


# ----------------------------------------------------------------- building
def build_gallery(gallery: str, data: str, split: str, *, registry: str, model: str,
                  index: IndexConfig | None = None, batch_size: int = 1024,
                  num_cpus: float = 0.5, concurrency: int | tuple[int, int] = 1,
                  replace: bool = False, engine: str = "ray") -> Snapshot:
    """Embed ``split`` of ``data`` with ``model`` (Ray Data batch inference) and publish it.

    The first snapshot of a new gallery, or (``replace=True``) a new snapshot
    replacing every row of an existing one.
    """
    from graceful_ray.registry import Registry

    manifest = Registry(registry).get(model)
    g = Gallery(gallery)
    parent = g.head()
    if parent is not None and not replace:
        raise GalleryError(f"a gallery already exists at {g.uri} (snapshot {parent.seq}, "
                           f"{parent.rows} rows, space {parent.embedding_space!r}); pass "
                           "replace=True (--replace) to rebuild it, or `gallery backfill` to move it "
                           "to a new model")
    info = read_info(data)
    table = embed_split(data, split, registry_root=registry, model_ref=manifest.ref,
                        batch_size=batch_size, num_cpus=num_cpus, concurrency=concurrency,
                        engine=engine)
    expected = info.split(split).rows
    if table.num_rows != expected:
        raise GalleryError(f"embedding {split} produced {table.num_rows} rows, the split has {expected}")
    rows = make_rows(table.column("id"), embeddings_array(table), model_version=manifest.ref,
                     embedding_space=manifest.embedding_space,
                     labels=table.column("label").to_numpy() if "label" in table.column_names else None)
    rows = merge_rows([rows])
    seg = g.write_segment(rows)
    try:
        snap, _ = g.publish(rows, parent=parent, segments=[seg], index_config=index,
                            source={"data": resolve(data).uri, "split": split,
                                    "dataset_checksum": info.checksum},
                            backfills={} if replace else None, transforms={} if replace else None,
                            note=f"built from {split} with {manifest.ref}")
    except BaseException:
        g.discard_segments([seg])
        raise
    return snap


def publish_embeddings(gallery: str, ids: Any, embeddings: np.ndarray, *, model_version: str,
                       embedding_space: str, labels: Any = None, index: IndexConfig | None = None,
                       source: dict[str, Any] | None = None, replace: bool = False,
                       note: str = "") -> Snapshot:
    """Publish precomputed embeddings as a gallery snapshot (no Ray, no model run).

    For embeddings produced elsewhere (and for synthetic galleries at scale).
    ``model_version`` / ``embedding_space`` must name the registered model
    that produced them for the space check to mean anything.
    """
    g = Gallery(gallery)
    parent = g.head()
    if parent is not None and not replace:
        raise GalleryError(f"a gallery already exists at {g.uri}; pass replace=True to rebuild it")
    rows = merge_rows([make_rows(ids, embeddings, model_version=model_version,
                                 embedding_space=embedding_space, labels=labels)])
    seg = g.write_segment(rows)
    try:
        snap, _ = g.publish(rows, parent=parent, segments=[seg], index_config=index, source=source,
                            backfills={} if replace else None, transforms={} if replace else None,
                            note=note)
    except BaseException:
        g.discard_segments([seg])
        raise
    return snap


def update_rows(base: pa.Table, update: pa.Table) -> pa.Table:
    """``base`` (merged, id-sorted) with the rows of ``update`` replacing theirs (same ids)."""
    return merge_rows([_conform(base), _conform(update)])


def compact(g: Gallery, rows: pa.Table) -> list[dict[str, Any]]:
    """Rewrite the merged rows as one segment (fewer files, no superseded rows)."""
    return [g.write_segment(rows)]
