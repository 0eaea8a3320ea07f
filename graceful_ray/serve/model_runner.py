"""One registry model, ready to answer batches: the code every replica shares.

The primary runs inside the router and each shadow in its own deployment, but
both go through this class, so their decisions and their latencies are measured
the same way and can be compared fairly by the gates.

Torch runs on a dedicated single thread per model: the replica's event loop
keeps accepting requests (and filling the next batch) while a batch computes,
and a model that blocks (a slow shadow) blocks only its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from graceful_ray.errors import ModelError

# Lazy imports: torch and the registry load only when a model is loaded, so the request kinds import
# without torch.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Decisions (global class ids) and softmax scores for a batch of rows."""

    decisions: np.ndarray          # (n,) int64
    scores: np.ndarray | None      # (n, K) float32, columns in ``classes`` order


class ModelRunner:
    """A registry version loaded for inference, with its own compute thread."""

    def __init__(self, registry_root: str, ref: str, *, device: str = "cpu",
                 torch_threads: int = 1) -> None:
        import torch

        from graceful_ray.registry import load_model

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.manifest, model = load_model(registry_root, ref)
        self.ref = self.manifest.ref
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = np.asarray(self.manifest.classes, dtype=np.int64)
        self.input_shape = tuple(self.manifest.spec.input_shape)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{self.ref}")
        log.info("loaded %s on %s", self.ref, self.device)

    def predict(self, x: np.ndarray, with_scores: bool = True) -> Prediction:
        """Run the model on ``x`` (n, *input_shape or numel) float32, synchronously."""
        import torch

        with torch.inference_mode():
            # Arrays from the object store are read-only; torch wants writable memory.
            x = np.require(x, dtype=np.float32, requirements=["C", "W"])
            logits = self.model(torch.from_numpy(x).to(self.device))
            idx = logits.argmax(dim=1).cpu().numpy()
            scores = torch.softmax(logits.float(), dim=1).cpu().numpy() if with_scores else None
        if idx.shape != (len(x),):
            raise ModelError(f"{self.ref} returned {idx.shape[0]} decisions for {len(x)} rows")
        return Prediction(self.classes[idx], scores)

    async def predict_async(self, x: np.ndarray, with_scores: bool = True) -> Prediction:
        """:meth:`predict` on the model's own thread, awaited from the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.predict, x, with_scores)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """The model's embeddings (n, d) float32 for rows ``x``: the query vectors of a search."""
        import torch

        with torch.inference_mode():
            x = np.require(x, dtype=np.float32, requirements=["C", "W"])
            z = self.model.embed(torch.from_numpy(x).to(self.device))
            return z.float().cpu().numpy()

    async def run_async(self, fn, *args):
        """``fn(*args)`` on the model's own thread (e.g. embed and search), awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def pick_device(num_gpus: float) -> str:
    """``cuda`` when the deployment asked for a GPU and one is visible, else ``cpu``."""
    if num_gpus > 0:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        log.warning("a GPU was requested but torch sees none; running on CPU")
    return "cpu"


def split_rows(items: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Concatenate per-request row blocks into one batch, keeping the cut points."""
    sizes = [len(a) for a in items]
    return (items[0] if len(items) == 1 else np.concatenate(items)), sizes


def cut(pred: Prediction, sizes: list[int]) -> list[Prediction]:
    """The inverse of :func:`split_rows` on a batch's prediction."""
    out, start = [], 0
    for n in sizes:
        out.append(Prediction(pred.decisions[start:start + n],
                              None if pred.scores is None else pred.scores[start:start + n]))
        start += n
    return out


def lower_priority(nice: int, *, idle: bool = False) -> None:
    """Make this (background) process yield the CPU to the primary's processes.

    When the primary runs inside the router, model deployments only ever serve
    shadow copies: best-effort work that must not slow callers down. On a busy
    node the OS scheduler then favours the router and the HTTP proxy.

    Every thread of the process is changed, not just the caller: on Linux a
    niceness belongs to a thread, and a Ray worker's gRPC and core threads (which
    receive and answer each shadow call) already exist when a replica starts.
    Threads started later inherit the setting from the thread that starts them.

    ``idle``: the Linux ``SCHED_IDLE`` policy, under which a thread runs only on a
    CPU that nothing else wants and is preempted as soon as anything else wakes
    there. A niceness only weights the share (Ray already starts its workers at
    niceness 15, so +10 moves a shadow from weight 36 to 15 against the router's
    36); ``SCHED_IDLE`` gives it weight 3 and no claim to preempt the primary.
    """
    if nice <= 0 and not idle:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # pragma: no cover - not Linux: only the calling thread
        tids = [0]
    failed: list[str] = []
    for tid in tids:
        try:
            if nice > 0:
                now = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, now + nice))
            if idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except (OSError, AttributeError) as e:  # pragma: no cover - no such policy here
            failed.append(f"{tid}: {e}")
    if failed:  # pragma: no cover
        log.warning("could not lower the priority of %d of %d threads (%s)", len(failed),
                    len(tids), failed[0])
