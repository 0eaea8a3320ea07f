"""Focal distillation (positive-congruent training, Yan et al., CVPR 2021).

``L = CE + lambda * mean_i [(alpha + beta * 1[old correct on i]) * D(new_i, old_i)]``

Distillation is weighted toward the samples the old model got right: the new
model mimics the old one where it is right, not where it is wrong, which lowers
the negative flip rate at almost no cost in accuracy. ``D`` is either

* ``kl``: ``T^2 * KL(softmax(old/T) || softmax(new/T))``; the paper needs a high
  temperature (T = 100), small T barely lowers NFR;
* ``lm``: logit matching, ``0.5 * ||new - old||^2`` summed over classes;
* ``lm-std``: logit matching on standardized logits, ``0.5 * ||z(new) - z(old)||^2``
  with ``z(l) = (l - mean(l)) / std(l)`` over the classes of one sample (logit
  standardization, Sun et al., CVPR 2024). It matches the *shape* of the old
  model's class preferences but not their scale. Raw ``lm`` also pulls the new
  logits to the old model's scale, which cross-entropy keeps pushing up: on
  MNIST-1D (old logits with std ~11) that fight dominates the loss at any
  lambda that lowers flips, and ``lm`` raised NFR; ``lm-std`` at lambda ~0.1
  lowers it (``benchmarks/results/upgrade_methods.md``).

The paper's recipe is alpha = 1, beta = 5, lambda = 1 (beta = 20 breaks
training). alpha = 1, beta = 0 is plain knowledge distillation (``kd``), a
baseline. When the old and new class sets differ, only the shared classes are
distilled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graceful_ray.errors import ConfigError
from graceful_ray.methods.base import (MethodBatch, UpgradeContext, UpgradeMethod, check_nonnegative,
                                       check_positive, shared_class_index, upcast)
from graceful_ray.methods.registry import register_method

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
# Tune's ranges: distillation weights span six decades on purpose. The useful scale
# of logit matching depends on the old model's logit magnitude (``sum_k z_k^2`` is
# ~2,000 for a cnn1d trained to convergence on MNIST-1D, so the paper's lambda = 1
# is already far too strong there; see benchmarks/results/tune_tradeoff.md), and the
# point of the search is to find where NFR falls and where accuracy starts to pay.
# The temperature only matters for KL distillation (the paper needs T ~ 100). In the
# default search across methods, fd runs on standardized logits (``lm-std``): raw
# logit matching fought cross-entropy on every MNIST-1D scenario
# (benchmarks/results/upgrade_methods.md).
METHOD_INFO = {
    "fd": {"help": "focal distillation: distil more where the old model was right "
                   "(fd_kind lm, lm-std or kl); lowers the negative flip rate",
           "hyperparameters": {"fd_kind": "lm", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 1.0,
                               "fd_temperature": 100.0},
           "space": {"fd_lambda": "loguniform:1e-5:10", "fd_beta": "uniform:0:10"},
           "space_if": {"fd_kind=kl": {"fd_temperature": "loguniform:1:200"}},
           "tradeoff": {"order": 10, "space": {"fd_lambda": "loguniform:0.01:3", "fd_beta": "uniform:0:10"},
                        "fixed": {"fd_kind": "lm-std"}}},
    "fd-kl": {"help": "focal distillation with T^2-scaled KL divergence (fd with fd_kind=kl)",
              "hyperparameters": {"fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 1.0, "fd_temperature": 100.0},
              "space": {"fd_lambda": "loguniform:1e-5:10", "fd_beta": "uniform:0:10",
                        "fd_temperature": "loguniform:1:200"}},
    "fd-lm": {"help": "focal distillation with logit matching (fd with fd_kind=lm)",
              "hyperparameters": {"fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 1.0},
              "space": {"fd_lambda": "loguniform:1e-5:10", "fd_beta": "uniform:0:10"}},
    "kd": {"help": "plain knowledge distillation (focal distillation with beta = 0), a baseline",
           "hyperparameters": {"kd_kind": "lm", "kd_lambda": 1.0, "kd_temperature": 100.0},
           "space": {"kd_lambda": "loguniform:1e-5:10"}},
}

KINDS = ("kl", "lm", "lm-std")


def focal_weights(old_correct: Tensor, alpha: float, beta: float) -> Tensor:
    """Per-sample weight ``alpha + beta * 1[old correct]``, float32, shape ``(B,)``."""
    return alpha + beta * old_correct.detach().to(torch.float32)


def kl_divergence_loss(new_logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T^2 * KL(softmax(old/T) || softmax(new/T))``, shape ``(B,)``.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures.
    """
    t = float(temperature)
    log_p_new = F.log_softmax(upcast(new_logits) / t, dim=1)
    log_p_old = F.log_softmax(upcast(old_logits.detach()) / t, dim=1)
    return t * t * (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=1)


def logit_matching_loss(new_logits: Tensor, old_logits: Tensor) -> Tensor:
    """Per-sample ``0.5 * ||new - old||^2`` summed over classes, shape ``(B,)``."""
    diff = upcast(new_logits) - upcast(old_logits.detach())
    return 0.5 * (diff * diff).sum(dim=1)


def standardize_logits(logits: Tensor, eps: float = 1e-6) -> Tensor:
    """Each row to zero mean and unit (population) standard deviation over the classes."""
    centered = logits - logits.mean(dim=1, keepdim=True)
    return centered / (centered.pow(2).mean(dim=1, keepdim=True).sqrt() + eps)


def standardized_logit_matching_loss(new_logits: Tensor, old_logits: Tensor) -> Tensor:
    """Per-sample ``0.5 * ||z(new) - z(old)||^2``: logit matching without the scale.

    Invariant to adding a constant to, or positively rescaling, either row; at
    most ``2 * K`` for ``K`` classes, so its weight means the same for any
    old model.
    """
    diff = standardize_logits(upcast(new_logits)) - standardize_logits(upcast(old_logits.detach()))
    return 0.5 * (diff * diff).sum(dim=1)


def distillation_distance(new_logits: Tensor, old_logits: Tensor, kind: str = "lm",
                          temperature: float = 100.0) -> Tensor:
    """``D(new_i, old_i)`` per sample for ``kind`` in ``{"kl", "lm", "lm-std"}``."""
    if kind == "kl":
        return kl_divergence_loss(new_logits, old_logits, temperature)
    if kind == "lm":
        return logit_matching_loss(new_logits, old_logits)
    if kind == "lm-std":
        return standardized_logit_matching_loss(new_logits, old_logits)
    raise ConfigError(f"unknown distillation kind {kind!r}; choose one of {list(KINDS)}")


def focal_distillation_loss(new_logits: Tensor, old_logits: Tensor, old_correct: Tensor, *,
                            alpha: float = 1.0, beta: float = 5.0, kind: str = "lm",
                            temperature: float = 100.0) -> Tensor:
    """``mean_i (alpha + beta * 1[old correct on i]) * D(new_i, old_i)``.

    ``new_logits`` and ``old_logits`` must already be aligned on the same classes.
    """
    if new_logits.shape != old_logits.shape:
        raise ConfigError(
            f"new logits {tuple(new_logits.shape)} and old logits {tuple(old_logits.shape)} must be "
            "aligned on the same classes"
        )
    d = distillation_distance(new_logits, old_logits, kind, temperature)
    return (focal_weights(old_correct, alpha, beta).to(d.device) * d).mean()


class _Distillation(UpgradeMethod):
    """Shared machinery: align logits on the classes both heads know, weight, average."""

    needs_old_model = True
    needs_old_outputs = True
    compatible = False
    # set by subclasses
    kind: str
    alpha: float
    beta: float
    temperature: float
    lam: float

    def _validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{self.name}: {self.prefix}_kind must be one of {list(KINDS)}, got {self.kind!r}")
        check_nonnegative(self.name, **{f"{self.prefix}_lambda": self.lam, f"{self.prefix}_alpha": self.alpha,
                                        f"{self.prefix}_beta": self.beta})
        check_positive(self.name, **{f"{self.prefix}_temperature": self.temperature})
        self._old_pos: Tensor | None = None
        self._new_col: Tensor | None = None
        self._identity = False

    def setup(self, ctx: UpgradeContext) -> None:
        super().setup(ctx)
        assert ctx.old_classes is not None
        old_classes = [int(c) for c in ctx.old_classes]
        k = int(ctx.num_classes)
        self._identity = old_classes == list(range(k))
        old_pos, new_col = shared_class_index(old_classes, k)
        if old_pos.numel() == 0:
            raise ConfigError(
                f"{self.name}: the old model's classes {old_classes[:20]} share no class with the new "
                f"model's 0..{k - 1}; there is nothing to distill"
            )
        if self.kind == "lm-std" and old_pos.numel() < 2:
            raise ConfigError(
                f"{self.name}: {self.prefix}_kind='lm-std' standardizes logits over the shared classes, "
                f"but the old and new models share only {old_pos.numel()}; use {self.prefix}_kind='lm'"
            )
        self._old_pos, self._new_col = old_pos, new_col

    def aligned_logits(self, batch: MethodBatch) -> tuple[Tensor, Tensor]:
        """``(new, old)`` logits restricted to the shared classes, in the same order."""
        self._require_setup()
        (old,) = self._require(batch, "old_logits")
        new = batch.new_logits
        assert self._old_pos is not None and self._new_col is not None
        if old.shape[1] != len(self.ctx.old_classes):  # type: ignore[union-attr, arg-type]
            raise ConfigError(
                f"{self.name}: old logits have {old.shape[1]} columns but the old model has "
                f"{len(self.ctx.old_classes)} classes"  # type: ignore[union-attr, arg-type]
            )
        if new.shape[1] != self.ctx.num_classes:  # type: ignore[union-attr]
            raise ConfigError(
                f"{self.name}: new logits have {new.shape[1]} columns but the new model has "
                f"{self.ctx.num_classes} classes"  # type: ignore[union-attr]
            )
        if self._identity:
            return new, old
        return (new.index_select(1, self._new_col.to(new.device)),
                old.index_select(1, self._old_pos.to(old.device)))

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        new, old = self.aligned_logits(batch)
        if self.beta == 0:
            correct = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        else:
            (correct,) = self._require(batch, "old_correct")
        term = focal_distillation_loss(new, old, correct, alpha=self.alpha, beta=self.beta,
                                       kind=self.kind, temperature=self.temperature)
        return {self.prefix: self.lam * term}


@register_method("fd")
class FocalDistillation(_Distillation):
    """Focal distillation; ``kind`` ``"lm"`` (default), ``"lm-std"`` or ``"kl"``. Part name ``fd``.

    Hyperparameters: ``fd_kind``, ``fd_alpha``, ``fd_beta``, ``fd_lambda``,
    ``fd_temperature`` (used by ``kl`` only).
    """

    name = "fd"
    prefix = "fd"

    def __init__(self, *, kind: str = "lm", alpha: float = 1.0, beta: float = 5.0, lam: float = 1.0,
                 temperature: float = 100.0) -> None:
        super().__init__()
        self.kind, self.alpha, self.beta = str(kind), float(alpha), float(beta)
        self.lam, self.temperature = float(lam), float(temperature)
        self._validate()


@register_method("fd-kl")
class FocalDistillationKL(_Distillation):
    """Focal distillation with ``T^2``-scaled KL (T = 100 by default)."""

    name = "fd-kl"
    prefix = "fd"
    kind = "kl"

    def __init__(self, *, alpha: float = 1.0, beta: float = 5.0, lam: float = 1.0,
                 temperature: float = 100.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.lam, self.temperature = float(alpha), float(beta), float(lam), float(temperature)
        self._validate()


@register_method("fd-lm")
class FocalDistillationLM(_Distillation):
    """Focal distillation with logit matching."""

    name = "fd-lm"
    prefix = "fd"
    kind = "lm"
    temperature = 1.0  # unused by logit matching; not a hyperparameter here

    def __init__(self, *, alpha: float = 1.0, beta: float = 5.0, lam: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self._validate()


@register_method("kd")
class KnowledgeDistillation(_Distillation):
    """Plain knowledge distillation: every sample weighted 1 (alpha = 1, beta = 0).

    The baseline that shows what the focal weighting adds. Same distance as
    ``fd`` by default (``kd_kind="lm"``) so the two differ only in the weighting.
    Part name ``kd``; hyperparameters ``kd_kind``, ``kd_lambda``, ``kd_temperature``.
    """

    name = "kd"
    prefix = "kd"
    alpha = 1.0
    beta = 0.0

    def __init__(self, *, kind: str = "lm", lam: float = 1.0, temperature: float = 100.0) -> None:
        super().__init__()
        self.kind, self.lam, self.temperature = str(kind), float(lam), float(temperature)
        self._validate()
