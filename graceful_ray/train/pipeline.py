"""The training input pipeline: decode in Ray Data, stream into the workers.

The driver appends a decode stage (:func:`decoded`) to each split: Ray Data CPU
tasks turn ``features`` or encoded ``image`` bytes into float32 tensors and
labels into head positions, so a (GPU) worker receives ready tensors and the
decoding overlaps its training. On the training split the same tasks may also
augment the images (:class:`ImageAugment`: a random crop after padding and a
horizontal flip), drawn from the row's id, the run's seed and the epoch, so a
row gets new crops every epoch and the same ones when a run is repeated,
whichever task decodes it. Cached old-model outputs are columns of the same
rows (the cache is the split with the old model's columns appended, see
:mod:`graceful_ray.train.old_outputs`), so they stream with their inputs.

A worker iterates its shard every epoch (:class:`StreamedSplit`) with a local
shuffle buffer and prefetching and never holds the split. A split that fits the
worker's cache budget (``UpgradeConfig.cache_budget_mb``) is kept in memory
after its first streamed pass and shuffled there for the later epochs, which
spares small datasets Ray Data's per-epoch start-up (measured in
benchmarks/results/train_streaming.md); a larger one streams every epoch.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from graceful_ray.data.tensors import inputs_from_arrow

# Lazy imports: Ray Data and Ray's key-value store load only inside a training run.

INPUT = "x"
#: Bytes of decoded inputs per decode task (one output block), within DECODE_BATCH_ROWS:
#: a block is the unit Ray Data queues, prefetches and a worker maps, so large rows
#: (images) make proportionally fewer rows per block (32x32 RGB: 341 rows).
DECODE_BLOCK_BYTES = 4 << 20
DECODE_BATCH_ROWS = (32, 1024)
#: Validation batches: evaluation needs no gradient, so large, but bounded in bytes.
EVAL_BATCH_ROWS = 4096
EVAL_BATCH_BYTES = 16 << 20
ROW_KEY = "row_key"  # an int64 per row that partitions the validation set over workers
OLD_STREAMED = ("old_logits", "old_embedding", "old_correct")


def vectors(col) -> np.ndarray:
    """A fixed-size-list column as an (n, d) array."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


def row_keys(ids) -> np.ndarray:
    """An int64 key per row id (the validation partition's)."""
    if pa.types.is_integer(ids.type):
        return ids.to_numpy(zero_copy_only=False).astype(np.int64)
    # string ids: a stable hash (Python's hash() is salted per process)
    return np.array([zlib.crc32(str(v).encode()) for v in ids.to_pylist()], dtype=np.int64)


@dataclass(frozen=True)
class ImageAugment:
    """Training-split image augmentation: shift by up to ``pad`` pixels (a random
    crop of the zero-padded image, as torchvision's ``RandomCrop(padding=pad)``)
    and a horizontal flip with probability 1/2. ``epoch_key``: the Ray KV key
    the training workers write the current epoch under (:func:`publish_epoch`)."""

    seed: int
    pad: int = 4
    flip: bool = True
    epoch_key: str = ""

    def draws(self, keys: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dy, dx, flip) per row: a hash of (seed, row key, epoch), so no state is needed."""
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
            h = _mix(_mix(_mix(np.full(len(keys), self.seed, dtype=np.uint64)) ^ keys.astype(np.uint64))
                     ^ np.uint64(epoch))
        span = np.uint64(2 * self.pad + 1)
        dy = (h % span).astype(np.int64)
        dx = ((h >> np.uint64(16)) % span).astype(np.int64)
        flip = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool) & self.flip
        return dy, dx, flip

    def __call__(self, x: np.ndarray, keys: np.ndarray, epoch: int) -> np.ndarray:
        """Augment ``x`` (N, C, H, W) in place of a copy."""
        n, _, h, w = x.shape
        dy, dx, flip = self.draws(keys, epoch)
        padded = np.pad(x, ((0, 0), (0, 0), (self.pad, self.pad), (self.pad, self.pad)))
        rows = (dy[:, None] + np.arange(h))[:, None, :, None]
        cols = (dx[:, None] + np.arange(w))
        cols = np.where(flip[:, None], cols[:, ::-1], cols)[:, None, None, :]
        return np.ascontiguousarray(padded[np.arange(n)[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                                           rows, cols], dtype=np.float32)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well-spread 64-bit hash, vectorised."""
    z = (z + np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_key(run_name: str) -> str:
    """The KV key a run's training workers publish their epoch under."""
    return f"graceful-ray/augment-epoch/{run_name}"


def publish_epoch(key: str, epoch: int) -> None:
    """Tell the decode tasks which epoch they are decoding (read by :func:`current_epoch`).

    Ray Data starts a new execution of the pipeline each epoch, so the tasks cannot
    count epochs themselves; the training workers write it before they iterate.
    Ray's internal KV (a GCS table every Ray process reaches) is the smallest shared
    value there is: no actor to keep alive."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, str(epoch).encode(), overwrite=True)


def current_epoch(key: str) -> int:
    """The epoch the training workers published under ``key`` (0 before any)."""
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key) if key and internal_kv._internal_kv_initialized() else None
    return int(value) if value else 0


def decode_batch(batch: pa.Table, *, feature_shape: Sequence[int], lookup: np.ndarray, with_old: bool,
                 with_row_key: bool, augment: ImageAugment | None = None) -> dict[str, np.ndarray]:
    """One Ray Data batch -> model-ready arrays (runs in Ray Data's decode tasks).

    A label the head does not cover (a validation class a class-incremental model
    never saw) maps to -1, which is never predicted.
    """
    labels = batch.column("label").to_numpy()
    out = {INPUT: inputs_from_arrow(batch, feature_shape),
           "label": lookup[np.clip(labels, 0, len(lookup) - 1)]}
    if augment is not None:
        out[INPUT] = augment(out[INPUT], row_keys(batch.column("id")), current_epoch(augment.epoch_key))
    if with_old:
        out["old_logits"] = vectors(batch.column("old_logits"))
        out["old_embedding"] = vectors(batch.column("old_embedding"))
        out["old_correct"] = batch.column("old_correct").to_numpy(zero_copy_only=False)
    if with_row_key:
        out[ROW_KEY] = row_keys(batch.column("id"))
    return out


def label_lookup(class_positions: dict[int, int]) -> np.ndarray:
    lookup = np.full(max(class_positions) + 2, -1, dtype=np.int64)
    for c, p in class_positions.items():
        lookup[c] = p
    return lookup


def input_row_bytes(feature_shape: Sequence[int]) -> int:
    """Bytes of one decoded model input (float32)."""
    return 4 * math.prod(feature_shape)


def decode_batch_rows(feature_shape: Sequence[int]) -> int:
    """Rows per decode task: ``DECODE_BLOCK_BYTES`` of decoded inputs, within ``DECODE_BATCH_ROWS``."""
    lo, hi = DECODE_BATCH_ROWS
    return max(lo, min(hi, DECODE_BLOCK_BYTES // input_row_bytes(feature_shape)))


def eval_batch_rows(feature_shape: Sequence[int], max_rows: int = EVAL_BATCH_ROWS,
                    max_bytes: int = EVAL_BATCH_BYTES) -> int:
    """Rows per validation batch: ``max_rows``, within ``max_bytes`` of decoded inputs
    (a batch, and the batches prefetched, are blocks the worker maps)."""
    return max(1, min(max_rows, max_bytes // input_row_bytes(feature_shape)))


def shuffle_buffer_rows(max_rows: int, max_bytes: int, feature_shape: Sequence[int], batch_size: int) -> int:
    """Rows of a worker's local shuffle buffer: at most ``max_rows`` and ``max_bytes``
    of decoded inputs, but at least one batch (0 when ``max_rows`` is 0: no shuffle).
    Ray Data's buffer holds the blocks it draws from, which are object-store pages the
    worker maps, so a bound in rows alone grows with the row size (4096 rows of
    224x224 RGB are 2.3 GiB)."""
    if not max_rows:
        return 0
    return max(batch_size, min(max_rows, max_bytes // input_row_bytes(feature_shape)))


def decoded(ds, *, feature_shape: Sequence[int], classes: Sequence[int], with_old: bool,
            with_row_key: bool = False, decode_cpus: float = 1.0, batch_size: int | None = None,
            augment: ImageAugment | None = None):
    """``ds`` with the decode stage appended: ``decode_cpus`` CPUs in all decode
    (one task of ``min(1, decode_cpus)`` CPUs, up to ``ceil(decode_cpus)`` at once),
    ``batch_size`` rows a task (default :func:`decode_batch_rows`), augmenting the
    images when ``augment`` is given (the training split's)."""
    import ray.data

    batch_size = batch_size or decode_batch_rows(feature_shape)
    return ds.map_batches(
        decode_batch, batch_format="pyarrow", batch_size=batch_size,
        fn_kwargs=dict(feature_shape=tuple(feature_shape), with_old=with_old, with_row_key=with_row_key,
                       lookup=label_lookup({c: i for i, c in enumerate(classes)}), augment=augment),
        num_cpus=min(1.0, decode_cpus), compute=ray.data.TaskPoolStrategy(size=max(1, math.ceil(decode_cpus))),
    )


def collect(batches) -> dict[str, torch.Tensor]:
    """Concatenate batches (dicts of tensors) into one dict of tensors."""
    parts: dict[str, list[torch.Tensor]] = {}
    for b in batches:
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def _nbytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values())


class StreamedSplit:
    """One worker's view of a split, iterated once per epoch.

    ``keep``: an optional (batch -> bool mask) that selects this worker's rows
    (the validation partition). ``cache_bytes``: keep the split in memory after
    the first full pass when it takes at most this much (0: always stream).
    """

    def __init__(self, iterator, *, batch_size: int, shuffle_buffer_rows: int = 0, prefetch_batches: int = 2,
                 cache_bytes: int = 0, keep=None, seed: int = 0):
        self.iterator = iterator
        self.batch_size = batch_size
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.prefetch_batches = prefetch_batches
        self.cache_bytes = cache_bytes
        self.keep = keep
        self.seed = seed
        self.cached: dict[str, torch.Tensor] | None = None
        self.passes = 0

    @property
    def streaming(self) -> bool:
        return self.cached is None

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches (CPU tensors), shuffled when a shuffle buffer is set."""
        if self.cached is not None:
            yield from self._from_cache(epoch)
            return
        kept: list[dict[str, torch.Tensor]] | None = [] if self.cache_bytes > 0 else None
        size = 0
        for batch in self._stream(epoch):
            if kept is not None:
                size += _nbytes(batch)
                kept = kept if size <= self.cache_bytes else None  # too big: stream every epoch
                if kept is not None:
                    kept.append(batch)
            yield batch
        self.passes += 1
        if kept:
            self.cached = collect(kept)

    def _stream(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        shuffle = self.shuffle_buffer_rows or None
        for batch in self.iterator.iter_torch_batches(
                batch_size=self.batch_size, prefetch_batches=self.prefetch_batches, device="cpu",
                local_shuffle_buffer_size=shuffle,
                local_shuffle_seed=(self.seed * 1_000_003 + epoch) if shuffle else None):
            if self.keep is not None:
                mask = self.keep(batch)
                batch = {k: v[mask] for k, v in batch.items()}
                if not len(batch[INPUT]):
                    continue
            yield batch

    def _from_cache(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.cached[INPUT])
        if self.shuffle_buffer_rows:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield {k: v[start:start + self.batch_size] for k, v in self.cached.items()}
            else:
                idx = order[start:start + self.batch_size]
                yield {k: v[idx] for k, v in self.cached.items()}


def rows_of_rank(rank: int, world: int):
    """The validation partition: rows whose key is ``rank`` modulo ``world`` (exact,
    whatever order Ray Data delivers the blocks in)."""
    def keep(batch: dict[str, Any]) -> torch.Tensor:
        return batch[ROW_KEY] % world == rank
    return keep
