"""A training objective from outside the package, in one file: its declaration and its class.

Naming this module in ``$GRACEFUL_RAY_METHOD_MODULES`` (``tests.example_method``)
is all it takes for ``graceful-ray train --help`` to list it, for ``tune``'s
default search to include it and for ``train --method test-logit-decay`` to
train with it (tests/test_method_declarations.py checks all three).
"""

from __future__ import annotations

from torch import Tensor

from graceful_ray.methods import MethodBatch, UpgradeMethod, register_method

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "test-logit-decay": {
        "help": "cross-entropy plus a penalty on the squared logits (an example method from outside the package)",
        "hyperparameters": {"decay_lambda": 0.01},
        "space": {"decay_lambda": "loguniform:1e-4:1"},
        "tradeoff": {"order": 100},
    },
}


@register_method("test-logit-decay")
class LogitDecay(UpgradeMethod):
    """``CE + lam * mean(z^2)``: keeps the new logits small; needs no old model. Part ``decay``."""

    name = "test-logit-decay"
    prefix = "decay"

    def __init__(self, *, lam: float = 0.01) -> None:
        super().__init__()
        self.lam = float(lam)

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        return {"decay": self.lam * batch.new_logits.float().pow(2).mean()}
