"""The Ray Train worker loop: one loop for every upgrade method.

Each worker streams its shard of the training set from Ray Data every epoch
(decoded by Ray Data's CPU tasks, shuffled in a local buffer, prefetched: see
:mod:`graceful_ray.train.pipeline`), keeping a split in memory after the first
pass only when it fits ``cache_budget_mb``. It trains with whatever
:mod:`graceful_ray.methods` objective the config names. The loop never branches
on the method: old-model outputs are simply present (cached columns of the same
rows, or an online teacher) or absent. ``batch_size`` is the global batch; each
of the world's ranks takes its share.

Every epoch it evaluates on the whole validation set, partitioned by row across
the workers and counts summed with an all-reduce (so NFR is over all of it, not
rank 0's part), and reports the metrics with a checkpoint. A restarted worker
group resumes from the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch import nn

from graceful_ray.methods import build_method
from graceful_ray.models import build_model
from graceful_ray.registry import load_model
from graceful_ray.storage import resolve
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.train.loop_config import LoopConfig
from graceful_ray.train.pipeline import (
    INPUT, StreamedSplit, epoch_key, eval_batch_rows, publish_epoch, rows_of_rank, shuffle_buffer_rows,
)
from graceful_ray.train.step import CachedOldOutputs, OldOutputs, OnlineOldOutputs, run_epoch
from graceful_ray.train.warm_start import warm_start
from graceful_ray.train.worker import (all_ranks_have, all_reduce_sum, load_checkpoint_dir, lockstep_group,
                                       MemoryWatch, make_scheduler, peak_rss_mb, report_epoch, resume, world)

# Lazy imports: Ray Train loads only inside a worker, so the loop's helpers import without Ray.

__all__ = ["train_loop_per_worker", "load_checkpoint_dir", "latest_local_checkpoint", "wrap_for_method"]


class _WithFeatures(nn.Module):
    """Makes ``forward`` return (embedding, logits) so DDP's hooks see the call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        return self.inner.forward_features(x)


def augment(x: torch.Tensor, noise: float, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Feature-space augmentation: Gaussian noise and a random circular shift."""
    if shift:
        s = int(torch.randint(-shift, shift + 1, (1,), generator=gen))
        x = torch.roll(x, s, dims=-1)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return x


# Ray Train's local mode (``workers=0``: the loop runs in the driver, no worker
# actors) keeps only a reference to a reported checkpoint directory. We persist
# checkpoints under the run directory ourselves so local runs resume the same way.
_LOCAL_PREFIX = "checkpoint_local_epoch_"


def persist_local_checkpoint(cfg: UpgradeConfig, directory: str, epoch: int):
    import ray.train

    dest = resolve(cfg.storage).join(cfg.run_name, f"{_LOCAL_PREFIX}{epoch:05d}")
    dest.makedirs()
    pafs.copy_files(directory, dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    return ray.train.Checkpoint(dest.path, filesystem=dest.fs)


def latest_local_checkpoint(cfg: UpgradeConfig):
    import ray.train

    run = resolve(cfg.storage).join(cfg.run_name)
    done = sorted(f.base_name for f in run.list() if f.base_name.startswith(_LOCAL_PREFIX)
                  and run.join(f.base_name, "state.json").exists())
    if not done:
        return None
    return ray.train.Checkpoint(run.join(done[-1]).path, filesystem=run.fs)


def _maybe_inject_failure(cfg: UpgradeConfig, epoch: int, rank: int, world: int, marker: str | None) -> None:
    """Test hook: kill this worker process once (SIGKILL, no clean-up), as a crash would."""
    if cfg.fail_at_epoch is None or epoch != cfg.fail_at_epoch or rank != world - 1 or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already failed once: this is the recovered attempt
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


LOOP_KEY = "loop"  # train_loop_config = {LOOP_KEY: LoopConfig}: Ray Train passes a dict


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    loop: LoopConfig = config[LOOP_KEY]
    # Peak memory by part (reported each epoch), and the memory limit when one is set.
    memory = MemoryWatch(loop.run.memory_per_worker_mb).start()
    try:
        return _train(loop, memory)
    finally:
        memory.stop()


def _train(loop: LoopConfig, memory: MemoryWatch) -> dict[str, Any]:
    import ray
    import ray.train
    import ray.train.torch

    cfg = loop.run
    rank, world_size = world()
    device = ray.train.torch.get_device()
    use_bf16 = cfg.use_gpu and device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    model = build_model(loop.spec)
    context = loop.upgrade_context(model.embedding_dim)
    if cfg.init_from_old:  # a resumed run's checkpoint replaces these weights below
        warm_start(model, cfg.registry, context)
    method = build_method(cfg.method, **cfg.hparams)
    method.setup(context)
    method.to(device)
    # Methods may change what is trained (LQF trains a linearization of the
    # network) and how (K-FAC): optional hooks, so the loop stays method-agnostic.
    model = wrap_for_method(method, model)
    optimizer = make_optimizer(method, model, cfg)

    train, val = _streamed_splits(loop, rank, world_size)
    # Ray Train splits the training set into equal shards, so every rank takes the same steps;
    # the scheduler needs the count up front.
    steps = math.ceil((loop.train_rows // world_size) / train.batch_size)
    if steps == 0:
        raise ValueError(f"worker {rank} received no training rows: fewer rows than workers?")
    old_outputs = _old_output_source(loop, device)
    scheduler = make_scheduler(optimizer, cfg.lr_schedule, cfg.epochs * steps)
    local_mode = cfg.workers == 0
    start_epoch, history = resume(latest_local_checkpoint(cfg) if local_mode else ray.train.get_checkpoint(),
                                  model, optimizer, scheduler)

    # Images on a GPU: channels-last memory lets bf16 convolutions use the tensor cores.
    channels_last = use_bf16 and len(loop.spec.input_shape) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = ray.train.torch.prepare_model(_WithFeatures(model))

    def forward(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            emb, logits = trainable(x)
        return emb.float(), logits.float()

    lockstep = lockstep_group(device, world_size)
    for epoch in range(start_epoch, cfg.epochs):
        _maybe_inject_failure(cfg, epoch, rank, world_size, loop.failure_marker)
        epoch_start_unix = time.time()
        t0 = time.perf_counter()
        trainable.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
        streamed = train.streaming  # before the pass: the first pass may fill the cache
        if cfg.augment_images:  # before iterating: the decode tasks draw this epoch's crops
            publish_epoch(epoch_key(cfg.run_name), epoch)
        stats = run_epoch(
            train.epoch(epoch), device=device, forward=forward, method=method, optimizer=optimizer,
            scheduler=scheduler, old=old_outputs,
            augment=((lambda x: augment(x, cfg.augment_noise, cfg.augment_shift, gen))
                     if cfg.augment_noise or cfg.augment_shift else None),
            all_have_next=lambda mine: all_ranks_have(mine, world_size, lockstep))
        train_time = time.perf_counter() - t0

        metrics = _evaluate(trainable, val.epoch(epoch), forward, loop.has_cached_old_outputs, device)
        sums = stats.sums
        loss_t = all_reduce_sum(torch.tensor([stats.rows] + [sums[k] for k in sorted(sums)],
                                             dtype=torch.float64, device=device))
        metrics.update({k: float(v) / float(loss_t[0]) for k, v in zip(sorted(sums), loss_t[1:].tolist())})
        metrics.update(epoch=epoch + 1, epoch_time_s=train_time, samples_per_s=float(loss_t[0]) / train_time,
                       epoch_start_unix=epoch_start_unix, steps_per_epoch=stats.steps,
                       global_batch_size=cfg.batch_size, batch_size_per_worker=train.batch_size,
                       train_streamed=float(streamed), worker_peak_rss_mb=peak_rss_mb(device),
                       # its parts: the worker's own memory (anon), object-store blocks it mapped (shmem)
                       **{f"worker_peak_{k}_mb": v for k, v in memory.peak_mb(device).items() if k != "rss"})
        history.append(metrics)
        report_epoch(metrics, rank=rank, epoch=epoch, history=history, model=model, optimizer=optimizer,
                     scheduler=scheduler,
                     persist=(lambda d, e: persist_local_checkpoint(cfg, d, e)) if local_mode else None)

    # Where each rank ran and what it ended with: lets callers (and the
    # multi-node test) check placement and that DDP kept the replicas identical.
    mine = {"node_id": ray.get_runtime_context().get_node_id(),
            "params_sha": _params_digest(model), "final": history[-1] if history else {}}
    everyone = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"history": history, "node_ids": [w["node_id"] for w in everyone],
            "params_sha": [w["params_sha"] for w in everyone],
            "finals": [w["final"] for w in everyone], "world_size": world_size,
            "teacher": old_outputs.name}


def _streamed_splits(loop: LoopConfig, rank: int, world_size: int) -> tuple[StreamedSplit, StreamedSplit]:
    """This worker's training shard and validation partition (graceful_ray.train.pipeline)."""
    import ray.data
    import ray.train

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = loop.run
    budget = int(cfg.effective_cache_budget_mb * 2**20)
    shuffle = shuffle_buffer_rows(cfg.shuffle_buffer_rows, int(cfg.shuffle_buffer_mb * 2**20),
                                  loop.spec.input_shape, cfg.per_worker_batch_size)
    # Augmented in the pipeline: new crops every epoch, so the training split is never cached.
    train = StreamedSplit(ray.train.get_dataset_shard("train"), batch_size=cfg.per_worker_batch_size,
                          shuffle_buffer_rows=shuffle, prefetch_batches=cfg.prefetch_batches,
                          cache_bytes=0 if cfg.augment_images else budget, seed=cfg.seed * 101 + rank)
    # The whole validation set reaches every worker; each evaluates its partition of the rows.
    val = StreamedSplit(ray.train.get_dataset_shard("val"), batch_size=eval_batch_rows(loop.spec.input_shape),
                        prefetch_batches=cfg.prefetch_batches,
                        cache_bytes=budget, keep=rows_of_rank(rank, world_size))
    return train, val


def _old_output_source(loop: LoopConfig, device: torch.device) -> OldOutputs:
    """Where each batch's old-model outputs come from (graceful_ray.train.step)."""
    if loop.old and loop.run.augmented:  # augmented inputs: the old model must see the same batch
        _, teacher = load_model(loop.run.registry, loop.run.old)
        return OnlineOldOutputs(teacher.to(device), torch.tensor(loop.old.class_positions, device=device))
    if loop.has_cached_old_outputs:
        return CachedOldOutputs(device)
    return OldOutputs()


def _params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def wrap_for_method(method, model: nn.Module) -> nn.Module:
    """The module the method trains (the network itself unless it says otherwise)."""
    return method.wrap_model(model)


def make_optimizer(method, model: nn.Module, cfg: UpgradeConfig) -> torch.optim.Optimizer:
    optimizer = method.make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer


def _evaluate(trainable, batches, forward, has_old_cols: bool, device: torch.device) -> dict[str, float]:
    """Accuracy and flips on this worker's validation rows, counts summed over workers."""
    trainable.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=device)  # n, new ok, old ok, NF, PF
    with torch.no_grad():
        for batch in batches:
            x = batch[INPUT].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            _, logits = forward(x)
            new_ok = logits.argmax(1) == y
            counts[0] += len(y)
            counts[1] += new_ok.sum()
            if has_old_cols:
                old_ok = batch["old_correct"].to(device).bool()
                counts[2] += old_ok.sum()
                counts[3] += (old_ok & ~new_ok).sum()
                counts[4] += (~old_ok & new_ok).sum()
    counts = all_reduce_sum(counts)
    total = max(float(counts[0]), 1.0)
    metrics = {"val_rows": float(counts[0]), "val_accuracy": float(counts[1]) / total,
               "val_error_rate": 1.0 - float(counts[1]) / total}
    if has_old_cols:
        metrics.update(val_old_accuracy=float(counts[2]) / total, val_nfr=float(counts[3]) / total,
                       val_pfr=float(counts[4]) / total, val_negative_flips=float(counts[3]))
    return metrics
