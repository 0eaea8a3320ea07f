"""The old model's outputs, computed once and stored beside the data.

Knowledge-distillation and BCT-style losses need the old model's logits and
embeddings for every training sample. Running the old network in every step
would nearly double the cost of an epoch; instead one Ray Data batch-inference
pass writes them to Parquet next to the dataset, keyed by the dataset checksum
and the old model's version and weights hash, and every later run (every Tune
trial, every resumed run) reads them. A changed dataset or a re-published old
model gets a new key, so a stale cache is never used.

Layout::

    <data>/cache/old-outputs/<key>/<split>/_SUCCESS.json   commit marker
    <data>/cache/old-outputs/<key>/<split>/<attempt>/*.parquet

The marker is written last and names the attempt directory, so a crashed or
concurrent writer never exposes a partial cache on any filesystem (a marker
write is atomic both locally and on object stores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from graceful_ray.data import read_info, split_paths
from graceful_ray.data.reader import read_parquet
from graceful_ray.registry import Registry, load_model
from graceful_ray.storage import Location, resolve
from graceful_ray.data.tensors import fixed_size_list, inputs_from_arrow

# Lazy imports: Ray loads only when old outputs are computed on a cluster.

logger = logging.getLogger(__name__)

OLD_COLUMNS = ("old_logits", "old_embedding", "old_pred", "old_correct")


@dataclass(frozen=True)
class CachedSplit:
    """A committed cache of one split: where its Parquet files are."""

    location: Location
    files: list[str]
    rows: int
    key: str

    def read(self) -> pa.Table:
        return pa.concat_tables(pq.read_table(f, filesystem=self.location.fs) for f in self.files)


def cache_key(dataset_checksum: str, old_manifest: Any) -> str:
    weights_hash = "".join(sorted(old_manifest.files.values()))

    digest = hashlib.sha256(weights_hash.encode()).hexdigest()[:10]
    return f"{old_manifest.name}-v{old_manifest.version}-{dataset_checksum[:16]}-{digest}"


class _OldModelPredictor:
    """A Ray Data actor: loads the old model once, appends its outputs to batches."""

    def __init__(self, registry_root: str, old_ref: str, feature_shape: list[int]):
        torch.set_num_threads(1)
        self.manifest, self.model = load_model(registry_root, old_ref)
        self.model.eval()
        self.classes = torch.tensor(self.manifest.classes)
        self.feature_shape = feature_shape

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(inputs_from_arrow(batch, self.feature_shape))
        with torch.no_grad():
            emb, logits = self.model.forward_features(x)
        pred = self.classes[logits.argmax(1)].numpy()
        labels = batch.column("label").to_numpy()
        return (batch
                .append_column("old_logits", fixed_size_list(logits.numpy()))
                .append_column("old_embedding", fixed_size_list(emb.numpy()))
                .append_column("old_pred", pa.array(pred.astype(np.int64)))
                .append_column("old_correct", pa.array(pred == labels)))


def _split_dir(data_root: str, key: str, split: str) -> Location:
    return resolve(data_root).join("cache", "old-outputs", key, split)


def find_cached(data_root: str, key: str, split: str) -> CachedSplit | None:
    """The committed cache for ``split`` under ``key``, or None."""
    marker = _split_dir(data_root, key, split).join("_SUCCESS.json")
    if not marker.exists():
        return None
    meta = json.loads(marker.read_bytes())
    loc = resolve(data_root)
    files = [loc.join(*f.split("/")).path for f in meta["files"]]
    return CachedSplit(loc, files, int(meta["rows"]), key)


def compute_old_outputs(data_root: str, split: str, *, registry_root: str, old_ref: str,
                        batch_size: int = 1024, num_cpus: float = 0.5,
                        force: bool = False) -> CachedSplit:
    """Run the old model over ``split`` once (Ray Data) and commit the result.

    Returns the existing cache when one is committed under the same key, unless
    ``force``. Requires a running Ray.
    """
    import ray

    info = read_info(data_root)
    manifest = Registry(registry_root).get(old_ref)
    key = cache_key(info.checksum, manifest)
    if not force and (hit := find_cached(data_root, key, split)) is not None:
        logger.info("old-model outputs for %s/%s reused from cache %s", data_root, split, key)
        return hit

    split_info = info.splits[split]
    src_fs, paths = split_paths(data_root, split)
    attempt = uuid.uuid4().hex[:12]
    out_dir = _split_dir(data_root, key, split).join(attempt)
    logger.info("computing old-model outputs (%s) for %s/%s", old_ref, data_root, split)
    ds = read_parquet(paths, filesystem=src_fs)
    ds = ds.map_batches(
        _OldModelPredictor,
        fn_constructor_kwargs=dict(registry_root=registry_root, old_ref=f"{manifest.name}@v{manifest.version}",
                                   feature_shape=list(info.feature_shape)),
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=num_cpus,
    )
    # The pass runs in a Ray task, not in this process: Ray Data's actor pool makes
    # Ray Core log an ERROR line ("... has constructor arguments in the object store
    # and max_restarts > 0 ... the actor restart will fail") from the process that
    # creates the actors, which on the driver went straight to the user's terminal;
    # a task's goes where Ray's other worker output does (the terminal only with
    # log_to_driver, as the same line from Ray Train's own actors). The only switch,
    # map_batches(max_restarts=0), would drop the pool's restart of a crashed worker.
    # (no retry: a second attempt would write into the same attempt directory)
    ray.get(ray.remote(num_cpus=0, max_retries=0)(_write_parquet_task).remote(ds, out_dir.path, out_dir.fs))
    written = sorted(f.path for f in out_dir.list() if f.path.endswith(".parquet"))
    rows = sum(pq.read_metadata(f, filesystem=out_dir.fs).num_rows for f in written)
    if rows != split_info.rows:
        raise RuntimeError(f"old-output cache for {split} has {rows} rows, dataset has {split_info.rows}")
    root = resolve(data_root)
    rel = [f[len(root.path) + 1:] for f in written]
    marker = {"key": key, "split": split, "rows": rows, "files": rel, "old_model": f"{manifest.name}@v{manifest.version}",
              "dataset_checksum": info.checksum}
    _split_dir(data_root, key, split).join("_SUCCESS.json").write_bytes(json.dumps(marker, indent=1).encode())
    return CachedSplit(root, written, rows, key)


def _write_parquet_task(ds, path: str, filesystem) -> None:
    ds.write_parquet(path, filesystem=filesystem)


def old_class_means(cached: CachedSplit) -> dict[int, np.ndarray]:
    """Mean old embedding per label over a cached split (BCT's synthesized rows)."""
    table = cached.read().select(["label", "old_embedding"])
    labels = table.column("label").to_numpy()
    emb = table.column("old_embedding").combine_chunks()
    emb = emb.flatten().to_numpy().reshape(len(labels), -1)
    return {int(c): emb[labels == c].mean(0) for c in np.unique(labels)}
