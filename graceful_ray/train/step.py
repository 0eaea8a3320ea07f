"""One training step and the old model's outputs for it, free of Ray.

The Ray Train loop (:mod:`graceful_ray.train.loop`), the benchmarks and the
tests all train through :func:`train_step`, so they measure and check the same
step. Where a batch's old-model outputs come from is an :class:`OldOutputs`
source: the cached columns of the same rows, the old model run online on the
(augmented) batch, or none (a first version).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from graceful_ray.methods import MethodBatch
from graceful_ray.train.pipeline import INPUT

Old = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # embedding, logits, correct


class OldOutputs:
    """No old model: the plain first version."""

    name = "none"

    def __call__(self, batch: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Old:
        return None, None, None


class CachedOldOutputs(OldOutputs):
    """The old model's outputs cached beside the data, streamed as columns of the batch."""

    name = "cache"

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, batch, x, y) -> Old:
        return tuple(batch[c].to(self.device, non_blocking=True)  # type: ignore[return-value]
                     for c in ("old_embedding", "old_logits", "old_correct"))


class OnlineOldOutputs(OldOutputs):
    """The old model run on the batch the new one sees (augmented inputs), in fp32."""

    name = "online"

    def __init__(self, model: nn.Module, class_ids: torch.Tensor):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.class_ids = class_ids  # old head position -> label position in the new head

    def __call__(self, batch, x, y) -> Old:
        with torch.no_grad():
            emb, logits = self.model.forward_features(x)
        return emb.float(), logits.float(), self.class_ids[logits.argmax(1)] == y


def train_step(x: torch.Tensor, y: torch.Tensor, old: Old, *, forward: Callable, method,
               optimizer: torch.optim.Optimizer, scheduler=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, the method's loss, backward and an optimizer step; returns the
    (detached) total loss and its parts."""
    emb, logits = forward(x)
    old_emb, old_logits, old_correct = old
    out = method.loss(MethodBatch(y=y, new_embedding=emb, new_logits=logits, old_embedding=old_emb,
                                  old_logits=old_logits, old_correct=old_correct, x=x))
    return apply_gradients(out.total, out.parts, optimizer=optimizer, scheduler=scheduler)


def apply_gradients(total: torch.Tensor, parts: dict[str, torch.Tensor], *, optimizer: torch.optim.Optimizer,
                    scheduler=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward of ``total`` and an optimizer (and scheduler) step: the end of every
    training step, whatever computed the loss."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return total.detach(), {k: v.detach() for k, v in parts.items()}


def run_epoch(batches: Iterator[dict[str, torch.Tensor]], *, device: torch.device, forward: Callable, method,
              optimizer: torch.optim.Optimizer, scheduler=None, old: OldOutputs | None = None,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
              all_have_next: Callable[[bool], bool] = lambda mine: mine) -> EpochStats:
    """Train an upgrade method on every batch of one epoch. ``all_have_next``: whether
    every rank has a next batch (DDP needs the ranks in lockstep; a single process just
    asks itself)."""
    old = old or OldOutputs()

    def step(batch):
        x = batch[INPUT].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        return (len(y), *train_step(x, y, old(batch, x, y), forward=forward, method=method,
                                    optimizer=optimizer, scheduler=scheduler))

    return run_steps(batches, step, all_have_next=all_have_next)


def run_steps(batches: Iterator[dict[str, torch.Tensor]],
              step: Callable[[dict[str, torch.Tensor]], tuple[int, torch.Tensor, dict[str, torch.Tensor]]], *,
              all_have_next: Callable[[bool], bool] = lambda mine: mine) -> EpochStats:
    """One epoch of ``step(batch) -> (rows, loss, parts)`` over ``batches``, the ranks
    in lockstep: every rank stops at the first batch one of them does not have."""
    stats = EpochStats()
    while True:
        batch = next(batches, None)
        if not all_have_next(batch is not None):
            break
        stats.add(*step(batch))
    for _ in batches:  # a rank stopped by another's end still finishes its pass (a cache fills then)
        pass
    return stats


@dataclass
class EpochStats:
    """Rows, steps and row-weighted loss sums of one epoch on one rank."""

    rows: int = 0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, rows: int, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.rows += rows
        self.steps += 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(total) * rows
        for name, part in parts.items():
            self.sums[f"loss_{name}"] = self.sums.get(f"loss_{name}", 0.0) + float(part) * rows
