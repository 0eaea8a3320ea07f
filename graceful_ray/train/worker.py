"""The Ray Train worker scaffold both training loops share.

The upgrade loop (:mod:`graceful_ray.train.loop`) and the gallery
transformation's loop (:mod:`graceful_ray.retrieval.transform`) both: find their
rank, keep the ranks in lockstep, sum metrics over ranks, resume from the latest
checkpoint and report one checkpoint per epoch from rank 0. What they train
differs; how they run on Ray Train does not, and lives here.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import threading
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

# Lazy imports: Ray Train loads only inside a worker, so the checkpoint helpers import without Ray.

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def world() -> tuple[int, int]:
    """(rank, world size) of this worker."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def peak_rss_mb(device: torch.device) -> float:
    """The largest peak resident memory of any rank so far (what a memory cap must hold)."""
    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64,
                     device=device)  # ru_maxrss is in KiB on Linux
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def lockstep_group(device: torch.device, world_size: int):
    """A CPU (gloo) process group for the per-step "do all ranks have a batch?" check:
    on GPUs an NCCL all-reduce read back with ``.item()`` would make the host wait for
    the step's queued kernels every step. ``None``: the default group (gloo on CPU)."""
    if world_size > 1 and device.type == "cuda" and dist.is_available() and dist.is_initialized():
        return dist.new_group(backend="gloo")
    return None


def all_ranks_have(mine: bool, world_size: int, group=None) -> bool:
    """Whether every rank has a next batch (one tiny CPU all-reduce per step)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return mine
    t = torch.tensor([int(mine)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """Cosine decay to 0 over ``total_steps``, or a constant lr (still a scheduler, so
    checkpoints have the same shape)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def save_checkpoint(directory: str, model: nn.Module, optimizer, scheduler, state: dict,
                    model_file: str = MODEL_FILE) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, model_file))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def load_checkpoint_dir(directory: str, model_file: str = MODEL_FILE) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model state, optimizer+scheduler state, progress) from a checkpoint dir."""

    model_state = load_file(os.path.join(directory, model_file))
    opt = torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True, map_location="cpu")
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    return model_state, opt, state


def resume(checkpoint, model: nn.Module, optimizer, scheduler,
           model_file: str = MODEL_FILE) -> tuple[int, list[dict[str, Any]]]:
    """Load ``checkpoint`` (if any) into the model, optimizer and scheduler; returns
    (first epoch to run, history so far)."""
    if not checkpoint:
        return 0, []
    with checkpoint.as_directory() as d:
        model_state, opt_state, state = load_checkpoint_dir(d, model_file)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    return state["epoch"] + 1, state["history"]


def report_epoch(metrics: dict[str, Any], *, rank: int, epoch: int, history: list[dict[str, Any]], model: nn.Module,
                 optimizer, scheduler, model_file: str = MODEL_FILE, persist=None) -> None:
    """``ray.train.report`` the epoch's metrics with rank 0's checkpoint of it.
    ``persist(directory, epoch)``: where a checkpoint must outlive the call (local mode)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(tmp, model, optimizer, scheduler, {"epoch": epoch, "history": history}, model_file)
            ckpt = persist(tmp, epoch) if persist else ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def memory_now() -> dict[str, int]:
    """This process's resident memory, in bytes (Linux ``/proc/self/status``): ``rss`` in
    all, ``anon`` its own (heap, tensors), ``shmem`` shared pages it has mapped (Ray's
    object store blocks it reads zero-copy), ``file`` mapped files (libraries)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem", "RssFile": "file"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                out[fields[name]] = int(value.split()[0]) * 1024  # kB
    return out


class MemoryWatch:
    """A daemon thread that samples this worker's resident memory (20 times a second),
    keeps the peak of each part, and enforces ``cap_mb`` on the worker's own memory
    (``anon``) when given: a worker past it is killed (SIGKILL, as the kernel's OOM
    killer would, but at our limit and with a message saying why).

    Ray's ``memory`` resource only reserves memory when scheduling; nothing in Ray
    stops a worker that uses more than it reserved until the whole node runs low.
    This makes the reservation a limit (``UpgradeConfig.memory_per_worker_mb``).
    The limit is on the worker's own memory, as Ray's ``memory`` resource is (heap,
    not object store): the object-store blocks a worker reads zero-copy count in its
    RSS as shared pages, but they are the object store's, bounded by its own size.
    Capping the whole RSS stopped a worker streaming 80k images at 900 MiB with 328
    MiB of such pages (benchmarks/results/train_streaming.md).
    """

    def __init__(self, cap_mb: float = 0.0, interval_s: float = 0.05):
        self.cap = int(cap_mb * 2**20)
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="graceful-ray-memory-watch", daemon=True)

    def start(self) -> "MemoryWatch":
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def peak_mb(self, device: torch.device) -> dict[str, float]:
        """Peak MiB of each part, the max over ranks."""
        names = sorted(self.peak)
        t = torch.tensor([self.peak[k] / 2**20 for k in names], dtype=torch.float64, device=device)
        if _distributed():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(names, t.tolist()))

    def _sample(self) -> int:
        now = memory_now()
        for k, v in now.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        return now.get("anon", 0)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            own = self._sample()
            if self.cap and own > self.cap:
                sys.stderr.write(f"graceful-ray: this worker's own memory ({own / 2**20:.0f} MiB resident, "
                                 f"not counting object-store pages) passed memory_per_worker_mb="
                                 f"{self.cap / 2**20:.0f}; stopping it\n")
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
