"""Forward-compatible transformation: upgrade stored embeddings without the raw inputs.

Ramanujan et al. (FCT, CVPR 2022): learn a small map ``h`` with
``h(phi_old(x)) ~ phi_new(x)`` on data the owner still has (a training split),
then apply it to every stored gallery vector. The gallery moves to the new
model's embedding space in minutes of vector math, with no access to the images
it indexes; a later backfill can still replace the transformed vectors with
real ones, most uncertain first.

Training runs on **Ray Train**: a Ray Data batch-inference pass embeds the
training and validation splits with both models (old and new side by side in
one actor), and a ``TorchTrainer`` fits ``h`` on those pairs with a cosine
loss (retrieval ranks by cosine) plus a relative MSE (keeps the scale), reporting
validation cosine every epoch with a checkpoint, resumable by run name. Its
workers run on the upgrade loop's scaffold (streamed shards, ``run_steps``,
checkpoints: :mod:`graceful_ray.train.worker`).

``h`` is ``LayerNorm -> linear skip + 2-layer MLP``: the skip carries the part
of the map that is linear, the MLP what is not; both dimensions may differ.

An artifact is a directory: ``transform.safetensors`` and ``transform.json``
(written last: its presence is the commit) naming the old and new models and
spaces, the architecture, and the validation metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graceful_ray.data import read_info
from graceful_ray.errors import ConfigError
from graceful_ray.paths import project_root
from graceful_ray.retrieval.embed import embed_dataset
from graceful_ray.retrieval.errors import EmbeddingSpaceError, GalleryError
from graceful_ray.retrieval.gallery import Gallery, Snapshot, embeddings_array, make_rows, utc_now
from graceful_ray.retrieval.index import IndexConfig
from graceful_ray.storage import resolve

# Lazy imports: torch and Ray Train load only when a transform is trained or applied, not for its
# configuration.

log = logging.getLogger(__name__)

META_FILE = "transform.json"
WEIGHTS_FILE = "transform.safetensors"


def build_transform_module(d_in: int, d_out: int, hidden: int = 256):
    import torch
    from torch import nn

    class ResidualMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d_in)
            self.skip = nn.Linear(d_in, d_out)
            self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU(), nn.Linear(hidden, d_out))

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            z = self.norm(z)
            return self.skip(z) + self.mlp(z)

    return ResidualMLP()


def transform_loss(pred, target, mse_weight: float = 1.0):
    """``1 - cos`` (what retrieval ranks by) plus MSE relative to the target's energy."""
    import torch.nn.functional as F

    cos = F.cosine_similarity(pred, target, dim=1).mean()
    rel_mse = (pred - target).pow(2).sum(1).mean() / target.pow(2).sum(1).mean().clamp_min(1e-12)
    return (1.0 - cos) + mse_weight * rel_mse, cos, rel_mse


@dataclass
class TransformConfig:
    """Train ``h: old space -> new space`` on a dataset's splits (raw inputs the owner still has)."""

    data: str
    old: str  # name@vN of the model that embedded the gallery
    new: str  # name@vN of the model to move the gallery to
    registry: str | None = None
    out: str | None = None  # artifact directory; default <root>/transforms/<id>
    train_split: str = "train"
    val_split: str = "val"
    hidden: int = 256
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    mse_weight: float = 1.0
    seed: int = 0
    workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_failures: int = 0
    storage: str | None = None  # Ray Train run storage; default <root>/runs
    run_name: str | None = None
    num_cpus: float = 0.5  # the embedding actor's
    # The worker's input pipeline (as UpgradeConfig's): a local shuffle buffer, and a
    # split kept in memory after its first streamed pass when it fits this budget.
    shuffle_buffer_rows: int = 4096
    cache_budget_mb: float = 1024.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 1:
            raise ConfigError("epochs, batch_size and hidden must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def resolved(self) -> "TransformConfig":
        root = project_root()
        tid = self.run_name or f"transform-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        d = asdict(self)
        d.update(registry=self.registry or os.path.join(root, "registry"),
                 storage=self.storage or os.path.join(root, "runs"), run_name=tid,
                 out=self.out or os.path.join(root, "transforms", tid))
        return TransformConfig(**d)


@dataclass
class Transform:
    """A trained transformation, ready to apply to stored embeddings."""

    meta: dict[str, Any]
    module: Any = field(repr=False)

    @property
    def id(self) -> str:
        return self.meta["id"]

    def apply(self, embeddings: np.ndarray, batch_rows: int = 65_536) -> np.ndarray:
        import torch

        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.meta["d_in"]:
            raise GalleryError(f"transform {self.id} maps {self.meta['d_in']}-d embeddings of "
                               f"{self.meta['old']}; got shape {x.shape}")
        out = np.empty((len(x), self.meta["d_out"]), dtype=np.float32)
        with torch.no_grad():
            for s in range(0, len(x), batch_rows):
                out[s:s + batch_rows] = self.module(torch.from_numpy(x[s:s + batch_rows])).numpy()
        return out


def load_transform(uri: str) -> Transform:
    import safetensors.torch

    loc = resolve(uri)
    meta_loc = loc.join(META_FILE)
    if not meta_loc.exists():
        raise GalleryError(f"no transformation at {loc.uri} ({META_FILE} missing): train one with "
                           "`graceful-ray gallery transform --old ... --new ... --data ...`")
    meta = json.loads(meta_loc.read_bytes())
    data = loc.join(WEIGHTS_FILE).read_bytes()

    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise GalleryError(f"{loc.join(WEIGHTS_FILE).uri} does not match the sha256 in {META_FILE}")
    module = build_transform_module(meta["d_in"], meta["d_out"], meta["hidden"])
    module.load_state_dict(safetensors.torch.load(data))
    module.eval()
    return Transform(meta, module)


# ------------------------------------------------------------ Ray Train loop
TARGET = "target"  # the new model's embedding of the row; the input (pipeline.INPUT) is the old one's


def pair_batch(batch) -> dict[str, np.ndarray]:
    """Embedded rows -> (old embedding, new embedding, row key) arrays (runs in Ray Data tasks)."""
    from graceful_ray.train.pipeline import INPUT, ROW_KEY, row_keys, vectors

    return {INPUT: vectors(batch.column("embedding")).astype(np.float32, copy=False),
            TARGET: vectors(batch.column("embedding2")).astype(np.float32, copy=False),
            ROW_KEY: row_keys(batch.column("id"))}


@dataclass(frozen=True)
class TransformLoop:
    """What each worker of the transformation's loop gets (typed; under ``LOOP_KEY``)."""

    run: TransformConfig
    d_in: int
    d_out: int
    train_rows: int


def _transform_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Fit ``h`` with the upgrade loop's worker scaffold: streamed shards
    (graceful_ray.train.pipeline), ``run_steps`` in lockstep, resume and per-epoch
    checkpoints (graceful_ray.train.worker)."""
    # Lazy, as everywhere in this module: the gallery commands that only apply a
    # transformation must not pay for importing Ray Train and torch.
    import ray.train
    import ray.train.torch
    import torch

    from graceful_ray.train.loop import LOOP_KEY
    from graceful_ray.train.pipeline import INPUT, StreamedSplit, rows_of_rank
    from graceful_ray.train.step import apply_gradients, run_steps
    from graceful_ray.train.worker import (all_ranks_have, all_reduce_sum, lockstep_group, make_scheduler,
                                           report_epoch, resume, world)

    loop: TransformLoop = config[LOOP_KEY]
    cfg = loop.run
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    rank, world_size = world()
    budget = int(cfg.cache_budget_mb * 2**20)
    train = StreamedSplit(ray.train.get_dataset_shard("train"), batch_size=cfg.batch_size,
                          shuffle_buffer_rows=cfg.shuffle_buffer_rows, cache_bytes=budget,
                          seed=cfg.seed * 7919 + rank)
    val = StreamedSplit(ray.train.get_dataset_shard("val"), batch_size=8192, cache_bytes=budget,
                        keep=rows_of_rank(rank, world_size))
    model = build_transform_module(loop.d_in, loop.d_out, cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, -(-(loop.train_rows // world_size) // cfg.batch_size))  # equal shards: the same on every rank
    sched = make_scheduler(opt, "cosine", cfg.epochs * steps)
    start, history = resume(ray.train.get_checkpoint(), model, opt, sched, model_file=WEIGHTS_FILE)
    trainable = ray.train.torch.prepare_model(model)
    lockstep = lockstep_group(device, world_size)

    def step(batch):
        x = batch[INPUT].to(device, non_blocking=True)
        loss, _, _ = transform_loss(trainable(x), batch[TARGET].to(device, non_blocking=True), cfg.mse_weight)
        return (len(x), *apply_gradients(loss, {}, optimizer=opt, scheduler=sched))

    for epoch in range(start, cfg.epochs):
        trainable.train()
        stats = run_steps(train.epoch(epoch), step,
                          all_have_next=lambda mine: all_ranks_have(mine, world_size, lockstep))
        trainable.eval()
        sums = torch.zeros(5, dtype=torch.float64)  # val rows, cos * rows, rel MSE * rows, train rows, loss sum
        with torch.no_grad():
            for batch in val.epoch(epoch):
                n = len(batch[INPUT])
                _, cos_mean, rel = transform_loss(trainable(batch[INPUT].to(device)), batch[TARGET].to(device),
                                                  cfg.mse_weight)
                sums[:3] += torch.tensor([n, float(cos_mean) * n, float(rel) * n], dtype=torch.float64)
        sums[3:] = torch.tensor([stats.rows, stats.sums.get("loss", 0.0)], dtype=torch.float64)
        sums = all_reduce_sum(sums.to(device)).cpu()
        metrics = {"epoch": epoch + 1, "train_loss": float(sums[4] / max(sums[3], 1)),
                   "val_cosine": float(sums[1] / max(sums[0], 1)),
                   "val_rel_mse": float(sums[2] / max(sums[0], 1)), "val_rows": float(sums[0])}
        history.append(metrics)
        report_epoch(metrics, rank=rank, epoch=epoch, history=history, model=model, optimizer=opt,
                     scheduler=sched, model_file=WEIGHTS_FILE)
    return {"history": history}


def train_transform(cfg: TransformConfig) -> Transform:
    """Fit ``h`` on (old, new) embedding pairs with Ray Train; save and return it."""

    import safetensors.torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from graceful_ray.registry import Registry
    from graceful_ray.train.loop import LOOP_KEY
    from graceful_ray.train.trainer import fit

    cfg = cfg.resolved()
    reg = Registry(cfg.registry)
    old, new = reg.get(cfg.old), reg.get(cfg.new)
    if old.embedding_space == new.embedding_space:
        log.warning("%s and %s already share space %r: a transformation is not needed", old.ref,
                    new.ref, old.embedding_space)
    datasets = {}
    for key, split in (("train", cfg.train_split), ("val", cfg.val_split)):
        ds, _ = embed_dataset(cfg.data, split, registry_root=cfg.registry, model_ref=old.ref,
                              second_model_ref=new.ref, num_cpus=cfg.num_cpus)
        datasets[key] = ds.map_batches(pair_batch, batch_format="pyarrow", num_cpus=min(1.0, cfg.num_cpus))
    storage = resolve(cfg.storage)
    loop = TransformLoop(run=cfg, d_in=old.embedding_dim, d_out=new.embedding_dim,
                         train_rows=int(read_info(cfg.data).splits[cfg.train_split].rows))
    trainer = TorchTrainer(
        _transform_loop, train_loop_config={LOOP_KEY: loop},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage.path,
                             storage_filesystem=None if storage.is_local else storage.fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        # Only the training set is split; every worker streams all of val and evaluates its rows.
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))
    t0 = time.perf_counter()
    result = fit(trainer)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        state = safetensors.torch.load_file(os.path.join(d, WEIGHTS_FILE))
        with open(os.path.join(d, "state.json")) as f:
            history = json.load(f)["history"]
    data = safetensors.torch.save(state)
    tid = os.path.basename(cfg.out.rstrip("/"))
    meta = {"id": tid, "old": old.ref, "new": new.ref, "old_space": old.embedding_space,
            "new_space": new.embedding_space, "d_in": old.embedding_dim, "d_out": new.embedding_dim,
            "hidden": cfg.hidden, "architecture": "layernorm + linear skip + 2-layer MLP",
            "loss": f"1 - cos + {cfg.mse_weight} * relative MSE", "data": cfg.data,
            "train_split": cfg.train_split, "val_split": cfg.val_split, "epochs": cfg.epochs,
            "metrics": history[-1] if history else {}, "history": history,
            "train_s": time.perf_counter() - t0, "run_name": cfg.run_name,
            "sha256": hashlib.sha256(data).hexdigest(), "created_at": utc_now()}
    out = resolve(cfg.out)
    out.join(WEIGHTS_FILE).write_bytes(data)
    out.join(META_FILE).write_bytes(json.dumps(meta, indent=1).encode())  # the commit: last
    log.info("transformation %s -> %s trained (val cosine %.3f), saved to %s", old.ref, new.ref,
             meta["metrics"].get("val_cosine", float("nan")), out.uri)
    return load_transform(out.uri)


def fit_transform_local(old_emb: np.ndarray, new_emb: np.ndarray, *, old: str, new: str,
                        old_space: str, new_space: str, hidden: int = 256, epochs: int = 30,
                        batch_size: int = 256, lr: float = 2e-3, weight_decay: float = 1e-4,
                        mse_weight: float = 1.0, seed: int = 0) -> Transform:
    """Fit ``h`` in this process on given pairs (same loss and model as the Ray Train loop).

    For pairs already in memory and for tests; :func:`train_transform` is the
    Ray Train path that also computes the pairs.
    """
    import torch

    from graceful_ray.train.step import apply_gradients

    torch.manual_seed(seed)
    x = torch.as_tensor(np.ascontiguousarray(old_emb, dtype=np.float32))
    y = torch.as_tensor(np.ascontiguousarray(new_emb, dtype=np.float32))
    module = build_transform_module(x.shape[1], y.shape[1], hidden)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, -(-len(x) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for step in range(steps):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss, _, _ = transform_loss(module(x[idx]), y[idx], mse_weight)
            apply_gradients(loss, {}, optimizer=opt, scheduler=sched)
    module.eval()
    with torch.no_grad():
        _, cos, rel = transform_loss(module(x), y, mse_weight)
    meta = {"id": f"local-{uuid.uuid4().hex[:8]}", "old": old, "new": new, "old_space": old_space,
            "new_space": new_space, "d_in": int(x.shape[1]), "d_out": int(y.shape[1]), "hidden": hidden,
            "metrics": {"train_cosine": float(cos), "train_rel_mse": float(rel)}, "created_at": utc_now()}
    return Transform(meta, module)


def apply_transform(gallery: str, transform: str | Transform, *, registry: str | None = None,
                    keep: int = 3) -> Snapshot:
    """Move every row of the gallery from the transform's old space to its new space (one commit).

    Searchers whose query model lives in the old space keep serving the
    previous snapshot until they switch to the new model.
    """

    t = transform if isinstance(transform, Transform) else load_transform(transform)
    g = Gallery(gallery)
    head = g.require_head()
    if head.pending:
        raise GalleryError(f"a staged backfill ({head.pending.get('run')}) is in progress on {g.uri}; "
                           "finish it before transforming the gallery")
    if head.embedding_space != t.meta["old_space"]:
        raise EmbeddingSpaceError(
            f"transformation {t.id} maps space {t.meta['old_space']!r} ({t.meta['old']}) to "
            f"{t.meta['new_space']!r} ({t.meta['new']}), but gallery {g.uri} is in space "
            f"{head.embedding_space!r} (models {sorted(head.models)}); train a transformation from "
            "the gallery's model", query=t.meta["new"], gallery_models=sorted(head.models))
    rows = g.read_rows(head)
    moved = t.apply(embeddings_array(rows))
    new_rows = make_rows(rows.column("id"), moved, model_version=rows.column("model_version"),
                         embedding_space=t.meta["new_space"], labels=_labels(rows),
                         transform=t.id)
    seg = g.write_segment(new_rows)
    try:
        snap, _ = g.publish(new_rows, parent=head, segments=[seg],
                            index_config=IndexConfig.from_dict(head.index.get("config")),
                            transforms={**head.transforms, t.id: {"old": t.meta["old"], "new": t.meta["new"],
                                                                  "old_space": t.meta["old_space"],
                                                                  "new_space": t.meta["new_space"]}},
                            keep=keep,
                            note=f"transformed by {t.id}: {t.meta['old']} -> space {t.meta['new_space']!r}")
    except BaseException:
        g.discard_segments([seg])
        raise
    return snap


def _labels(rows) -> np.ndarray | None:
    col = rows.column("label")
    return None if col.null_count == rows.num_rows else col.fill_null(-1).to_numpy(zero_copy_only=False)
