"""What the driver hands each Ray Train worker, typed.

:func:`graceful_ray.train.trainer.prepare_upgrade` builds one :class:`LoopConfig`
before any worker starts; :func:`graceful_ray.train.loop.train_loop_per_worker`
reads it. Everything in it pickles (NumPy, not tensors), since Ray ships it to
every worker. :func:`upgrade_context` is the one place that turns it into the
method's :class:`~graceful_ray.methods.UpgradeContext`, for the driver's checks,
the workers and the export at publish time alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from graceful_ray.methods import UpgradeContext
from graceful_ray.models import ModelSpec
from graceful_ray.paths import registry_root
from graceful_ray.registry import load_model
from graceful_ray.train.config import UpgradeConfig


@dataclass(frozen=True)
class OldModelFacts:
    """What the methods may know of the old model, in the new head's class positions."""

    ref: str  # name@vN
    class_positions: list[int]  # old head output j -> new head position (-1: a class the new model dropped)
    head_weight: np.ndarray
    head_bias: np.ndarray
    embedding_dim: int
    class_means: dict[int, np.ndarray]  # new head position -> mean old embedding of its training rows


@dataclass
class LoopConfig:
    """The worker loop's input: the run's config, the model, the classes, the old model."""

    run: UpgradeConfig
    spec: ModelSpec
    classes: list[int]  # label of each new head position
    old: OldModelFacts | None
    train_rows: int
    method_hparams: dict
    method_compatible: bool
    failure_marker: str | None = None  # test hook: see UpgradeConfig.fail_at_epoch

    @property
    def has_cached_old_outputs(self) -> bool:
        """Old-model outputs stream as columns of the rows whenever there is an old model."""
        return self.old is not None

    def upgrade_context(self, new_embedding_dim: int) -> UpgradeContext:
        return upgrade_context(self.classes, self.old, registry=self.run.registry,
                               new_embedding_dim=new_embedding_dim)


def upgrade_context(classes: Sequence[int], old: OldModelFacts | None, *, registry: str | None,
                    new_embedding_dim: int) -> UpgradeContext:
    """The method's view of the upgrade (every ``old_*`` field ``None`` without an old model)."""
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32)

    return UpgradeContext(
        num_classes=len(classes),
        old_classes=list(old.class_positions) if old else None,
        old_head_weight=t(old.head_weight) if old else None,
        old_head_bias=t(old.head_bias) if old else None,
        old_embedding_dim=old.embedding_dim if old else None,
        new_embedding_dim=new_embedding_dim,
        old_class_means={int(k): t(v) for k, v in old.class_means.items()} if old else None,
        old_ref=old.ref if old else None, load_model=RegistryModels(registry), classes=list(classes),
    )


@dataclass(frozen=True)
class RegistryModels:
    """``UpgradeContext.load_model``: registry models for a method, from the run's
    registry (or ``root``), so no method opens a registry itself."""

    root: str | None

    def __call__(self, ref: str, root: str | None = None):
        return load_model(root or self.root or registry_root(), ref)
