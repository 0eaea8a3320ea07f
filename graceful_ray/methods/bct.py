"""Backward-compatible training (BCT, Shen et al., CVPR 2020).

The new embedding is fed through the *frozen* old head as well as the new one:
``L = CE(W_n phi_n(x), y) + lambda * CE(W_o phi_n(x), y)``. The influence term
pulls the new embedding into the region the old classifier (and hence the old
embedding space) expects, so new queries can be searched against a gallery
embedded by the old model without re-indexing it.

Classes the old head never saw get synthesized rows: the mean old embedding
``phi_o(x)`` of that class's training samples (bias 0), as in the paper. The
extended head is indexed by global class id, so it can be used with the labels
directly.

Two kinds of influence loss (``bct_kind``; the default ``auto`` picks ``cosine``
when the new model adds classes the old one never saw, else ``linear``, and the
manifest records the kind that was used):

- ``linear`` (the paper's formula): the old head as it is, ``W_o z + b_o``.
- ``cosine``: the old head's rows and the new embedding L2-normalised, logits
  ``s * cos(z, w_c)`` and no bias. Retrieval compares embeddings by cosine, so
  this constrains the geometry the gallery search uses. It matters when classes
  are added: the old model puts a new class's samples inside the cones of the old
  classes it confuses them with, and a class-mean row with bias 0 can then only
  win the *linear* old head far from those samples, so the linear loss pushes new
  queries away from their old gallery neighbours. With cosine logits the class
  mean's row wins around the class mean's direction, which is where the old
  gallery items of that class are. Measured in ``benchmarks/results/upgrade_methods.md``
  (class-incremental rows) and ``tests/test_methods.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from graceful_ray.errors import ConfigError
from graceful_ray.methods.base import MethodBatch, UpgradeContext, UpgradeMethod, check_nonnegative, upcast
from graceful_ray.methods.registry import register_method

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "bct": {"help": "backward-compatible training: influence loss through the frozen old head; "
                    "shares the old embedding space",
            "hyperparameters": {"bct_lambda": 1.0, "bct_kind": "auto", "bct_scale": 16.0},
            "space": {"bct_lambda": "loguniform:0.1:10"}},
}


def extend_old_head(old_head_weight: Tensor, old_head_bias: Tensor | None, old_classes: list[int],
                    num_classes: int, old_class_means: dict[int, Tensor] | None) -> tuple[Tensor, Tensor]:
    """The old head as a ``(num_classes, d_old)`` classifier over global class ids.

    Row ``c`` is the old head's row for class ``c`` if the old model knew ``c``,
    otherwise the mean old embedding of class ``c`` with bias 0. Old classes that
    the new model no longer has are dropped. The result is detached: the old
    head is never trained.
    """
    w_old = old_head_weight.detach().to(torch.float32)
    if w_old.dim() != 2 or w_old.shape[0] != len(old_classes):
        raise ConfigError(
            f"old head weight has shape {tuple(w_old.shape)} but the old model has "
            f"{len(old_classes)} classes; expected ({len(old_classes)}, d_old)"
        )
    b_old = (torch.zeros(w_old.shape[0], device=w_old.device) if old_head_bias is None
             else old_head_bias.detach().to(w_old.device, torch.float32))
    d_old = w_old.shape[1]
    position = {int(c): j for j, c in enumerate(old_classes)}
    weight = torch.zeros(num_classes, d_old, device=w_old.device)
    bias = torch.zeros(num_classes, device=w_old.device)
    missing = []
    for c in range(num_classes):
        if c in position:
            weight[c] = w_old[position[c]]
            bias[c] = b_old[position[c]]
        elif old_class_means is not None and c in old_class_means:
            mean = old_class_means[c].detach().to(torch.float32).reshape(-1)
            if mean.numel() != d_old:
                raise ConfigError(
                    f"old class mean for class {c} has {mean.numel()} values; the old embedding has {d_old}"
                )
            weight[c] = mean.to(w_old.device)
        else:
            missing.append(c)
    if missing:
        raise ConfigError(
            f"BCT needs the mean old embedding of every class the old model never saw, to synthesize "
            f"its old-head row; missing for classes {missing[:20]}{' ...' if len(missing) > 20 else ''}. "
            "Compute old_class_means over the training set for all classes"
        )
    return weight, bias


KINDS = ("linear", "cosine")
AUTO = "auto"


def auto_kind(old_classes: list[int], num_classes: int) -> str:
    """``cosine`` when some new class has no old-head row (classes were added), else ``linear``."""
    known = {int(c) for c in old_classes if 0 <= int(c) < num_classes}
    return "cosine" if len(known) < num_classes else "linear"


def bct_influence_loss(new_embedding: Tensor, old_head_weight_ext: Tensor, old_head_bias_ext: Tensor,
                       y: Tensor, kind: str = "linear", scale: float = 16.0) -> Tensor:
    """The influence loss through the extended, frozen old head (mean over the batch).

    ``linear``: ``CE(W_o phi_n + b_o, y)``. ``cosine``: ``CE(s * normalize(phi_n)
    normalize(W_o)^T, y)``, the bias dropped (see the module docstring).
    """
    z = upcast(new_embedding)
    weight = old_head_weight_ext.detach().to(z.dtype)
    if kind == "linear":
        logits = F.linear(z, weight, old_head_bias_ext.detach().to(z.dtype))
    elif kind == "cosine":
        logits = scale * F.linear(F.normalize(z, dim=-1), F.normalize(weight, dim=-1))
    else:
        raise ConfigError(f"unknown bct kind {kind!r}; choose one of {list(KINDS)}")
    return F.cross_entropy(logits, y)


@register_method("bct")
class BCT(UpgradeMethod):
    """Cross-entropy plus ``lam`` times the BCT influence loss. Part name ``bct``.

    Hyperparameters: ``bct_lambda`` (1), ``bct_kind`` (``"auto"``: ``"cosine"`` when
    classes are added, else ``"linear"``; or either explicitly), ``bct_scale`` (16,
    the cosine logits' scale).
    """

    name = "bct"
    prefix = "bct"
    needs_old_model = True
    compatible = True

    def __init__(self, *, lam: float = 1.0, kind: str = AUTO, scale: float = 16.0) -> None:
        super().__init__()
        self.lam, self.kind, self.scale = float(lam), str(kind), float(scale)
        check_nonnegative("bct", bct_lambda=self.lam)
        if self.kind not in (*KINDS, AUTO):
            raise ConfigError(f"bct: bct_kind must be one of {[*KINDS, AUTO]}, got {self.kind!r}")
        if not self.scale > 0:
            raise ConfigError(f"bct: bct_scale must be > 0, got {self.scale}")
        self.weight_ext: Tensor | None = None
        self.bias_ext: Tensor | None = None

    def setup(self, ctx: UpgradeContext) -> None:
        super().setup(ctx)
        assert ctx.old_classes is not None
        if ctx.old_head_weight is None:
            raise ConfigError("bct needs the old model's head weight (UpgradeContext.old_head_weight)")
        d_old = int(ctx.old_head_weight.shape[-1])
        if ctx.old_embedding_dim is not None and int(ctx.old_embedding_dim) != d_old:
            raise ConfigError(
                f"old_embedding_dim {ctx.old_embedding_dim} does not match the old head's input size {d_old}"
            )
        if int(ctx.new_embedding_dim) != d_old:
            raise ConfigError(
                f"bct feeds the new embedding through the old head, so the embedding dims must match: "
                f"new model has embedding_dim={ctx.new_embedding_dim}, old model has {d_old}. Set the "
                f"new model's embedding_dim to {d_old}, or use a method that does not compare "
                "embeddings, such as 'fd' (focal distillation on logits)"
            )
        if self.kind == AUTO:  # resolved once; hyperparameters() then reports the kind used
            self.kind = auto_kind(list(ctx.old_classes), int(ctx.num_classes))
        self.weight_ext, self.bias_ext = extend_old_head(
            ctx.old_head_weight, ctx.old_head_bias, list(ctx.old_classes), int(ctx.num_classes),
            ctx.old_class_means)

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        self._require_setup()
        assert self.weight_ext is not None and self.bias_ext is not None
        if batch.new_embedding.shape[-1] != self.weight_ext.shape[1]:
            raise ConfigError(
                f"bct: new embedding has {batch.new_embedding.shape[-1]} dims, the old head expects "
                f"{self.weight_ext.shape[1]}"
            )
        return {"bct": self.lam * bct_influence_loss(batch.new_embedding, self.weight_ext,
                                                      self.bias_ext, batch.y, self.kind, self.scale)}
