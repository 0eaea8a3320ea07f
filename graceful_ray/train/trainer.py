"""Build and run one upgrade on Ray Train, then publish the result.

The driver does the cheap, serial work (validate the config, resolve the old
model, make sure its outputs are cached, build the ``UpgradeContext``) before any
worker starts, so a bad argument fails in a second with a clear message rather
than inside a worker group. Then one :class:`~ray.train.torch.TorchTrainer` runs
:func:`graceful_ray.train.loop.train_loop_per_worker` whatever the method.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graceful_ray.data import read_info, read_split, split_paths
from graceful_ray.data.reader import read_parquet
from graceful_ray.errors import ConfigError
from graceful_ray.methods import build_method
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry, load_model
from graceful_ray.storage import resolve
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.train.loop import (LOOP_KEY, latest_local_checkpoint, load_checkpoint_dir,
                                     train_loop_per_worker, wrap_for_method)
from graceful_ray.train.loop_config import LoopConfig, OldModelFacts, upgrade_context
from graceful_ray.train.checks import check_augmentation
from graceful_ray.train.old_outputs import compute_old_outputs, old_class_means
from graceful_ray.train.pipeline import ImageAugment, decoded, epoch_key
from graceful_ray.train.warm_start import warm_start

# Lazy imports: Ray Train loads only when a run starts, so preparing and checking a run needs no Ray.

logger = logging.getLogger(__name__)

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default) and takes one report per poll; a worker's report queue holds
# one, so its next ``ray.train.report`` blocks until the poll. On short epochs
# (MNIST-1D: 0.6 s) every epoch waited for it: Ray Train took 3.8x the wall time of
# a plain PyTorch loop, 1.25x at 0.5 s (benchmarks/results/train_overhead.md).
# Polling faster did not pay there: at 0.2 s the wait was as short, but the polls
# took CPU from a loop that uses every core (1.52x). Train hands the driver's
# value on to the controller and the workers; ours applies unless the
# environment sets one.
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONTROLLER_POLL_S = "0.5"


@dataclass
class UpgradeResult:
    """What a finished run produced."""

    run_name: str
    run_path: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    node_ids: list[str]
    workers: dict[str, Any] = field(default_factory=dict)  # what the run's rank 0 returned
    published: Any = None  # registry Manifest, when published
    resumed: bool = False
    state_dict: dict = field(default_factory=dict, repr=False)

    @property
    def model_ref(self) -> str | None:
        return f"{self.published.name}@v{self.published.version}" if self.published else None


def _training_classes(cfg: UpgradeConfig, info) -> list[int]:
    """The classes the new model's head covers: the labels in its training split."""
    if cfg.train_split not in info.splits:
        raise ConfigError(f"dataset {cfg.data} has no split {cfg.train_split!r}; it has {sorted(info.splits)}")
    if cfg.val_split not in info.splits:
        raise ConfigError(f"dataset {cfg.data} has no split {cfg.val_split!r}; it has {sorted(info.splits)}")

    labels = read_split(cfg.data, cfg.train_split, columns=["label"]).column("label").to_numpy()
    return sorted(int(c) for c in np.unique(labels))


def _read_split(cfg: UpgradeConfig, info, split: str, cached):
    if cached is not None:
        return read_parquet(cached.files, filesystem=cached.location.fs)

    fs, paths = split_paths(cfg.data, split)
    return read_parquet(paths, filesystem=fs)


def prepare_upgrade(cfg: UpgradeConfig) -> tuple[LoopConfig, dict[str, Any], Any]:
    """Validate and build everything the workers need; returns (loop config, datasets, info)."""

    info = read_info(cfg.data)
    check_augmentation(cfg, info.feature_shape)
    classes = _training_classes(cfg, info)
    spec = ModelSpec(cfg.model, tuple(info.feature_shape), len(classes), dict(cfg.model_kwargs))
    probe = build_model(spec)  # fail now on a bad model spec, not in every worker
    method = build_method(cfg.method, **cfg.hparams)
    positions = {c: i for i, c in enumerate(classes)}

    old = None
    cached = {cfg.train_split: None, cfg.val_split: None}
    if cfg.old:
        old_manifest, old_model = load_model(cfg.registry, cfg.old)
        old_ref = f"{old_manifest.name}@v{old_manifest.version}"
        for split in (cfg.train_split, cfg.val_split):
            cached[split] = compute_old_outputs(cfg.data, split, registry_root=cfg.registry, old_ref=old_ref)
        means = old_class_means(cached[cfg.train_split])
        old = OldModelFacts(
            ref=old_ref, class_positions=[positions.get(c, -1) for c in old_manifest.classes],
            head_weight=old_model.head.weight.detach().numpy(), head_bias=old_model.head.bias.detach().numpy(),
            embedding_dim=old_model.embedding_dim,
            class_means={positions[c]: m for c, m in means.items() if c in positions})
    elif method.needs_old_model:
        raise ConfigError(f"method {cfg.method!r} needs an old model: pass --old NAME@VERSION "
                          "(or use method 'plain' to train a first version)")

    loop = LoopConfig(run=cfg, spec=spec, classes=classes, old=old,
                      train_rows=int(info.splits[cfg.train_split].rows),
                      method_hparams=method.hyperparameters(),
                      method_compatible=bool(getattr(method, "compatible", False)))
    ctx = loop.upgrade_context(probe.embedding_dim)
    method.setup(ctx)  # the method's own checks (e.g. BCT's embedding dims) run here, once
    if cfg.init_from_old:  # a warm start that cannot fit fails here, before any worker starts
        warm_start(probe, cfg.registry, ctx)

    # Ray Data decodes the inputs (graceful_ray.train.pipeline) while the workers train.
    def pipeline(split: str, with_row_key: bool, augment: ImageAugment | None = None):
        return decoded(_read_split(cfg, info, split, cached[split]), feature_shape=info.feature_shape,
                       classes=classes, with_old=bool(cfg.old), with_row_key=with_row_key,
                       decode_cpus=cfg.decode_cpus, augment=augment)

    augment = (ImageAugment(seed=cfg.seed, pad=cfg.augment_pad, epoch_key=epoch_key(cfg.run_name))
               if cfg.augment_images else None)  # the training split only
    datasets = {"train": pipeline(cfg.train_split, False, augment), "val": pipeline(cfg.val_split, True)}
    return loop, datasets, info


def _run_dir_exists(cfg: UpgradeConfig) -> bool:
    return resolve(cfg.storage).join(cfg.run_name).exists()


def build_trainer(cfg: UpgradeConfig, loop: LoopConfig, datasets: dict[str, Any]):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = resolve(cfg.storage)
    if cfg.fail_at_epoch is not None:
        loop.failure_marker = os.path.join(tempfile.gettempdir(),
                                                     f"graceful-ray-failure-{cfg.run_name}")
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.memory_per_worker_mb:  # reserved here, enforced in the worker (MemoryWatch)
        resources["memory"] = int(cfg.memory_per_worker_mb * 2**20)
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={LOOP_KEY: loop},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage.path if storage.is_local else storage.path,
            storage_filesystem=None if storage.is_local else storage.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        # Only the training set is split (into equal shards); every worker streams the
        # whole validation set and evaluates its partition of the rows, so no row is dropped.
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options(cfg)),
    )


def ingest_options(cfg: UpgradeConfig):
    """Ray Train's ingest options with the object store Ray Data fills ahead of the
    workers bounded by ``stream_buffer_mb`` (why: see UpgradeConfig.stream_buffer_mb).
    Given explicitly: Ray Train resolves its defaults where it configures the
    datasets, not from this process's DataContext."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    if cfg.stream_buffer_mb:
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=int(cfg.stream_buffer_mb * 2**20))
    return options


def fit(trainer):
    """``trainer.fit()``, with Ray Train's controller polling every CONTROLLER_POLL_S
    unless the environment says otherwise (why: see CONTROLLER_POLL_ENV)."""
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    return trainer.fit()


def run_upgrade(cfg: UpgradeConfig) -> UpgradeResult:
    """Train (or resume) one upgrade run and publish the model to the registry."""
    cfg = cfg.resolved()
    resumed = _run_dir_exists(cfg)
    if resumed:
        logger.info("run %r exists under %s: resuming it from its latest checkpoint", cfg.run_name, cfg.storage)
    loop, datasets, info = prepare_upgrade(cfg)
    result = fit(build_trainer(cfg, loop, datasets))
    if result.error is not None:
        raise result.error
    if cfg.workers == 0:  # local mode: our own persisted checkpoints
        result.checkpoint = latest_local_checkpoint(cfg)
        result.path = resolve(cfg.storage).join(cfg.run_name).uri
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state_dict, _, progress = load_checkpoint_dir(d)
    history = progress["history"]
    ret = result.return_value or {}
    final = dict(history[-1]) if history else {}
    out = UpgradeResult(run_name=cfg.run_name, run_path=str(result.path), metrics=final, history=history,
                        node_ids=list(ret.get("node_ids") or []), workers=ret, resumed=resumed, state_dict=state_dict)
    if cfg.publish:
        out.published = publish_result(cfg, loop, info, state_dict, final)
        logger.info("published %s", out.model_ref)
    return out


def export_for_registry(cfg: UpgradeConfig, spec: ModelSpec, state_dict, *, classes=None,
                        old: OldModelFacts | None = None) -> tuple[dict, str]:
    """(state dict, format) to publish: a method that trains something other than
    the plain network (LQF) decides how its result is stored. ``classes`` default
    to the head's positions."""

    method = build_method(cfg.method, **cfg.hparams)
    if not method.overrides("export"):
        return state_dict, "network"  # the plain network: nothing to rebuild
    network = build_model(spec)
    method.setup(upgrade_context(range(spec.num_classes) if classes is None else classes, old,
                                 registry=cfg.registry, new_embedding_dim=network.embedding_dim))
    module = wrap_for_method(method, network)
    module.load_state_dict(state_dict)
    return method.export(module)


def publish_result(cfg: UpgradeConfig, loop: LoopConfig, info, state_dict, metrics):
    state_dict, fmt = export_for_registry(cfg, loop.spec, state_dict, classes=loop.classes, old=loop.old)
    hyper = dict(loop.method_hparams)
    hyper.update(epochs=cfg.epochs, batch_size=cfg.batch_size, batch_size_per_worker=cfg.per_worker_batch_size,
                 lr=cfg.lr, weight_decay=cfg.weight_decay,
                 seed=cfg.seed, augment_noise=cfg.augment_noise, augment_shift=cfg.augment_shift,
                 augment_images=cfg.augment_images, augment_pad=cfg.augment_pad,
                 train_split=cfg.train_split, workers=cfg.workers, init_from_old=cfg.init_from_old)
    return Registry(cfg.registry).publish(
        cfg.name, state_dict, spec=loop.spec, classes=loop.classes, method=cfg.method,
        hyperparameters=hyper, dataset_checksum=info.checksum,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        parent=loop.old.ref if loop.old else None,
        compatible_with_parent=loop.method_compatible, format=fmt,
        extra={"run_name": cfg.run_name, "model_kwargs": cfg.model_kwargs},
    )
