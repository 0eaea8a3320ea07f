"""The faiss index of a gallery: which kind for which size, and how good it is.

Every vector is L2-normalised before it goes in, so inner product is cosine
similarity, the score the retrieval metrics (DESIGN "Metrics") rank by.

Index choice by size (:class:`IndexConfig`, ``kind="auto"``):

- up to ``exact_max_rows`` (default 200,000) rows: ``IndexFlatIP``, exact;
  nothing to tune, and on 64-d vectors it answers a batch of queries in
  milliseconds at that size;
- above: ``IndexIVFFlat`` (inner product), ``nlist ~ 4 sqrt(n)`` cells trained
  on a sample. IVF is chosen over HNSW for ``auto`` because it builds in
  seconds rather than minutes on CPU and a backfill chunk re-fills it without
  re-training; HNSW (``kind="hnsw"``) answers faster at the same recall when
  build time does not matter.

An approximate index is tuned at build time: ``nprobe`` (IVF) or ``efSearch``
(HNSW) grows until recall@k against exact search reaches ``target_recall`` on a
sample of queries, and the measured recall is recorded with the snapshot
(:class:`IndexReport`) so whoever reads the gallery knows what it trades.
Queries for that measurement are gallery vectors with their own item removed
from both rankings (a vector always finds itself in its own IVF cell, which
would inflate recall), or real queries when the caller has them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graceful_ray.errors import ConfigError

# Lazy imports: faiss loads only when an index is built, searched or read, not for the configuration.

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class IndexConfig:
    """How to index a gallery (see the module docstring for the ``auto`` rule)."""

    kind: str = "auto"
    exact_max_rows: int = 200_000
    nlist: int | None = None  # IVF cells; default clip(4 sqrt(n), 16, n / 39)
    nprobe: int | None = None  # IVF cells searched; default: tuned to target_recall
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None  # HNSW; default: tuned to target_recall
    target_recall: float = 0.95
    recall_k: int = 10
    recall_queries: int = 500
    train_sample: int = 100_000  # IVF k-means training rows (at least 40 per cell, faiss's advice)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown index kind {self.kind!r}: use one of {list(KINDS)}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"target_recall must be in (0, 1], got {self.target_recall}")
        for name in ("exact_max_rows", "hnsw_m", "ef_construction", "recall_k", "recall_queries",
                     "train_sample"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "nprobe", "ef_search"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")

    def resolve_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if n <= self.exact_max_rows else "ivf"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "IndexConfig":
        return cls(**(d or {}))


@dataclass
class IndexReport:
    """What was built and how close to exact it searches."""

    kind: str
    rows: int
    dim: int
    params: dict[str, Any] = field(default_factory=dict)  # nlist/nprobe/M/efSearch
    recall_at_k: float = 1.0  # 1.0 by construction for flat
    k: int = 10
    recall_queries: int = 0
    target_recall: float | None = None
    tuning: list[dict[str, float]] = field(default_factory=list)  # param -> recall tried
    build_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexReport":
        return cls(**d)

    def summary(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        txt = f"{self.kind}({p})" if p else self.kind
        if self.kind == "flat":
            return f"{txt}: exact, {self.rows} rows x {self.dim}"
        return (f"{txt}: recall@{self.k} {self.recall_at_k:.4f} vs exact on {self.recall_queries} "
                f"queries (target {self.target_recall}), {self.rows} rows x {self.dim}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (float32, contiguous); a zero row stays zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


def default_nlist(n: int) -> int:
    """``4 sqrt(n)`` cells, at least 1, with >= 39 training points per cell (faiss's minimum)."""
    return int(max(1, min(max(16, round(4 * math.sqrt(n))), n // 39)))


def build_index(vectors: np.ndarray, cfg: IndexConfig | None = None, *,
                queries: np.ndarray | None = None, like: Any = None):
    """``(index, IndexReport)`` over L2-normalised ``vectors``.

    ``like``: a previously built IVF index of the same space; its trained
    cells are reused (no k-means), which is what a backfill chunk wants.
    ``queries`` (optional): real query vectors for the recall measurement.
    """
    import faiss

    cfg = cfg or IndexConfig()
    x = l2_normalize(vectors)
    n, d = x.shape
    if n == 0:
        raise ConfigError("cannot index an empty gallery")
    kind = cfg.resolve_kind(n)
    t0 = time.perf_counter()
    params: dict[str, Any] = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
    elif kind == "ivf":
        if like is not None and isinstance(like, faiss.IndexIVF) and like.d == d:
            index = faiss.clone_index(like)
            index.reset()  # keeps the trained coarse quantizer, drops the vectors
            nlist = index.nlist
        else:
            nlist = min(cfg.nlist or default_nlist(n), n)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(cfg.seed)
            m = max(cfg.train_sample, 40 * nlist)
            sample = x if n <= m else x[np.sort(rng.choice(n, m, replace=False))]
            index.train(sample)
        index.add(x)
        params["nlist"] = int(nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.add(x)
        params["M"] = cfg.hnsw_m
        params["efConstruction"] = cfg.ef_construction
    else:  # pragma: no cover - resolve_kind covers every kind
        raise ConfigError(f"unknown index kind {kind!r}")
    build_s = time.perf_counter() - t0
    report = IndexReport(kind=kind, rows=n, dim=d, params=params, k=cfg.recall_k, build_s=build_s)
    if kind != "flat":
        _tune(index, x, cfg, report, queries)
    log.info("built index %s in %.1fs", report.summary(), build_s)
    return index, report


def set_search_params(index: Any, params: dict[str, Any]) -> None:
    """Apply the search-time parameters recorded in a report (faiss files do not keep nprobe)."""
    import faiss

    if isinstance(index, faiss.IndexIVF) and "nprobe" in params:
        index.nprobe = int(params["nprobe"])
    if isinstance(index, faiss.IndexHNSW) and "efSearch" in params:
        index.hnsw.efSearch = int(params["efSearch"])


def _tune(index: Any, x: np.ndarray, cfg: IndexConfig, report: IndexReport,
          queries: np.ndarray | None) -> None:
    """Grow nprobe / efSearch until recall@k vs exact reaches the target; record it."""
    import faiss

    n = x.shape[0]
    rng = np.random.default_rng(cfg.seed + 1)
    exclude_self = queries is None
    if queries is None:
        qids = np.sort(rng.choice(n, min(cfg.recall_queries, n), replace=False))
        q = x[qids]
    else:
        q = l2_normalize(queries)[: cfg.recall_queries]
        qids = None
    k = min(cfg.recall_k, n - 1 if exclude_self else n)
    if k < 1:
        report.recall_at_k, report.recall_queries = 1.0, 0
        return
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    truth = _topk(exact, q, k, qids)
    report.k, report.recall_queries, report.target_recall = k, len(q), cfg.target_recall

    if isinstance(index, faiss.IndexIVF):
        name, fixed, grid = "nprobe", cfg.nprobe, [p for p in _NPROBES if p <= index.nlist] or [index.nlist]
        if index.nlist not in grid:
            grid.append(index.nlist)

        def apply(v: int) -> None:
            index.nprobe = v
    else:
        name, fixed, grid = "efSearch", cfg.ef_search, [e for e in _EF_SEARCH]

        def apply(v: int) -> None:
            index.hnsw.efSearch = max(v, k)

    chosen = None
    for value in ([fixed] if fixed else grid):
        apply(int(value))
        recall = _recall(_topk(index, q, k, qids), truth)
        report.tuning.append({name: float(value), "recall": float(recall)})
        chosen = (int(value), recall)
        if recall >= cfg.target_recall:
            break
    assert chosen is not None
    apply(chosen[0])
    report.params[name] = chosen[0]
    report.recall_at_k = float(chosen[1])
    if chosen[1] < cfg.target_recall:
        log.warning("index %s reaches recall@%d %.3f only, below the target %.3f",
                    report.kind, k, chosen[1], cfg.target_recall)


def _topk(index: Any, q: np.ndarray, k: int, self_ids: np.ndarray | None) -> np.ndarray:
    """Top-k ids; with ``self_ids``, each query's own id removed (search k+1)."""
    if self_ids is None:
        return index.search(q, k)[1]
    ids = index.search(q, k + 1)[1]
    out = np.empty((len(q), k), dtype=np.int64)
    for r in range(len(q)):
        row = ids[r][ids[r] != self_ids[r]]
        out[r] = row[:k]
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k that the approximate top-k found (-1 = nothing found)."""
    hits = 0
    for f, t in zip(found, truth):
        hits += len(np.intersect1d(f[f >= 0], t[t >= 0], assume_unique=False))
    return hits / max(1, truth.size)


def recall_at_k(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """recall@k of ``index`` against exact search over the same (raw) ``vectors``."""
    import faiss

    x = l2_normalize(vectors)
    q = l2_normalize(queries)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    return _recall(index.search(q, k)[1], exact.search(q, k)[1])


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
