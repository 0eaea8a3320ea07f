"""New-error losses (Bansal et al., AAAI 2019; Srivastava et al., 2020): Microsoft
BackwardCompatibilityML's backward-compatibility losses.

``L = CE(new, y) + lambda * D``, where ``D`` is averaged over the samples the old
model got right (its *support*; ``D = 0`` on a batch where it got none right):

* ``weighted`` (BackwardCompatibilityML's ``BCCrossEntropyLoss``, "new error"):
  ``D = mean_{i: old right} CE(new_i, y_i)``: cross-entropy counted ``1 + lambda``
  times on the samples the old model classifies correctly, so errors there (new
  errors, i.e. negative flips) cost more than errors the old model made too.
* ``strict`` (``StrictImitationNLLLoss``, strict imitation): ``D = mean_{i: old
  right} -sum_c p_old,c log p_new,c``: on the old model's correct samples the new
  model imitates the old model's whole predictive distribution, not only its
  (correct) label. With hard labels this would equal ``weighted`` (the old label
  is ``y`` on the support), so the soft form is the one that differs.

BackwardCompatibilityML calls ``lambda`` ``lambda_c`` and sums the strict term over
the support; here both forms take the mean over the support, so ``lambda`` means
the same for any batch size. Only the classes both heads know are compared in
``strict``; the old probabilities are a softmax over those shared classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graceful_ray.errors import ConfigError
from graceful_ray.methods.base import MethodBatch, check_nonnegative, upcast
from graceful_ray.methods.focal_distillation import _Distillation
from graceful_ray.methods.registry import register_method

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "new-error": {"help": "BackwardCompatibilityML's new-error losses: cross-entropy plus a penalty on "
                          "the samples the old model got right (ne_kind weighted or strict)",
                  "hyperparameters": {"ne_lambda": 1.0, "ne_kind": "weighted"},
                  "space": {"ne_lambda": "loguniform:0.1:10", "ne_kind": "choice:weighted,strict"},
                  "tradeoff": {"order": 20}},
}

KINDS = ("weighted", "strict")


def support_mean(per_sample: Tensor, old_correct: Tensor) -> Tensor:
    """Mean of ``per_sample`` over the samples the old model got right; 0 when there are none."""
    mask = old_correct.detach().to(per_sample.device, torch.bool)
    if not bool(mask.any()):
        return per_sample.sum() * 0.0  # keeps the graph (and the dtype) for the composite's sum
    return per_sample[mask].mean()


def new_error_loss(new_logits: Tensor, y: Tensor, old_correct: Tensor) -> Tensor:
    """The weighted form's ``D``: mean cross-entropy of the new head on the old model's correct samples."""
    return support_mean(F.cross_entropy(upcast(new_logits), y, reduction="none"), old_correct)


def strict_imitation_loss(new_logits: Tensor, old_logits: Tensor, old_correct: Tensor) -> Tensor:
    """The strict form's ``D``: mean over the old model's correct samples of ``-sum_c p_old log p_new``.

    ``new_logits`` and ``old_logits`` must be aligned on the same classes; the old ones are constants.
    """
    if new_logits.shape != old_logits.shape:
        raise ConfigError(f"new logits {tuple(new_logits.shape)} and old logits {tuple(old_logits.shape)} "
                          "must be aligned on the same classes")
    p_old = F.softmax(upcast(old_logits.detach()), dim=1)
    cross = -(p_old * F.log_softmax(upcast(new_logits), dim=1)).sum(dim=1)
    return support_mean(cross, old_correct)


@register_method("new-error")
class NewError(_Distillation):
    """Cross-entropy plus ``lam`` times a new-error penalty. Part name ``ne``.

    Hyperparameters ``ne_lambda`` (1), ``ne_kind`` (``"weighted"``, or ``"strict"``).
    """

    name = "new-error"
    prefix = "ne"

    def __init__(self, *, lam: float = 1.0, kind: str = "weighted") -> None:
        super().__init__()
        self.lam, self.kind = float(lam), str(kind)
        if self.kind not in KINDS:
            raise ConfigError(f"new-error: ne_kind must be one of {list(KINDS)}, got {self.kind!r}")
        check_nonnegative("new-error", ne_lambda=self.lam)
        # _Distillation's class alignment (set in setup); its distances are not used
        self._old_pos = self._new_col = None
        self._identity = False

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        (correct,) = self._require(batch, "old_correct")
        if self.kind == "weighted":
            self._require_setup()
            term = new_error_loss(batch.new_logits, batch.y, correct)
        else:
            new, old = self.aligned_logits(batch)
            term = strict_imitation_loss(new, old, correct)
        return {"ne": self.lam * term}
