"""Searching a gallery from a long-lived process (a Ray Serve replica, a notebook).

:class:`GallerySearcher` holds one loaded snapshot (index + ids + which model
produced each row) as an immutable state object. ``search`` reads the current
state once and works on it, so a concurrent reload -- which builds the next
state completely, then swaps one reference -- can never hand a search a
half-loaded index or mix two snapshots in one answer.

Reloading follows the gallery's commit pointer: every ``poll_s`` seconds a
background thread (or, with ``reload="inline"``, the next search) reads
``HEAD.json`` and the commit after it (two small reads), and loads a new
snapshot only when the pointer moved and its content changed. A snapshot whose
embedding space no longer admits the query model (a transformation or a staged
backfill moved the gallery to a new space) is *not* swapped in: the searcher
keeps answering from the last snapshot it may search, says so in
:attr:`GallerySearcher.status` and the log, and switches when the query model
is changed with :meth:`GallerySearcher.set_query_model` (the cutover).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from graceful_ray.retrieval.embedding_space import check_snapshot
from graceful_ray.retrieval.errors import EmbeddingSpaceError, GalleryError, QueryError
from graceful_ray.retrieval.gallery import Gallery, Snapshot, embeddings_array
from graceful_ray.retrieval.index import l2_normalize

# Lazy imports: faiss and torch load only when a searcher searches, not for its configuration.

log = logging.getLogger(__name__)

#: Most results one query may ask for.
MAX_K = 10_000


@dataclass(frozen=True)
class LoadedSnapshot:
    """Everything a search needs, immutable once built."""

    snapshot: Snapshot
    index: Any
    ids: np.ndarray
    version_codes: np.ndarray  # int32 per row -> versions[code]
    versions: tuple[str, ...]
    labels: np.ndarray | None
    loaded_at: float

    @property
    def seq(self) -> int:
        return self.snapshot.seq


@dataclass
class SearchResult:
    """Top-k per query. Missing slots (k larger than the gallery) are never returned:
    ``k`` is clamped to the gallery size."""

    ids: np.ndarray  # (n, k), the gallery's id type
    scores: np.ndarray  # (n, k) float32 cosine similarity, descending
    model_versions: np.ndarray  # (n, k) str: which model embedded each hit
    labels: np.ndarray | None  # (n, k) int64 when the gallery has labels (-1: a row without one)
    snapshot: int  # the snapshot sequence number every hit came from
    embedding_space: str
    k: int
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "embedding_space": self.embedding_space, "k": self.k,
                "ids": self.ids.tolist(), "scores": self.scores.astype(float).round(6).tolist(),
                "model_versions": self.model_versions.tolist(),
                "labels": None if self.labels is None else self.labels.tolist()}


#: Loaded snapshots shared by every searcher of this process (a primary and a shadow
#: searcher on one gallery hold one copy); entries go when no searcher holds them.
_LOADED: "weakref.WeakValueDictionary[tuple[str, str], LoadedSnapshot]" = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def load_snapshot(gallery: Gallery, snap: Snapshot) -> LoadedSnapshot:
    """Read a snapshot's rows and index into memory (or share the copy already loaded)."""
    key = (gallery.uri, snap.path)
    with _LOADED_LOCK:
        hit = _LOADED.get(key)
    if hit is not None:
        return hit
    state = _load_snapshot(gallery, snap)
    with _LOADED_LOCK:
        return _LOADED.setdefault(key, state)


def _load_snapshot(gallery: Gallery, snap: Snapshot) -> LoadedSnapshot:
    flat = snap.index.get("path") is None
    cols = ["model_version", "label"] + (["embedding"] if flat else [])
    rows = gallery.read_rows(snap, cols)
    index = gallery.read_index(snap, embeddings_array(rows) if flat else None)
    if rows.num_rows != snap.rows:
        raise GalleryError(f"snapshot {snap.seq} lists {snap.rows} rows but its segments hold "
                           f"{rows.num_rows}: the gallery is damaged")
    mv = rows.column("model_version").combine_chunks().dictionary_encode()
    labels = rows.column("label")
    return LoadedSnapshot(
        snapshot=snap, index=index,
        ids=rows.column("id").to_numpy(zero_copy_only=False),
        version_codes=mv.indices.to_numpy(zero_copy_only=False).astype(np.int32),
        versions=tuple(mv.dictionary.to_pylist()),
        labels=None if labels.null_count == rows.num_rows else  # a row without a label: -1
        labels.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
        loaded_at=time.time())


def validate_queries(q: Any, dim: int, space: str) -> np.ndarray:
    """(n, dim) finite float32 or a :class:`QueryError` saying what is wrong."""
    try:
        a = np.asarray(q)
    except ValueError as e:  # numpy refuses rows of different lengths
        raise QueryError(f"query embeddings are ragged (rows of different lengths); every query must "
                         f"be a vector of {dim} numbers ({e})") from None
    except Exception as e:  # noqa: BLE001
        raise QueryError(f"query embeddings are not an array: {e}") from None
    if a.dtype == object:
        raise QueryError("query embeddings are ragged (rows of different lengths); every query "
                         f"must be a vector of {dim} numbers")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise QueryError(f"query embeddings must be (n, {dim}), got shape {a.shape}")
    if a.shape[0] == 0:
        raise QueryError("no query embeddings given (0 rows)")
    if a.shape[1] != dim:
        raise QueryError(f"query embeddings have dimension {a.shape[1]}, the gallery's space "
                         f"{space!r} has dimension {dim}: embed the queries with a model of this "
                         "space")
    if a.dtype.kind not in "fiu":
        raise QueryError(f"query embeddings must be numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise QueryError(f"{len(bad)} query embedding row(s) hold NaN or inf (rows "
                         f"{bad[:5].tolist()}); the query model produced invalid output for them")
    zero = ~np.any(a != 0, axis=1)
    if zero.any():
        raise QueryError(f"query embedding row(s) {np.flatnonzero(zero)[:5].tolist()} are all zeros: "
                         "a zero vector has no direction to search")
    return a


def search_loaded(state: LoadedSnapshot, queries: Any, k: int) -> SearchResult:
    """Search one loaded snapshot (no locking: the state is immutable)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"k must be a positive integer, got {k!r}")
    if k > MAX_K:
        raise QueryError(f"k={k} is larger than the maximum {MAX_K}")
    snap = state.snapshot
    q = l2_normalize(validate_queries(queries, snap.dim, snap.embedding_space))
    t0 = time.perf_counter()
    kk = int(min(k, snap.rows))
    scores, pos = state.index.search(q, kk)
    if (pos < 0).any():
        # An approximate index may find fewer than k (too few cells probed): fill from exact
        # search rather than return holes.
        pos, scores = _fill_missing(state, q, pos, scores, kk)
    ids = state.ids[pos]
    versions = np.asarray(state.versions, dtype=object)[state.version_codes[pos]]
    labels = None if state.labels is None else state.labels[pos]
    return SearchResult(ids=ids, scores=scores, model_versions=versions, labels=labels,
                        snapshot=snap.seq, embedding_space=snap.embedding_space, k=kk,
                        latency_s=time.perf_counter() - t0)


def _fill_missing(state: LoadedSnapshot, q: np.ndarray, pos: np.ndarray, scores: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    rows = np.flatnonzero((pos < 0).any(axis=1))
    index = state.index
    if isinstance(index, faiss.IndexIVF):
        # Per-call parameters: never mutate the shared index (other threads search it).
        s2, p2 = index.search(q[rows], k, params=faiss.SearchParametersIVF(nprobe=index.nlist))
    else:
        s2, p2 = index.search(q[rows], k)
    pos, scores = pos.copy(), scores.copy()
    pos[rows], scores[rows] = p2, s2
    return pos, scores


class GallerySearcher:
    """Search the current snapshot of a gallery; reload when the pointer moves.

    ``query_model`` (``name@vN``) with ``registry``: checked against the
    gallery's embedding space before the first search (and before switching to
    a new snapshot), and used by :meth:`embed_and_search`. Without it the caller
    vouches for the query embeddings' space.

    ``reload``: ``"background"`` (a daemon thread polls every ``poll_s``),
    ``"inline"`` (the search that finds ``poll_s`` elapsed checks, and loads a
    new snapshot before answering), or ``"off"`` (only :meth:`refresh`).
    """

    def __init__(self, gallery: str | Gallery, *, registry: str | None = None,
                 query_model: str | None = None, reload: str = "background",
                 poll_s: float = 2.0) -> None:
        if reload not in ("background", "inline", "off"):
            raise ValueError(f"reload must be 'background', 'inline' or 'off', not {reload!r}")
        self.gallery = gallery if isinstance(gallery, Gallery) else Gallery(gallery)
        self.registry = registry
        self.poll_s = float(poll_s)
        self.reload_mode = reload
        self._lock = threading.Lock()  # serialises reloads, never searches
        self._state: LoadedSnapshot | None = None
        self._query_model: str | None = None
        self._model = None
        self._last_check = 0.0
        self._head_key: tuple | None = None
        self.status: str = "loading"
        self.reloads = 0
        self.errors: list[str] = []
        snap = self.gallery.require_head()
        if query_model is not None:
            self._check(query_model, snap)
            self._query_model = query_model
        self._state = load_snapshot(self.gallery, snap)
        self._head_key = (snap.seq, snap.path)
        self.status = "ok"
        self._stop = threading.Event()
        self._thread = None
        if reload == "background":
            self._thread = threading.Thread(target=self._poll_loop, name="gallery-reload", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ properties
    @property
    def snapshot(self) -> Snapshot:
        return self._current().snapshot

    @property
    def query_model(self) -> str | None:
        return self._query_model

    def _current(self) -> LoadedSnapshot:
        state = self._state
        if state is None:  # pragma: no cover - only after close()
            raise GalleryError("the searcher is closed")
        return state

    def info(self) -> dict[str, Any]:
        s = self._current().snapshot
        return {"gallery": self.gallery.uri, "snapshot": s.seq, "rows": s.rows, "dim": s.dim,
                "embedding_space": s.embedding_space, "models": s.models,
                "index": s.index_report.summary(), "query_model": self._query_model,
                "status": self.status, "reloads": self.reloads}

    # ---------------------------------------------------------------- search
    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """Top-``k`` gallery items per query embedding (cosine, descending)."""
        if self.reload_mode == "inline" and time.monotonic() - self._last_check >= self.poll_s:
            self.refresh()
        return search_loaded(self._current(), queries, k)

    def embed(self, x: Any) -> np.ndarray:
        """Embed raw inputs with the query model (loaded from the registry once)."""
        import torch

        if self._query_model is None or self.registry is None:
            raise GalleryError("embedding inputs needs query_model and registry")
        model = self._model
        if model is None or model[0] != self._query_model:
            from graceful_ray.registry import load_model

            _, net = load_model(self.registry, self._query_model)
            model = self._model = (self._query_model, net)
        with torch.no_grad():
            return model[1].embed(torch.as_tensor(np.asarray(x, dtype=np.float32))).numpy()

    def embed_and_search(self, x: Any, k: int = 10) -> SearchResult:
        return self.search(self.embed(x), k)

    # ---------------------------------------------------------------- reload
    def set_query_model(self, ref: str) -> None:
        """Switch the query model (a cutover). Checked against the newest snapshot;
        when the gallery moved to the model's space, that snapshot is loaded first."""
        with self._lock:
            head = self.gallery.require_head()
            self._check(ref, head)
            if self._state is None or head.path != self._state.snapshot.path:
                new = load_snapshot(self.gallery, head)
                self._state = new
                self._head_key = (head.seq, head.path)
                self.reloads += 1
            self._query_model = ref
            self._model = None
            self.status = "ok"

    def refresh(self) -> bool:
        """Load the newest snapshot if the pointer moved; True when the state changed."""
        self._last_check = time.monotonic()
        with self._lock:
            try:
                commit = self.gallery.head_commit()
                if commit is None:
                    return False
                key = (int(commit["seq"]), commit["snapshot"])
                if key == self._head_key:
                    return False
                snap = self.gallery._load_snapshot(commit)
                current = self._current()
                if self._query_model is not None:
                    try:
                        self._check(self._query_model, snap)
                    except EmbeddingSpaceError as e:
                        self.status = (f"stale: snapshot {snap.seq} is in space {snap.embedding_space!r}, "
                                       f"which {self._query_model} may not search; serving snapshot "
                                       f"{current.seq} until the query model is switched")
                        if self._head_key is None or self._head_key[0] != key[0]:
                            log.warning("%s (%s)", self.status, e)
                        self._head_key = key
                        return False
                if snap.content_key == current.snapshot.content_key:
                    # Same rows and index (e.g. progress of a staged backfill): keep the loaded
                    # state, just remember the newer metadata.
                    self._state = LoadedSnapshot(snap, current.index, current.ids, current.version_codes,
                                                 current.versions, current.labels, current.loaded_at)
                else:
                    self._state = load_snapshot(self.gallery, snap)
                    self.reloads += 1
                self._head_key = key
                self.status = "ok"
                return True
            except Exception as e:  # noqa: BLE001 - keep serving the loaded snapshot
                msg = f"reload of {self.gallery.uri} failed, serving snapshot {self._current().seq}: {e}"
                self.errors.append(msg)
                del self.errors[:-20]
                log.warning(msg)
                return False

    def _check(self, ref: str, snap: Snapshot) -> None:
        if self.registry is None:
            raise GalleryError("checking a query model needs the registry (registry=...)")

        check_snapshot(self.registry, ref, snap, self.gallery.uri)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "GallerySearcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def topk_overlap(a: SearchResult | np.ndarray, b: SearchResult | np.ndarray) -> np.ndarray:
    """Per query, the share of ``a``'s top-k ids that are also in ``b``'s top-k (``|A & B| / k``).

    What the shadow comparator reports for search: 1.0 when primary and shadow
    return the same items (in any order). ``k`` is the smaller of the two.
    """
    ia = a.ids if isinstance(a, SearchResult) else np.asarray(a)
    ib = b.ids if isinstance(b, SearchResult) else np.asarray(b)
    if ia.shape[0] != ib.shape[0]:
        raise QueryError(f"overlap needs the same queries: {ia.shape[0]} vs {ib.shape[0]} rows")
    k = min(ia.shape[1], ib.shape[1])
    if k == 0:
        return np.zeros(ia.shape[0])
    return np.array([len(set(ra[:k].tolist()) & set(rb[:k].tolist())) / k for ra, rb in zip(ia, ib)])


def retrieval_hits(result: SearchResult, labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per query, whether any of the first ``k`` hits carries the query's (feedback) label."""
    if result.labels is None:
        raise GalleryError("the gallery has no labels, so hits cannot be scored")
    k = result.k if k is None else min(k, result.k)
    return (result.labels[:, :k] == np.asarray(labels)[:, None]).any(axis=1)
