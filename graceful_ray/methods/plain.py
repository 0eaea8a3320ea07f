"""Plain training: cross-entropy on the new head. The baseline that regresses."""

from __future__ import annotations

from torch import Tensor

from graceful_ray.methods.base import MethodBatch, UpgradeMethod
from graceful_ray.methods.registry import register_method


# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "plain": {"help": "cross-entropy only: the baseline that regresses; needs no old model",
              "hyperparameters": {}},
}

@register_method("plain")
class Plain(UpgradeMethod):
    """``CE(W_n phi_n(x), y)`` and nothing else; needs no old model."""

    name = "plain"
    prefix = "plain"

    def __init__(self) -> None:
        super().__init__()

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        return {}
