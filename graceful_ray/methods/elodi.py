"""Logit difference inhibition (ELODI, Zhao et al., 2022).

``L = CE + lambda * mean_i mean_c max(|z_new,ic - z_ref,ic| - xi, 0)^p``

A dead-zone penalty on logit differences: differences up to ``xi`` are free, so
the new model keeps room to improve, while large departures from the reference
(which cause flips) are inhibited. The reference logits are ``MethodBatch.old_logits``:
the old model's logits for one reference model, or the averaged logits of a
reference ensemble when the trainer supplies them there. xi = 0.5, p = 2 are
the paper's values for one reference model. Only shared classes are compared.
"""

from __future__ import annotations

from torch import Tensor

from graceful_ray.methods.base import MethodBatch, check_nonnegative, check_positive, upcast
from graceful_ray.methods.focal_distillation import _Distillation
from graceful_ray.methods.registry import register_method


def logit_difference_inhibition_loss(new_logits: Tensor, ref_logits: Tensor, xi: float = 0.5,
                                     p: float = 2.0) -> Tensor:
    """Per-sample ``mean_c max(|new_c - ref_c| - xi, 0)^p``, shape ``(B,)``; ref is a constant."""
    gap = (upcast(new_logits) - upcast(ref_logits.detach())).abs() - float(xi)
    return gap.clamp_min(0.0).pow(float(p)).mean(dim=1)


@register_method("elodi")
class ELODI(_Distillation):
    """Cross-entropy plus ``lam`` times the logit difference inhibition loss. Part ``elodi``.

    Hyperparameters ``elodi_lambda``, ``elodi_xi``, ``elodi_p``.
    """

    name = "elodi"
    prefix = "elodi"
    kind = "lm"  # unused; keeps the shared validation happy
    alpha, beta, temperature = 1.0, 0.0, 1.0

    def __init__(self, *, lam: float = 1.0, xi: float = 0.5, p: float = 2.0) -> None:
        super().__init__()
        self.lam, self.xi, self.p = float(lam), float(xi), float(p)
        self._validate()
        check_nonnegative("elodi", elodi_xi=self.xi)
        check_positive("elodi", elodi_p=self.p)

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        new, ref = self.aligned_logits(batch)
        return {"elodi": self.lam * logit_difference_inhibition_loss(new, ref, self.xi, self.p).mean()}
