"""What one upgrade-training run needs to know, in one dataclass.

The same :class:`UpgradeConfig` drives the CLI, ``jobs/train_upgrade.py``, the
Tune trials and the tests, so a run is reproducible from its config alone (it is
stored with the run and in the registry manifest).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from graceful_ray.errors import ConfigError
from graceful_ray.paths import registry_root, under_root

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def generate_run_name(prefix: str = "upgrade") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{uuid.uuid4().hex[:6]}"


LR_SCHEDULES = ("cosine", "constant")


@dataclass
class UpgradeConfig:
    """One training run: data, model, method, old model, and how to run it.

    ``old`` is a registry reference (``name@v1``, ``name@production``); ``None``
    trains a first model (only ``plain`` makes sense then).
    """

    data: str
    model: str = "cnn1d"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "plain"
    hparams: dict[str, Any] = field(default_factory=dict)
    old: str | None = None
    # Warm start: begin training at the old model's weights (same architecture;
    # head rows copied for the classes both know). See graceful_ray/train/warm_start.py.
    init_from_old: bool = False
    name: str = "model"  # registry model name the result is published under
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 10
    # The global batch: one optimizer step sees this many rows summed over all
    # workers (each takes batch_size // world_size), so the same flags give the
    # same optimisation on 1 or 8 workers. Must be a multiple of the world size.
    batch_size: int = 128
    lr: float = 3e-3
    # "cosine": decay to 0 over the run (the default); "constant": the same lr
    # throughout. The choice changes how many flips there are to remove: see
    # benchmarks/results/upgrade_methods.md (retrain scenarios).
    lr_schedule: str = "cosine"
    weight_decay: float = 1e-4
    seed: int = 0
    # Feature-space augmentation (Gaussian noise std, random circular shift);
    # when on, the old model runs online on the same augmented batch.
    augment_noise: float = 0.0
    augment_shift: int = 0
    # Image augmentation in the Ray Data pipeline, training split only: a random crop
    # after zero-padding by augment_pad pixels and a horizontal flip, drawn per row and
    # epoch from the seed (graceful_ray.train.pipeline.ImageAugment). The old model
    # then runs online on the augmented batch, and the training split is never cached.
    augment_images: bool = False
    augment_pad: int = 4
    workers: int = 1  # 0: Ray Train local mode (the loop runs in the driver; no fault tolerance)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    # Input pipeline (graceful_ray.train.pipeline). CPUs Ray Data may use in all to
    # decode inputs (features, images) while the workers train. The default, a
    # fraction, is one decode task that any node with a quarter CPU free can run
    # (a whole CPU may be free nowhere, see data.reader.READ_TASK_CPUS).
    decode_cpus: float = 0.25
    # Rows in each worker's local shuffle buffer (0: no shuffling, e.g. evaluation order).
    shuffle_buffer_rows: int = 4096
    # ... and at most this many MiB of decoded inputs (but at least one batch): the
    # buffer holds object-store blocks the worker maps (graceful_ray.train.pipeline.
    # shuffle_buffer_rows). 32x32 RGB images: 1365 rows.
    shuffle_buffer_mb: float = 16.0
    prefetch_batches: int = 2
    # A worker keeps a split in memory after its first streamed pass when it takes at
    # most this much; larger splits stream every epoch (0: always stream). Streaming a
    # small MNIST-1D split every epoch ran at 0.83x the in-memory loop, the cached
    # path never slower (benchmarks/results/train_streaming.md); the default is what
    # a worker can spare, not a speed trade-off.
    cache_budget_mb: float = 1024.0
    # Object store Ray Data may fill ahead of the workers, per dataset (train, val), in
    # MiB (0: Ray Data's own limit, half the node's object store). Decoding outpaces a
    # worker, so without a bound the queue of decoded blocks grows with the split up to
    # that share, and a worker maps every block it reads: its RSS grew with the dataset
    # by the object-store pages it had mapped, its own memory stayed flat
    # (benchmarks/results/train_streaming.md). The bound takes effect once a split is
    # written in bounded files and row groups (graceful_ray.data.layout); a split of
    # one file is one read that no limit can hold back.
    stream_buffer_mb: float = 64.0
    # Memory each worker may use, in MiB (0: no limit). Reserved as Ray's ``memory``
    # resource (so Ray places workers where it is free) and enforced: a worker whose
    # own resident memory (not the object-store pages it maps) passes it is stopped
    # (graceful_ray.train.worker.MemoryWatch). A split is cached only within a quarter
    # of it (see effective_cache_budget_mb).
    memory_per_worker_mb: float = 0.0
    max_failures: int = 0
    registry: str | None = None  # registry root; default <root>/registry
    storage: str | None = None  # Ray Train run storage; default <root>/runs
    run_name: str | None = None
    publish: bool = True
    # Test hook: kill one worker process once at this epoch to exercise
    # FailureConfig recovery. Never set in production.
    fail_at_epoch: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 1 (or 0 for Ray Train's local mode), got {self.workers}")
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is the global batch and must split evenly across "
                f"{self.world_size} workers: use a multiple of {self.world_size} (at least {self.world_size})")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if not self.decode_cpus > 0:
            raise ConfigError(f"decode_cpus must be > 0, got {self.decode_cpus}")
        if (self.shuffle_buffer_rows < 0 or self.shuffle_buffer_mb < 0 or self.prefetch_batches < 0
                or self.cache_budget_mb < 0):
            raise ConfigError("shuffle_buffer_rows, shuffle_buffer_mb, prefetch_batches and cache_budget_mb "
                              "must be >= 0")
        if self.stream_buffer_mb < 0:
            raise ConfigError(f"stream_buffer_mb must be >= 0 (0: Ray Data's own limit), got {self.stream_buffer_mb}")
        if self.memory_per_worker_mb < 0:
            raise ConfigError(f"memory_per_worker_mb must be >= 0 (0: no limit), got {self.memory_per_worker_mb}")
        if self.memory_per_worker_mb and self.workers == 0:
            raise ConfigError("memory_per_worker_mb limits Ray Train workers; local mode (workers=0) has none: "
                              "use workers >= 1")
        if self.augment_noise < 0 or self.augment_shift < 0 or self.augment_pad < 0:
            raise ConfigError("augmentation strengths must be >= 0")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"unknown placement strategy {self.placement_strategy!r}")
        if self.init_from_old and not self.old:
            raise ConfigError("init_from_old starts from the old model's weights: give the old model (--old NAME@VERSION)")
        if self.run_name is not None and not _RUN_NAME.match(self.run_name):
            raise ConfigError(
                f"run name {self.run_name!r} is not valid: use letters, digits, '.', '_' "
                "or '-' (at most 128 characters)")

    @property
    def world_size(self) -> int:
        """Training processes: ``workers``, or 1 in local mode (``workers=0``)."""
        return max(1, self.workers)

    @property
    def per_worker_batch_size(self) -> int:
        """Rows each worker takes per step (``batch_size`` is the global batch)."""
        return self.batch_size // self.world_size

    @property
    def effective_cache_budget_mb(self) -> float:
        """``cache_budget_mb``, within a quarter of the worker's memory limit when one is
        set: the cache must leave room for the process itself and the stream."""
        if self.memory_per_worker_mb:
            return min(self.cache_budget_mb, self.memory_per_worker_mb / 4)
        return self.cache_budget_mb

    @property
    def augmented(self) -> bool:
        """Whether the training inputs differ from the stored rows (so cached old outputs do not fit them)."""
        return self.augment_noise > 0 or self.augment_shift > 0 or self.augment_images

    def resolved(self) -> "UpgradeConfig":
        """A copy with defaults filled in (run name, registry and storage roots)."""
        return UpgradeConfig(**{
            **asdict(self),
            "registry": registry_root(self.registry),
            "storage": self.storage or under_root("runs"),
            "run_name": self.run_name or generate_run_name(self.name),
        })

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
