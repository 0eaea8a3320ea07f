"""Ray Data batch inference: a registered model embeds a dataset split.

Used by the gallery build (every row), the backfill (one chunk of ids at a
time) and the transformation (old and new model side by side, for training
pairs). The pattern is the old-output cache's (:mod:`graceful_ray.train.old_outputs`):
a class loaded once per actor (``concurrency`` actors, fractional
``num_cpus``), pyarrow batches in and out. Results come back to the driver as
Arrow, since the driver builds the faiss index over them anyway.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graceful_ray.data import read_info, read_split, split_paths
from graceful_ray.data.reader import read_parquet
from graceful_ray.data.tensors import fixed_size_list, inputs_from_arrow

# Lazy imports: torch, the registry and Ray load only when embeddings are computed.

log = logging.getLogger(__name__)


class _Embedder:
    """A Ray Data actor: loads the model(s) once, embeds the rows it is given."""

    def __init__(self, registry_root: str, model_ref: str, feature_shape: Sequence[int],
                 keep_ids: np.ndarray | None = None, second_model_ref: str | None = None,
                 num_threads: int = 1, with_logits: bool = False) -> None:
        import torch

        from graceful_ray.registry import Registry, load_model

        torch.set_num_threads(max(1, int(num_threads)))
        registry = Registry(registry_root)
        _, self.model = load_model(registry, model_ref)
        self.second = load_model(registry, second_model_ref)[1] if second_model_ref else None
        self.feature_shape = list(feature_shape)
        self.keep = pa.array(keep_ids) if keep_ids is not None else None
        self.with_logits = with_logits

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        if self.keep is not None:
            batch = batch.filter(pc.is_in(batch.column("id"), value_set=self.keep))
        cols: dict[str, Any] = {"id": batch.column("id")}
        if "label" in batch.column_names:
            cols["label"] = batch.column("label")
        if batch.num_rows == 0:
            d = self.model.embedding_dim
            cols["embedding"] = pa.array([], type=pa.list_(pa.float32(), d))
            if self.second is not None:
                cols["embedding2"] = pa.array([], type=pa.list_(pa.float32(), self.second.embedding_dim))
            if self.with_logits:
                cols["logits"] = pa.array([], type=pa.list_(pa.float32(), self.model.num_classes))
            return pa.table(cols)
        x = torch.from_numpy(inputs_from_arrow(batch, self.feature_shape))
        with torch.no_grad():
            emb, logits = self.model.forward_features(x)
            cols["embedding"] = fixed_size_list(emb.numpy())
            if self.second is not None:
                cols["embedding2"] = fixed_size_list(self.second.embed(x).numpy())
            if self.with_logits:
                cols["logits"] = fixed_size_list(logits.numpy())
        return pa.table(cols)


def embed_dataset(data_root: str, split: str, *, registry_root: str, model_ref: str,
                  ids: np.ndarray | None = None, second_model_ref: str | None = None,
                  with_logits: bool = False, batch_size: int = 1024, num_cpus: float = 0.5,
                  concurrency: int | tuple[int, int] = 1):
    """The lazy Ray Data pipeline of :func:`embed_split` and the model's manifest."""
    import ray

    from graceful_ray.registry import Registry

    info = read_info(data_root)
    registry = Registry(registry_root)
    manifest = registry.get(model_ref)  # fail here, not inside an actor
    second = registry.get(second_model_ref) if second_model_ref else None
    fs, paths = split_paths(data_root, split)
    ds = read_parquet(paths, filesystem=fs)
    ds = ds.map_batches(
        _Embedder,
        fn_constructor_kwargs=dict(
            registry_root=registry_root, model_ref=manifest.ref, feature_shape=list(info.feature_shape),
            keep_ids=None if ids is None else np.asarray(ids),
            second_model_ref=second.ref if second else None,
            num_threads=max(1, int(round(num_cpus))), with_logits=with_logits),
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
        compute=(ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
                 if isinstance(concurrency, tuple) else ray.data.ActorPoolStrategy(size=int(concurrency))),
    )
    return ds, manifest


def embed_split(data_root: str, split: str, *, registry_root: str, model_ref: str,
                ids: np.ndarray | None = None, second_model_ref: str | None = None,
                with_logits: bool = False, batch_size: int = 1024, num_cpus: float = 0.5,
                concurrency: int | tuple[int, int] = 1, engine: str = "ray") -> pa.Table:
    """Embed ``split`` (or only its rows whose id is in ``ids``) with ``model_ref`` on Ray Data.

    Returns ``(id, [label], embedding[, embedding2][, logits])``, in no
    particular order. ``ids`` not in the split are simply absent: callers
    compare counts and say which are missing.

    ``engine="local"`` runs the same embedder in this process instead of a Ray
    Data job: for small galleries, where starting an actor costs more than the
    work, and for tests.
    """
    import ray

    if engine == "local":
        return _embed_local(data_root, split, registry_root=registry_root, model_ref=model_ref, ids=ids,
                            second_model_ref=second_model_ref, with_logits=with_logits,
                            batch_size=batch_size)
    if engine != "ray":
        raise ValueError(f"engine must be 'ray' or 'local', not {engine!r}")

    ds, manifest = embed_dataset(data_root, split, registry_root=registry_root, model_ref=model_ref,
                                 ids=ids, second_model_ref=second_model_ref, with_logits=with_logits,
                                 batch_size=batch_size, num_cpus=num_cpus, concurrency=concurrency)
    t0 = time.perf_counter()
    refs = ds.to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        d = manifest.embedding_dim
        cols = {"id": pa.array([], type=pa.int64()), "embedding": pa.array([], type=pa.list_(pa.float32(), d))}
        return pa.table(cols)
    table = pa.concat_tables(tables, promote_options="default").combine_chunks()
    log.info("embedded %d rows of %s/%s with %s in %.1fs", table.num_rows, data_root, split,
             manifest.ref, time.perf_counter() - t0)
    return table


def _embed_local(data_root: str, split: str, *, registry_root: str, model_ref: str,
                 ids: np.ndarray | None, second_model_ref: str | None, with_logits: bool,
                 batch_size: int) -> pa.Table:
    from graceful_ray.registry import Registry

    info = read_info(data_root)
    manifest = Registry(registry_root).get(model_ref)
    table = read_split(data_root, split)
    embedder = _Embedder(registry_root, manifest.ref, info.feature_shape, keep_ids=ids,
                         second_model_ref=second_model_ref, num_threads=1, with_logits=with_logits)
    parts = [embedder(table.slice(s, batch_size)) for s in range(0, table.num_rows, batch_size)]
    parts = [p for p in parts if p.num_rows] or parts[:1]
    return pa.concat_tables(parts).combine_chunks()


def embeddings_of(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A fixed-size-list column as a float32 (n, d) array."""
    col = table.column(column).combine_chunks()
    n = table.num_rows
    if n == 0:
        return np.zeros((0, col.type.list_size), dtype=np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, -1)
