"""The contract between training objectives and the trainer.

A method is a small object with one job: given a batch (labels, the new model's
embedding and logits, and the old model's outputs), return the loss and its
named parts. The trainer builds one method per run, calls :meth:`setup` once with
an :class:`UpgradeContext` describing the old model, and then calls :meth:`loss`
on every batch. It never branches on which method it runs.

Methods compose (``"bct+fd"``). So that cross-entropy on the new head is counted
once however many methods are combined, every method only reports its *extra*
terms through :meth:`UpgradeMethod.extra_loss` (already multiplied by their
weight), and cross-entropy is added once by :meth:`UpgradeMethod.loss` or by
:class:`Composite`. The parts of a :class:`LossOutput` always sum to its total.

A method may *replace* cross-entropy as the base term (LQF trains with a squared
loss): it sets ``replaces_base_loss = True`` and overrides :meth:`UpgradeMethod.base_loss`.
At most one method of a composite may do so, so ``"lqf+fd"`` is LQF's squared
loss plus the focal-distillation term, with no cross-entropy.

Trainer hooks, declared on :class:`UpgradeMethod` with the trainer's defaults:
``wrap_model(model)`` (the module to train; the network), ``make_optimizer(model,
lr=..., weight_decay=...)`` (``None``: the trainer's AdamW) and ``export(module)``
(the state dict and format to publish; the network's). A method overrides the
ones it needs; :class:`Composite` hands each hook to the one member that
overrides it (two members overriding the same hook is a configuration error).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graceful_ray.errors import ConfigError


@dataclass
class UpgradeContext:
    """What a method may know about the upgrade, built once before training.

    ``old_classes[j]`` is the global class id of the old head's output ``j`` (an
    id outside ``0..num_classes-1``, e.g. ``-1``, marks a class the new model dropped);
    ``old_class_means`` maps a global class id to the mean old embedding of the
    training samples of that class (BCT synthesizes old-head rows for classes the
    old model never saw from it). Every ``old_*`` field is ``None`` when there is
    no old model (a first version trained with ``plain``).
    """

    num_classes: int
    old_classes: list[int] | None = None
    old_head_weight: Tensor | None = None
    old_head_bias: Tensor | None = None
    old_embedding_dim: int | None = None
    new_embedding_dim: int = 0
    old_class_means: dict[int, Tensor] | None = None
    # The old model's reference, and a loader of registry models the trainer binds
    # to its registry (``load_model(ref, root=None) -> (manifest, model)``):
    # methods that need other models' *weights*, not just the old head (LQF
    # linearizes around the parent's, ELODI's ensemble references), get them
    # through it and never open a registry themselves.
    old_ref: str | None = None
    load_model: Callable[..., tuple[Any, nn.Module]] | None = None
    # Global class id of each new head output (``None``: ``0..num_classes-1``);
    # methods that align other registry models with the new head use it.
    classes: list[int] | None = None

    @property
    def has_old_model(self) -> bool:
        return self.old_classes is not None


@dataclass
class MethodBatch:
    """One training batch as a method sees it.

    ``old_logits`` are in ``UpgradeContext.old_classes`` order. The old outputs
    are constants for the loss (methods detach them), whether they come from the
    cache or from an old model run online on an augmented batch.
    """

    y: Tensor
    new_embedding: Tensor
    new_logits: Tensor
    old_embedding: Tensor | None = None
    old_logits: Tensor | None = None
    old_correct: Tensor | None = None
    # The (augmented) inputs of the batch, for methods that run reference models
    # of their own on it (ELODI with an ensemble reference).
    x: Tensor | None = None


@dataclass
class LossOutput:
    """``total`` to backpropagate and its named, weighted parts (they sum to it)."""

    total: Tensor
    parts: dict[str, Tensor]


def upcast(x: Tensor) -> Tensor:
    """Half-precision tensors (bf16 autocast) to float32 for the loss; float64 stays float64."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def cross_entropy(new_logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of the new head: the term every method shares."""
    return F.cross_entropy(upcast(new_logits), y)


def _suffix(kwarg: str) -> str:
    # ``lambda`` is a Python keyword, so constructors spell it ``lam``.
    return "lambda" if kwarg == "lam" else kwarg


class UpgradeMethod(ABC):
    """Base class of a training objective (one Composer-style algorithm).

    Subclasses set the class attributes and implement :meth:`extra_loss`; their
    constructor keyword arguments *are* their hyperparameters. Those are exposed
    to the registry as ``<prefix>_<name>`` (``lam`` becomes ``lambda``), e.g.
    ``bct_lambda``, so a composite such as ``bct+fd`` routes every value to
    exactly one method.

    Attributes:
        name: the registry name (``"bct"``, ``"fd-kl"`` ...).
        prefix: hyperparameter prefix and the name of the loss part it adds.
        needs_old_model: :meth:`setup` requires the old head / classes.
        needs_old_outputs: every batch must carry the old model's outputs
            (``old_embedding``, ``old_logits``, ``old_correct``).
        compatible: the method aims at an embedding space compatible with the
            old model's, so the trained model shares the old model's space.
        replaces_base_loss: :meth:`base_loss` replaces cross-entropy as the
            shared base term (at most one method per composite).
    """

    name: str = ""
    prefix: str = ""
    needs_old_model: bool = False
    needs_old_outputs: bool = False
    compatible: bool = False
    replaces_base_loss: bool = False

    def __init__(self) -> None:
        self.ctx: UpgradeContext | None = None

    # -- hyperparameters -------------------------------------------------
    @classmethod
    def hyperparameter_names(cls) -> dict[str, str]:
        """``{"<prefix>_<suffix>": constructor kwarg}`` for every hyperparameter."""
        params = inspect.signature(cls.__init__).parameters
        return {f"{cls.prefix}_{_suffix(p)}": p for p in params
                if p != "self" and params[p].kind is inspect.Parameter.KEYWORD_ONLY}

    def hyperparameters(self) -> dict[str, Any]:
        """The effective hyperparameters, prefixed, JSON-serialisable."""
        return {full: getattr(self, kwarg) for full, kwarg in self.hyperparameter_names().items()}

    # -- lifecycle -------------------------------------------------------
    def setup(self, ctx: UpgradeContext) -> None:
        """Validate the upgrade against this method and precompute what it needs."""
        if self.needs_old_model and not ctx.has_old_model:
            raise ConfigError(
                f"method {self.name!r} needs an old model (a parent version) to train against; "
                "train the first version with 'plain'"
            )
        self.ctx = ctx

    def to(self, device: torch.device | str) -> "UpgradeMethod":
        """Move precomputed tensors (e.g. BCT's extended old head) to ``device``."""
        for key, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                setattr(self, key, value.to(device))
        return self

    # -- trainer hooks: a method overrides what it changes --------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the trainer optimises: the network itself."""
        return model

    def make_optimizer(self, model: nn.Module, *, lr: float,
                       weight_decay: float = 0.0) -> torch.optim.Optimizer | None:
        """The optimizer for ``model``; ``None`` lets the trainer use its own (AdamW)."""
        return None

    def export(self, module: nn.Module) -> tuple[dict[str, Tensor], str]:
        """``(state dict, format)`` to publish: the trained network's, format ``network``."""
        return module.state_dict(), "network"

    # -- the loss --------------------------------------------------------
    @abstractmethod
    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        """The method's weighted terms beyond cross-entropy, by part name."""

    def base_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        """The base term(s) every objective starts from: cross-entropy, unless a
        method with ``replaces_base_loss`` overrides this."""
        return {"ce": cross_entropy(batch.new_logits, batch.y)}

    def loss(self, batch: MethodBatch) -> LossOutput:
        """The base loss (cross-entropy unless replaced) plus this method's extra terms."""
        return _combine(batch, [self])

    # -- helpers for subclasses -------------------------------------------
    def _require_setup(self) -> UpgradeContext:
        if self.ctx is None:
            raise ConfigError(f"method {self.name!r}: call setup(ctx) before loss()")
        return self.ctx

    def _require(self, batch: MethodBatch, *fields: str) -> list[Tensor]:
        out = []
        for f in fields:
            value = getattr(batch, f)
            if value is None:
                raise ConfigError(
                    f"method {self.name!r} needs {f} in every batch; the trainer must compute "
                    "the old model's outputs (cache or online) when needs_old_outputs is True"
                )
            out.append(value)
        return out

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hp})"


def _check_batch(batch: MethodBatch) -> None:
    if batch.y.dim() != 1 or batch.new_logits.dim() != 2 or batch.new_logits.shape[0] != batch.y.shape[0]:
        raise ConfigError(
            f"batch shapes do not fit: labels {tuple(batch.y.shape)} must be (B,) and new logits "
            f"{tuple(batch.new_logits.shape)} must be (B, K)"
        )


def _base_owner(methods: list[UpgradeMethod]) -> UpgradeMethod | None:
    owners = [m for m in methods if m.replaces_base_loss]
    if len(owners) > 1:
        raise ConfigError(f"methods {[m.name for m in owners]} each replace the base loss; "
                          "combine at most one of them")
    return owners[0] if owners else None


def _combine(batch: MethodBatch, methods: list[UpgradeMethod]) -> LossOutput:
    _check_batch(batch)
    owner = _base_owner(methods)
    parts: dict[str, Tensor] = (dict(owner.base_loss(batch)) if owner is not None
                                else {"ce": cross_entropy(batch.new_logits, batch.y)})
    for m in methods:
        for key, value in m.extra_loss(batch).items():
            if key in parts:
                raise ConfigError(f"two methods report a loss part named {key!r}; part names must be unique")
            parts[key] = value
    total = sum(parts.values())
    assert isinstance(total, Tensor)
    return LossOutput(total=total, parts=parts)


TRAINER_HOOKS = ("wrap_model", "make_optimizer", "export")


def _hook_owner(methods: list[UpgradeMethod], hook: str) -> UpgradeMethod | None:
    """The one member that overrides ``hook`` (None: none does; two is an error)."""
    have = [m for m in methods if getattr(type(m), hook) is not getattr(UpgradeMethod, hook)]
    if len(have) > 1:
        raise ConfigError(f"methods {[m.name for m in have]} both define {hook!r}; "
                          "combine at most one of them")
    return have[0] if have else None


class Composite(UpgradeMethod):
    """Several methods trained together: the base loss once (cross-entropy, unless a
    member replaces it) plus each one's extra terms.

    :func:`graceful_ray.methods.build_method` always returns a composite (of one
    method when the spec names one), so the trainer sees a single type.
    """

    prefix = ""

    def __init__(self, methods: list[UpgradeMethod]) -> None:
        super().__init__()
        if not methods:
            raise ConfigError("a composite method needs at least one method")
        self.methods = list(methods)
        self.name = "+".join(m.name for m in self.methods)
        self.needs_old_model = any(m.needs_old_model for m in self.methods)
        self.needs_old_outputs = any(m.needs_old_outputs for m in self.methods)
        self.compatible = any(m.compatible for m in self.methods)
        owner = _base_owner(self.methods)
        self.replaces_base_loss = owner is not None
        self._hook_owner = {hook: _hook_owner(self.methods, hook) for hook in TRAINER_HOOKS}

    def overrides(self, hook: str) -> bool:
        """Whether a member overrides the trainer hook ``hook``."""
        return self._hook_owner[hook] is not None

    # each hook goes to the member that overrides it, else the default
    def wrap_model(self, model: nn.Module) -> nn.Module:
        owner = self._hook_owner["wrap_model"]
        return owner.wrap_model(model) if owner is not None else super().wrap_model(model)

    def make_optimizer(self, model: nn.Module, *, lr: float,
                       weight_decay: float = 0.0) -> torch.optim.Optimizer | None:
        owner = self._hook_owner["make_optimizer"]
        return owner.make_optimizer(model, lr=lr, weight_decay=weight_decay) if owner is not None else None

    def export(self, module: nn.Module) -> tuple[dict[str, Tensor], str]:
        owner = self._hook_owner["export"]
        return owner.export(module) if owner is not None else super().export(module)

    def hyperparameters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.methods:
            out.update(m.hyperparameters())
        return out

    def setup(self, ctx: UpgradeContext) -> None:
        for m in self.methods:
            m.setup(ctx)
        self.ctx = ctx

    def to(self, device: torch.device | str) -> "Composite":
        for m in self.methods:
            m.to(device)
        return self

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for m in self.methods:
            out.update(m.extra_loss(batch))
        return out

    def base_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        owner = _base_owner(self.methods)
        return owner.base_loss(batch) if owner is not None else super().base_loss(batch)

    def loss(self, batch: MethodBatch) -> LossOutput:
        return _combine(batch, self.methods)

    def __repr__(self) -> str:
        return f"Composite({self.methods!r})"


def shared_class_index(old_classes: list[int], num_classes: int) -> tuple[Tensor, Tensor]:
    """Positions of the classes both heads know: ``(old_positions, new_columns)``.

    The new head's column for a class is its global id; the old head's position
    is its index in ``old_classes``. Old classes outside ``0..num_classes-1``
    (dropped in the new version) are left out.
    """
    old_pos = [j for j, c in enumerate(old_classes) if 0 <= int(c) < num_classes]
    new_col = [int(old_classes[j]) for j in old_pos]
    return torch.tensor(old_pos, dtype=torch.long), torch.tensor(new_col, dtype=torch.long)


def check_nonnegative(method: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:  # also rejects NaN
            raise ConfigError(f"{method}: {key} must be >= 0, got {value!r}")


def check_positive(method: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{method}: {key} must be > 0, got {value!r}")
