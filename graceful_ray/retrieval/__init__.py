"""Backfill-free retrieval: faiss galleries, the embedding-space check, backfill, transformation.

- :mod:`~graceful_ray.retrieval.gallery`: Parquet rows + faiss index, published as atomic
  snapshots (:class:`Gallery`, :func:`build_gallery`, :func:`publish_embeddings`);
- :mod:`~graceful_ray.retrieval.index`: exact / IVF / HNSW by size, recall vs exact at build;
- :mod:`~graceful_ray.retrieval.embedding_space`: may this model search that gallery (registry lineage);
- :mod:`~graceful_ray.retrieval.searcher`: :class:`GallerySearcher` for serving, reloads on publish;
- :mod:`~graceful_ray.retrieval.backfill`: progressive / staged re-embedding, resumable;
- :mod:`~graceful_ray.retrieval.transform`: learned old -> new map trained on Ray Train;
- :mod:`~graceful_ray.retrieval.curves`: the backfilling curve and its area.

Heavy imports (faiss, torch, ray) happen inside the functions that need them.
"""

from graceful_ray.retrieval.backfill import (BackfillConfig, BackfillResult, backfill_status, order_rows,
                                             run_backfill, uncertainty_scores)
from graceful_ray.retrieval.curves import BackfillCurve, backfill_curve, curve_auc, mixed_gallery
from graceful_ray.retrieval.errors import (BackfillError, ConcurrentUpdateError, EmbeddingSpaceError,
                                           GalleryError, QueryError)
from graceful_ray.retrieval.gallery import (Gallery, Snapshot, build_gallery, make_rows, merge_rows,
                                            publish_embeddings)
from graceful_ray.retrieval.index import IndexConfig, IndexReport, build_index
from graceful_ray.retrieval.searcher import GallerySearcher, SearchResult, retrieval_hits, topk_overlap
from graceful_ray.retrieval.embedding_space import SpaceCheck, check_query_model, check_snapshot
from graceful_ray.retrieval.transform import (Transform, TransformConfig, apply_transform, load_transform,
                                              train_transform)

__all__ = [
    "BackfillConfig", "BackfillResult", "backfill_status", "order_rows", "run_backfill",
    "uncertainty_scores", "BackfillCurve", "backfill_curve", "curve_auc", "mixed_gallery",
    "BackfillError", "ConcurrentUpdateError", "EmbeddingSpaceError", "GalleryError", "QueryError",
    "Gallery", "Snapshot", "build_gallery", "make_rows", "merge_rows", "publish_embeddings",
    "IndexConfig", "IndexReport", "build_index", "GallerySearcher", "SearchResult", "retrieval_hits",
    "topk_overlap", "SpaceCheck",
    "check_query_model", "check_snapshot", "Transform", "TransformConfig", "apply_transform",
    "load_transform", "train_transform",
]
