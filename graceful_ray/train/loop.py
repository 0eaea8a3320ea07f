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

import json
import math
import os
import signal
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from graceful_ray.methods import UpgradeContext, build_method
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.train.pipeline import INPUT, StreamedSplit, rows_of_rank
from graceful_ray.train.step import CachedOldOutputs, OldOutputs, OnlineOldOutputs, run_epoch
from graceful_ray.train.warm_start import warm_start


class _WithFeatures(nn.Module):
    """Makes ``forward`` return (embedding, logits) so DDP's hooks see the call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        return self.inner.forward_features(x)


def _world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _peak_rss_mb(device: torch.device) -> float:
    """The largest peak resident memory of any rank so far (what a memory cap must hold)."""
    import resource

    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64,
                     device=device)  # ru_maxrss is in KiB on Linux
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _lockstep_group(device: torch.device, world: int):
    """A CPU (gloo) process group for the per-step "do all ranks have a batch?" check:
    on GPUs an NCCL all-reduce read back with ``.item()`` would make the host wait for
    the step's queued kernels every step. ``None``: the default group (gloo on CPU)."""
    if world > 1 and device.type == "cuda" and dist.is_available() and dist.is_initialized():
        return dist.new_group(backend="gloo")
    return None


def _all_ranks_have(mine: bool, world: int, group=None) -> bool:
    """Whether every rank has a next batch (one tiny CPU all-reduce per step)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return mine
    t = torch.tensor([int(mine)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def augment(x: torch.Tensor, noise: float, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Feature-space augmentation: Gaussian noise and a random circular shift."""
    if shift:
        s = int(torch.randint(-shift, shift + 1, (1,), generator=gen))
        x = torch.roll(x, s, dims=-1)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen).to(x.device)
    return x


def _save_checkpoint(directory: str, model: nn.Module, optimizer, scheduler, state: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f)


def load_checkpoint_dir(directory: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state, optimizer+scheduler state, progress) from a checkpoint dir."""
    from safetensors.torch import load_file

    model_state = load_file(os.path.join(directory, "model.safetensors"))
    opt = torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True, map_location="cpu")
    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    return model_state, opt, state


# Ray Train's local mode (``workers=0``: the loop runs in the driver, no worker
# actors) keeps only a reference to a reported checkpoint directory. We persist
# checkpoints under the run directory ourselves so local runs resume the same way.
_LOCAL_PREFIX = "checkpoint_local_epoch_"


def persist_local_checkpoint(cfg: UpgradeConfig, directory: str, epoch: int):
    import pyarrow.fs as pafs
    import ray.train

    from graceful_ray.storage import resolve

    dest = resolve(cfg.storage).join(cfg.run_name, f"{_LOCAL_PREFIX}{epoch:05d}")
    dest.makedirs()
    pafs.copy_files(directory, dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    return ray.train.Checkpoint(dest.path, filesystem=dest.fs)


def latest_local_checkpoint(cfg: UpgradeConfig):
    import ray.train

    from graceful_ray.storage import resolve

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


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    import ray
    import ray.train
    import ray.train.torch

    cfg = UpgradeConfig(**loop_config["config"])
    spec = ModelSpec.from_dict(loop_config["spec"])
    rank, world = _world()
    device = ray.train.torch.get_device()
    use_bf16 = cfg.use_gpu and device.type == "cuda"
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)

    model = build_model(spec)
    ctx_data = loop_config["context"]
    context = upgrade_context(loop_config, cfg, model.embedding_dim)
    if cfg.init_from_old:  # a resumed run's checkpoint replaces these weights below
        warm_start(model, cfg.registry, context)
    method = build_method(cfg.method, **cfg.hparams)
    method.setup(context)
    method.to(device)
    # Methods may change what is trained (LQF trains a linearization of the
    # network) and how (K-FAC): optional hooks, so the loop stays method-agnostic.
    model = wrap_for_method(method, model)
    optimizer = make_optimizer(method, model, cfg)

    # ---- data: stream this worker's shard every epoch (graceful_ray.train.pipeline) ----
    has_old_cols = bool(loop_config["has_cached_old_outputs"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    batch_size = cfg.per_worker_batch_size  # cfg.batch_size is the global batch
    budget = int(cfg.cache_budget_mb * 2**20)
    train = StreamedSplit(ray.train.get_dataset_shard("train"), batch_size=batch_size,
                          shuffle_buffer_rows=cfg.shuffle_buffer_rows, prefetch_batches=cfg.prefetch_batches,
                          cache_bytes=budget, seed=cfg.seed * 101 + rank)
    # The whole validation set reaches every worker; each evaluates its partition of the rows.
    val = StreamedSplit(ray.train.get_dataset_shard("val"), batch_size=4096, prefetch_batches=cfg.prefetch_batches,
                        cache_bytes=budget, keep=rows_of_rank(rank, world))
    # Ray Train splits the training set into equal shards, so every rank takes the same steps;
    # the scheduler needs the count up front.
    steps = math.ceil((int(loop_config["train_rows"]) // world) / batch_size)
    if steps == 0:
        raise ValueError(f"worker {rank} received no training rows: fewer rows than workers?")

    # Where each batch's old-model outputs come from (graceful_ray.train.step).
    if cfg.old and cfg.augmented:  # augmented inputs: the old model must see the same batch
        from graceful_ray.registry import Registry

        _, teacher = Registry(cfg.registry).load_model(cfg.old)
        old_outputs = OnlineOldOutputs(teacher.to(device),
                                       torch.tensor(ctx_data["old_class_positions"], device=device))
    elif has_old_cols:
        old_outputs = CachedOldOutputs(device)
    else:
        old_outputs = OldOutputs()

    if cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
    else:  # constant: still a scheduler, so checkpoints have the same shape
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    start_epoch, history = 0, []
    local_mode = cfg.workers == 0
    checkpoint = latest_local_checkpoint(cfg) if local_mode else ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model_state, opt_state, state = load_checkpoint_dir(d)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    # Images on a GPU: channels-last memory lets bf16 convolutions use the tensor cores.
    channels_last = use_bf16 and len(spec.input_shape) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = ray.train.torch.prepare_model(_WithFeatures(model))

    def forward(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            emb, logits = trainable(x)
        return emb.float(), logits.float()

    lockstep = _lockstep_group(device, world)
    marker = loop_config.get("failure_marker")
    for epoch in range(start_epoch, cfg.epochs):
        _maybe_inject_failure(cfg, epoch, rank, world, marker)
        epoch_start_unix = time.time()
        t0 = time.perf_counter()
        trainable.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
        streamed = train.streaming  # before the pass: the first pass may fill the cache
        stats = run_epoch(
            train.epoch(epoch), device=device, forward=forward, method=method, optimizer=optimizer,
            scheduler=scheduler, old=old_outputs,
            augment=(lambda x: augment(x, cfg.augment_noise, cfg.augment_shift, gen)) if cfg.augmented else None,
            all_have_next=lambda mine: _all_ranks_have(mine, world, lockstep))
        train_time = time.perf_counter() - t0

        metrics = _evaluate(trainable, val.epoch(epoch), forward, has_old_cols, device)
        sums = stats.sums
        loss_t = _all_reduce_sum(torch.tensor([stats.rows] + [sums[k] for k in sorted(sums)],
                                              dtype=torch.float64, device=device))
        metrics.update({k: float(v) / float(loss_t[0]) for k, v in zip(sorted(sums), loss_t[1:].tolist())})
        metrics.update(epoch=epoch + 1, epoch_time_s=train_time, samples_per_s=float(loss_t[0]) / train_time,
                       epoch_start_unix=epoch_start_unix, steps_per_epoch=stats.steps,
                       global_batch_size=cfg.batch_size, batch_size_per_worker=batch_size,
                       train_streamed=float(streamed), worker_peak_rss_mb=_peak_rss_mb(device))
        history.append(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save_checkpoint(tmp, model, optimizer, scheduler, {"epoch": epoch, "history": history})
                ckpt = (persist_local_checkpoint(cfg, tmp, epoch) if local_mode
                        else ray.train.Checkpoint.from_directory(tmp))
            ray.train.report(metrics, checkpoint=ckpt)

    # Where each rank ran and what it ended with: lets callers (and the
    # multi-node test) check placement and that DDP kept the replicas identical.
    mine = {"node_id": ray.get_runtime_context().get_node_id(),
            "params_sha": _params_digest(model), "final": history[-1] if history else {}}
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"history": history, "node_ids": [w["node_id"] for w in everyone],
            "params_sha": [w["params_sha"] for w in everyone],
            "finals": [w["final"] for w in everyone], "world_size": world,
            "teacher": old_outputs.name}


def _params_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def upgrade_context(loop_config: dict[str, Any], cfg: UpgradeConfig, new_embedding_dim: int) -> UpgradeContext:
    """The method's view of the upgrade, rebuilt from the (picklable) loop config."""
    ctx_data = loop_config["context"]
    means = ctx_data.get("old_class_means")
    return UpgradeContext(
        num_classes=len(loop_config["classes"]),
        old_classes=ctx_data.get("old_classes"),
        old_head_weight=_t(ctx_data.get("old_head_weight")),
        old_head_bias=_t(ctx_data.get("old_head_bias")),
        old_embedding_dim=ctx_data.get("old_embedding_dim"),
        new_embedding_dim=new_embedding_dim,
        old_class_means={int(k): _t(v) for k, v in means.items()} if means else None,
        old_ref=ctx_data.get("old_ref"), registry=cfg.registry, classes=list(loop_config["classes"]),
    )


def wrap_for_method(method, model: nn.Module) -> nn.Module:
    """The module the method trains (the network itself unless it says otherwise)."""
    hook = getattr(method, "wrap_model", None)
    return hook(model) if hook is not None else model


def make_optimizer(method, model: nn.Module, cfg: UpgradeConfig) -> torch.optim.Optimizer:
    hook = getattr(method, "make_optimizer", None)
    optimizer = hook(model, lr=cfg.lr, weight_decay=cfg.weight_decay) if hook is not None else None
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer


def _t(value) -> torch.Tensor | None:
    return None if value is None else torch.as_tensor(np.asarray(value), dtype=torch.float32)


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
    counts = _all_reduce_sum(counts)
    total = max(float(counts[0]), 1.0)
    metrics = {"val_rows": float(counts[0]), "val_accuracy": float(counts[1]) / total,
               "val_error_rate": 1.0 - float(counts[1]) / total}
    if has_old_cols:
        metrics.update(val_old_accuracy=float(counts[2]) / total, val_nfr=float(counts[3]) / total,
                       val_pfr=float(counts[4]) / total, val_negative_flips=float(counts[3]))
    return metrics
