"""Retrieval metrics ``M(Q, G)``: CMC top-k and mAP, queries of model Q against a gallery of model G.

Protocol (DESIGN "Metrics", as in openBCT and Apple's ml-fct): one labelled
evaluation set is both query and gallery; the queries are embedded by model Q,
the gallery by model G, on the same samples; with ``leave_one_out`` each query's
own item (same index) is removed from its ranking; a gallery item is a hit when
it shares the query's label.

Ranking is by exact inner product on L2-normalised float32 vectors (cosine).
Ties are broken by gallery index (lower first) so results are deterministic.
Scores are products taken in float64 and rounded to float32: float32 BLAS gives
identical gallery rows different scores depending on where they sit in a block
(so mAP moved with ``batch_size``), and rounding float64 products makes equal
rows tie. The faiss path rescores what faiss returns the same way and fetches
one item more than it needs; a row whose extra item ties the last needed one is
ranked exactly against the whole gallery, so the tie goes to the lower index
there too.

Queries with no relevant item in the gallery (a class with one sample under
leave-one-out) are skipped and counted in ``n_skipped``, as re-id evaluations do:
they cannot be hit by any model, so counting them would only measure the data.

Feasibility on 100k+ galleries: queries go in batches. The top-k path uses a
faiss ``IndexFlatIP`` (exact, BLAS-backed, returns only the top k). mAP over the
*full* ranking needs every score anyway, so for small galleries (<= 20,000) it
is a plain BLAS matmul plus one integer sort per batch, which is several times
faster than asking faiss for k = gallery size; above that, AP is truncated at
``map_k`` (default 1000) with the standard mAP@k definition.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graceful_ray.errors import MetricsError
from graceful_ray.metrics._arrays import json_float, to_numpy

# Lazy imports: faiss loads only for the search that needs it; the other metrics need numpy alone.

#: Above this many ranked gallery items, mAP is truncated at ``map_k``.
FULL_MAP_MAX_GALLERY = 20_000
#: ``map_k`` used when the gallery is too large for exact mAP and none is given.
DEFAULT_MAP_K = 1000
#: Scores held per batch on the full-ranking path (~40 bytes each with the sort keys).
_FULL_BATCH_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class RetrievalMetrics:
    """Result of one ``M(Q, G)`` evaluation.

    ``topk`` maps every requested k (always including 1 and 5) to the share of
    evaluated queries with a hit in their first k results; when fewer than k
    items are ranked, the whole ranking counts. ``map_k_used`` is ``None`` when
    mAP is exact over the full ranking, else the truncation depth k of mAP@k.
    """

    top1: float
    top5: float
    map: float
    map_k_used: int | None
    n_queries: int
    n_skipped: int
    n_gallery: int
    leave_one_out: bool
    topk: dict[int, float] = field(default_factory=dict)

    @property
    def map_exact(self) -> bool:
        return self.map_k_used is None

    def metric(self, name: str) -> float:
        """Value by name: ``"map"``, ``"top1"``, ``"top5"`` or ``"top<k>"`` for a computed k."""
        if name == "map":
            return self.map
        if name.startswith("top") and name[3:].isdigit() and int(name[3:]) in self.topk:
            return self.topk[int(name[3:])]
        raise MetricsError(
            f"unknown retrieval metric {name!r}; available: map, "
            + ", ".join(f"top{k}" for k in sorted(self.topk))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": json_float(self.top1), "top5": json_float(self.top5),
            "topk": {str(k): json_float(v) for k, v in sorted(self.topk.items())},
            "map": json_float(self.map), "map_k_used": self.map_k_used,
            "map_mode": "full" if self.map_exact else "truncated",
            "n_queries": self.n_queries, "n_skipped": self.n_skipped,
            "n_gallery": self.n_gallery, "leave_one_out": self.leave_one_out,
        }


def retrieval_metrics(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any,
    gallery_labels: Any,
    *,
    leave_one_out: bool,
    topk: Iterable[int] = (1, 5),
    map_k: int | None = None,
    normalize: bool = True,
    batch_size: int = 1024,
) -> RetrievalMetrics:
    """CMC top-k and mAP of ``query_emb`` searched against ``gallery_emb``.

    ``leave_one_out=True`` requires query and gallery to be the same samples in
    the same order (same length and labels): query ``i``'s own gallery item
    ``i`` is removed from its ranking. ``map_k=None`` chooses exact mAP when the
    ranking has at most 20,000 items and mAP@1000 otherwise; an explicit
    ``map_k`` always gives mAP@map_k. ``normalize=False`` ranks by the raw inner
    product (embeddings already normalised, or a model trained for dot product).
    """
    q, qlab, g, glab = _validate(query_emb, query_labels, gallery_emb, gallery_labels,
                                 leave_one_out)
    ks = sorted({1, 5, *_topk(topk)})
    batch_size = _positive_int(batch_size, "batch_size")
    if map_k is not None:
        map_k = _positive_int(map_k, "map_k")
    if normalize:
        q, g = l2_normalize(q), l2_normalize(g)

    # Labels of any kind (ints, strings) become shared integer codes, so hits are
    # one vectorised comparison and relevant counts one bincount.
    _, codes = np.unique(np.concatenate([qlab, glab]), return_inverse=True)
    qcode, gcode = codes[: len(qlab)], codes[len(qlab):]
    n_relevant = np.bincount(gcode, minlength=int(codes.max()) + 1)[qcode]
    if leave_one_out:
        n_relevant = n_relevant - 1  # the query's own item is not a candidate
    valid = n_relevant > 0
    if not valid.any():
        raise MetricsError(
            "no query has a relevant gallery item (same label"
            + (", other than itself" if leave_one_out else "")
            + "), so top-k and mAP are undefined; check the labels"
        )
    # Evaluate only queries that can be hit; skipping them before the search saves work too.
    query_ids = np.flatnonzero(valid)
    q, qcode, n_relevant = q[query_ids], qcode[query_ids], n_relevant[query_ids]

    n_gallery = len(g)
    n_ranked = n_gallery - 1 if leave_one_out else n_gallery
    if map_k is None and n_ranked <= FULL_MAP_MAX_GALLERY:
        hits_at, ap = _full_ranking(q, qcode, query_ids, g, gcode, n_relevant, ks,
                                    leave_one_out, batch_size)
        map_k_used = None
    else:
        k_map = DEFAULT_MAP_K if map_k is None else map_k
        hits_at, ap = _topk_search(q, qcode, query_ids, g, gcode, n_relevant, ks, k_map,
                                   leave_one_out, batch_size, n_ranked)
        map_k_used = k_map

    n_eval = len(query_ids)
    top = {k: float(hits_at[k] / n_eval) for k in ks}
    return RetrievalMetrics(
        top1=top[1], top5=top[5], map=float(ap.mean()), map_k_used=map_k_used,
        n_queries=n_eval, n_skipped=int(len(valid) - n_eval), n_gallery=n_gallery,
        leave_one_out=leave_one_out, topk={k: top[k] for k in ks},
    )


def m_score(q_model_emb: Any, g_model_emb: Any, labels: Any, **kwargs: Any) -> RetrievalMetrics:
    """``M(Q, G)`` under the standard protocol: one evaluation set, leave-one-out.

    ``q_model_emb`` and ``g_model_emb`` are the same samples (row ``i`` is sample
    ``i``) embedded by the query model and the gallery model. Extra keyword
    arguments go to :func:`retrieval_metrics`.
    """
    return retrieval_metrics(q_model_emb, labels, g_model_emb, labels, leave_one_out=True,
                             **kwargs)


# -- the two search paths ------------------------------------------------------


def _full_ranking(q: np.ndarray, qcode: np.ndarray, query_ids: np.ndarray, g: np.ndarray,
                  gcode: np.ndarray, n_relevant: np.ndarray, ks: list[int],
                  leave_one_out: bool, batch_size: int) -> tuple[dict[int, int], np.ndarray]:
    """Exact ranking of the whole gallery for every query; exact AP."""
    n_gallery = len(g)
    n_ranked = n_gallery - 1 if leave_one_out else n_gallery
    idx_bits = max(1, (n_gallery - 1).bit_length())
    rows = max(1, min(batch_size, _FULL_BATCH_ELEMENTS // n_gallery))
    hits_at = dict.fromkeys(ks, 0)
    ap: list[np.ndarray] = []  # per query, summed once at the end so batching cannot change it
    gallery_idx = np.arange(n_gallery, dtype=np.uint64)
    g64 = g.astype(np.float64)
    for start in range(0, len(q), rows):
        sl = slice(start, start + rows)
        scores = q[sl].astype(np.float64) @ g64.T  # see the module docstring: float64, then float32
        keys = (_descending_key(scores) << np.uint64(idx_bits)) | gallery_idx
        if leave_one_out:
            # The query's own item gets the largest key: it sorts last and is cut off.
            keys[np.arange(keys.shape[0]), query_ids[sl]] = np.iinfo(np.uint64).max
        keys.sort(axis=1)
        ranked = (keys[:, :n_ranked] & np.uint64((1 << idx_bits) - 1)).astype(np.intp)
        rel = gcode[ranked] == qcode[sl, None]
        _accumulate(rel, ks, hits_at)
        ap.append(_average_precision(rel, n_relevant[sl], None))
    return hits_at, np.concatenate(ap)


def _topk_search(q: np.ndarray, qcode: np.ndarray, query_ids: np.ndarray, g: np.ndarray,
                 gcode: np.ndarray, n_relevant: np.ndarray, ks: list[int], map_k: int,
                 leave_one_out: bool, batch_size: int,
                 n_ranked: int) -> tuple[dict[int, int], np.ndarray]:
    """faiss exact top-k per query batch; CMC from it and AP truncated at ``map_k``."""
    import faiss  # imported here: only this path needs it, and it is a heavy import

    k = min(max(max(ks), map_k), n_ranked)
    k_search = k + 1 if leave_one_out else k  # one extra for the self match
    k_fetch = min(k_search + 1, len(g))  # ...and one to see whether a tie crosses the cut
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    g64 = g.astype(np.float64)
    idx_bits = max(1, (len(g) - 1).bit_length())
    idx_mask = np.uint64((1 << idx_bits) - 1)
    gallery_idx = np.arange(len(g), dtype=np.uint64)
    hits_at = dict.fromkeys(ks, 0)
    ap: list[np.ndarray] = []  # per query, summed once at the end so batching cannot change it
    for start in range(0, len(q), batch_size):
        sl = slice(start, start + batch_size)
        q64 = q[sl].astype(np.float64)
        _, ids = index.search(q[sl], k_fetch)
        # faiss's own float32 scores order tied items arbitrarily and may keep a higher
        # index than a tied lower one: rescore, re-sort by (score desc, index asc).
        keys = (_descending_key(_rescore(q64, g64, ids)) << np.uint64(idx_bits)) \
            | ids.astype(np.uint64)
        keys.sort(axis=1)
        if k_fetch > k_search:
            score_key = keys >> np.uint64(idx_bits)
            for r in np.flatnonzero(score_key[:, k_search] == score_key[:, k_search - 1]):
                # A tie at the cut: items tied with the last kept one may lie beyond
                # what faiss returned; rank this query against the whole gallery.
                full = (_descending_key(q64[r] @ g64.T) << np.uint64(idx_bits)) | gallery_idx
                keys[r] = np.sort(full)[:k_fetch]
        ranked = (keys[:, :k_search] & idx_mask).astype(np.intp)
        if leave_one_out:
            ranked = _drop_self(ranked, query_ids[sl])
        rel = gcode[ranked] == qcode[sl, None]
        _accumulate(rel, ks, hits_at)
        ap.append(_average_precision(rel[:, :map_k], n_relevant[sl], map_k))
    return hits_at, np.concatenate(ap)


def _rescore(q64: np.ndarray, g64: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float64 inner products of each query with its returned gallery ids, in
    chunks of rows so the gathered vectors stay small."""
    out = np.empty(ids.shape, dtype=np.float64)
    rows = max(1, 4_000_000 // max(1, ids.shape[1] * g64.shape[1]))
    for start in range(0, len(ids), rows):
        c = slice(start, start + rows)
        out[c] = np.einsum("rd,rkd->rk", q64[c], g64[ids[c]])
    return out


def _drop_self(ranked: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Remove each row's own id (wherever it sits, by id, not position) to leave k columns.

    With ties or duplicates the self match need not come first, and it may not
    be among the k+1 returned at all; then the last (k+1-th) entry is dropped.
    """
    drop = ranked == self_ids[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True
    return ranked[~drop].reshape(ranked.shape[0], ranked.shape[1] - 1)


def _accumulate(rel: np.ndarray, ks: list[int], hits_at: dict[int, int]) -> None:
    """Add this batch's CMC hits: a query hits at k when any of its first k is relevant."""
    first_hit = np.where(rel.any(axis=1), rel.argmax(axis=1), np.iinfo(np.intp).max)
    for k in ks:
        hits_at[k] += int(np.count_nonzero(first_hit < k))


def _average_precision(rel: np.ndarray, n_relevant: np.ndarray, k: int | None) -> np.ndarray:
    """AP per row of a ranked relevance matrix.

    ``k=None``: exact AP, ``rel`` is the full ranking and the normaliser is the
    number of relevant items. Otherwise AP@k: the sum of precision@i at hits
    within the first k, divided by ``min(#relevant, k)`` -- the normaliser that
    makes a perfect top-k score 1 even when more than k items are relevant.
    """
    # Only hit positions contribute, and hits are few next to ranked items, so work on
    # them alone: np.nonzero yields hits row by row in rank order, so a hit's number
    # within its row is its flat position minus where its row's hits start.
    rows, cols = np.nonzero(rel)
    hits_per_row = np.bincount(rows, minlength=rel.shape[0])
    row_start = np.cumsum(hits_per_row) - hits_per_row
    hit_number = np.arange(1, len(rows) + 1) - row_start[rows]
    precision_sum = np.bincount(rows, weights=hit_number / (cols + 1.0), minlength=rel.shape[0])
    norm = n_relevant if k is None else np.minimum(n_relevant, k)
    return precision_sum / norm


# -- helpers -------------------------------------------------------------------


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is the descending order of float32 ``scores``.

    Mapping the float bits to an order-preserving integer lets the gallery index
    ride in the low bits, so one integer sort yields the ranking with ties broken
    by index -- much faster than a stable argsort of the scores.
    """
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    bits = s.view(np.uint32)
    negative = (bits & np.uint32(0x80000000)) != 0
    # Positive floats: larger bits = larger value, so invert (and clear the sign bit to
    # place them before all negatives). Negative floats: larger bits = more negative,
    # already descending, and their set sign bit keeps them after the positives.
    desc = np.where(negative, bits, ~bits & np.uint32(0x7FFFFFFF))
    return desc.astype(np.uint64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, as float32 (what ``normalize=True`` ranks by).

    A zero row stays zero; a row with huge entries is normalised, not zeroed.
    """
    # Norms in float64: in float32 the squares of a row above ~1e19 overflow to inf
    # and the row silently became a zero vector.
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    # A zero vector stays zero (score 0 with everything) instead of becoming NaN.
    return np.ascontiguousarray(x64 / np.maximum(norms, np.finfo(np.float64).tiny),
                                dtype=np.float32)


def _embeddings(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x, name)
    if a.ndim != 2:
        raise MetricsError(f"{name} must be 2-D (n_samples, dim), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise MetricsError(f"{name} is empty (shape {a.shape})")
    if a.dtype.kind not in "fiu":
        raise MetricsError(f"{name} must be numeric, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise MetricsError(
            f"{name} has NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
            "a diverged model or a float16 overflow produces these -- fix the embeddings "
            "rather than ranking them"
        )
    return a


def _labels(x: Any, name: str, n: int, emb_name: str) -> np.ndarray:
    a = to_numpy(x, name)
    if a.ndim != 1:
        raise MetricsError(f"{name} must be 1-D, got shape {a.shape}")
    if len(a) != n:
        raise MetricsError(f"{name} has {len(a)} labels but {emb_name} has {n} rows")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise MetricsError(f"{name} contains NaN or inf")
    return a


def _validate(query_emb: Any, query_labels: Any, gallery_emb: Any, gallery_labels: Any,
              leave_one_out: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q = _embeddings(query_emb, "query_emb")
    g = _embeddings(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise MetricsError(
            f"query and gallery embeddings differ in dimension ({q.shape[1]} vs {g.shape[1]}); "
            "models with different embedding sizes cannot be compared without a projection"
        )
    qlab = _labels(query_labels, "query_labels", len(q), "query_emb")
    glab = _labels(gallery_labels, "gallery_labels", len(g), "gallery_emb")
    if leave_one_out:
        if len(q) != len(g):
            raise MetricsError(
                f"leave_one_out needs queries and gallery to be the same samples, but there are "
                f"{len(q)} queries and {len(g)} gallery items"
            )
        if not np.array_equal(qlab, glab):
            raise MetricsError(
                "leave_one_out needs queries and gallery to be the same samples in the same "
                "order, but query_labels and gallery_labels differ"
            )
        if len(g) < 2:
            raise MetricsError("leave_one_out needs at least 2 samples")
    return q, qlab, g, glab


def _positive_int(x: Any, name: str) -> int:
    try:
        v = None if isinstance(x, bool) else operator.index(x)
    except TypeError:
        v = None
    if v is None or v < 1:
        raise MetricsError(f"{name} must be a positive integer, got {x!r}")
    return v


def _topk(topk: Any) -> list[int]:
    """The ks of ``topk``: an iterable of positive ints (``topk=3`` is a common slip)."""
    if isinstance(topk, (str, bytes)) or not isinstance(topk, Iterable):
        raise MetricsError(f"topk must be a list of positive integers such as (1, 5), got {topk!r}")
    return [_positive_int(k, "topk") for k in topk]


__all__ = ["RetrievalMetrics", "retrieval_metrics", "m_score", "FULL_MAP_MAX_GALLERY",
           "DEFAULT_MAP_K"]
