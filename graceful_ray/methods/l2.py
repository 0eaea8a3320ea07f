"""The L2 baseline: pull the new embedding onto the old one.

``L = CE + lambda * mean_i ||phi_n(x_i) - phi_o(x_i)||^2``. The BCT paper shows
this does *not* give a compatible embedding (the new model's classifier and the
old one's disagree on the geometry); it is kept as a baseline to show that.
"""

from __future__ import annotations

from torch import Tensor

from graceful_ray.errors import ConfigError
from graceful_ray.methods.base import MethodBatch, UpgradeContext, UpgradeMethod, check_nonnegative, upcast
from graceful_ray.methods.registry import register_method

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "l2": {"help": "embedding regression onto the old model (the baseline BCT beats)",
           "hyperparameters": {"l2_lambda": 1.0},
           "space": {"l2_lambda": "loguniform:1e-4:10"}},
}


def l2_embedding_loss(new_embedding: Tensor, old_embedding: Tensor) -> Tensor:
    """Per-sample squared distance ``||phi_n - phi_o||^2``, shape ``(B,)``; old is a constant."""
    diff = upcast(new_embedding) - upcast(old_embedding.detach())
    return (diff * diff).sum(dim=1)


@register_method("l2")
class L2(UpgradeMethod):
    """Cross-entropy plus ``lam`` times the mean squared embedding distance. Part ``l2``."""

    name = "l2"
    prefix = "l2"
    needs_old_model = True
    needs_old_outputs = True
    compatible = True

    def __init__(self, *, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = float(lam)
        check_nonnegative("l2", l2_lambda=self.lam)

    def setup(self, ctx: UpgradeContext) -> None:
        super().setup(ctx)
        d_old = ctx.old_embedding_dim
        if d_old is None and ctx.old_head_weight is not None:
            d_old = int(ctx.old_head_weight.shape[-1])
        if d_old is not None and int(d_old) != int(ctx.new_embedding_dim):
            raise ConfigError(
                f"l2 compares embeddings, so the dims must match: new embedding_dim="
                f"{ctx.new_embedding_dim}, old {d_old}. Set embedding_dim={d_old}, or use 'fd'"
            )

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        self._require_setup()
        (old,) = self._require(batch, "old_embedding")
        if old.shape != batch.new_embedding.shape:
            raise ConfigError(
                f"l2: old embedding {tuple(old.shape)} and new embedding "
                f"{tuple(batch.new_embedding.shape)} must have the same shape"
            )
        return {"l2": self.lam * l2_embedding_loss(batch.new_embedding, old).mean()}
