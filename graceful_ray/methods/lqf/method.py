"""LQF: linear quadratic fine-tuning (Achille et al., CVPR 2021) as an upgrade method.

The network is fine-tuned as its first-order Taylor expansion around the
pretrained weights ``w0``,

    f_lin(x; w) = f(x; w0) + J(x; w0)(w - w0)      (graceful_ray.methods.lqf.LinearizedModel)

with a squared loss on scaled one-hot targets instead of cross-entropy,

    L = 0.5 * mean_i ||f_lin(x_i; w) - s * onehot(y_i)||^2    (part "lqf"),

so the objective is a convex quadratic in ``w``, optimized by SGD with momentum
on K-FAC-preconditioned gradients (graceful_ray.methods.lqf.KFACOptimizer; plain SGD
with ``lqf_kfac=false``). Weight decay acts on ``w - w0``. Use leaky-ReLU
backbones (``--model-arg activation=leaky_relu``): a ReLU network's Jacobian
is zero for every inactive unit, which the linear model can never switch on.

Hyperparameters (prefix ``lqf_``):

* ``kfac`` (true): precondition with K-FAC; false = SGD with momentum.
* ``damping`` (1e-2): K-FAC Tikhonov damping ``lambda``, relative to each
  layer's mean curvature (see graceful_ray/methods/lqf/kfac.py).
* ``update_every`` (10): refresh the K-FAC factors and inverses every N steps.
* ``target_scale`` (1.0): ``s``, the height of the one-hot regression targets.
* ``layers`` ("all"): which parameters are linearized: ``all``, ``last:N``
  (the last N parameter-owning modules, e.g. ``last:2`` = projection + head)
  or comma-separated parameter prefixes; the rest stay frozen at ``w0``.
* ``momentum`` (0.9).
* ``init`` ("parent"): where ``w0`` comes from. ``parent``: the old model's
  weights (needs a parent, and a trainer that passes ``UpgradeContext.old_ref``
  and ``registry``); ``NAME@VERSION``: that registry version (at
  ``lqf_registry``); ``model``: the weights the network has when it is wrapped
  (for callers that load pretrained weights themselves).
* ``registry`` (""): the registry root for ``init``; default: the trainer's.
* ``export_format`` ("linearized"): publish the linear model (``linearized``;
  the registry rebuilds and evaluates ``f_lin``), or the network at ``w``
  (``network``; an approximation of what was trained).
* ``head_scale`` ("auto"): the inherited head at ``w0`` is centered and scaled
  (``c (W - mean_k W_k)``, ``c (b - mean b)``), which changes no decision of the
  parent, so that its logits are on the scale of the regression targets.
  A cross-entropy head's logits are far larger than one-hot targets (about
  +-12 for the MNIST-1D parent of the benchmark): without this the squared loss
  starts near 700 per sample and fitting it rewrites the whole function.
  ``auto``: ``c`` makes the centered logits' RMS norm on the first training
  batch equal to the centered targets' (``s * sqrt(1 - 1/K)``); a number:
  that ``c``; ``none``: keep the head (use with ``lqf+fd``, whose logit
  matching compares against the parent's unscaled logits, and a
  ``target_scale`` near the parent's logit scale). This calibration is not in
  the LQF paper, which trains a new head for a new task.

The trainer's ``lr`` is used as is, and the AdamW default does not suit either
optimizer. K-FAC scales each layer's step to the exact curvature, so its ``lr``
is a fraction of an exact line search: about ``1 / (number of layers)`` without
momentum, ten times less with the default momentum 0.9 (the benchmark uses
0.05). SGD's ``lr`` depends on the scale of ``J`` (1e-3 on the benchmark's
cnn1d; 1e-2 diverged).

How ``w0`` is assembled from the initial weights: every backbone tensor is
copied (shapes must match); head rows are copied for the classes the old model
knows (``UpgradeContext.old_classes``), the other rows keep the fresh
initialization of the new network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graceful_ray.errors import ConfigError
from graceful_ray.methods.lqf.kfac import KFACOptimizer
from graceful_ray.methods.lqf.linearize import LinearizedModel
from graceful_ray.methods.base import (MethodBatch, UpgradeContext, UpgradeMethod, check_nonnegative,
                                       check_positive, upcast)
from graceful_ray.methods.registry import register_method
from graceful_ray.models.formats import register_format

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "lqf": {"help": "linear quadratic fine-tuning: the linearized network, a squared loss and K-FAC "
                    "(use leaky-ReLU backbones)",
            "hyperparameters": {"lqf_kfac": True, "lqf_damping": 1e-2, "lqf_update_every": 10,
                                "lqf_target_scale": 1.0, "lqf_layers": "all", "lqf_momentum": 0.9,
                                "lqf_init": "parent", "lqf_registry": "", "lqf_export_format": "linearized",
                                "lqf_head_scale": "auto"}},
}

EXPORT_FORMATS = ("linearized", "network")
# How the registry rebuilds what LQF publishes: the network it linearizes around
# plus the displacement (see LQF.export).
register_format("linearized", LinearizedModel.from_state_dict)


def squared_loss(logits: Tensor, y: Tensor, target_scale: float = 1.0) -> Tensor:
    """``0.5 * mean_i sum_k (logits_ik - s * 1[k == y_i])^2`` (rows with ``y < 0`` ignored)."""
    logits = upcast(logits)
    valid = y >= 0
    target = F.one_hot(y.clamp(min=0), logits.shape[1]).to(logits.dtype) * float(target_scale)
    per_sample = 0.5 * ((logits - target) ** 2).sum(dim=1)
    if bool(valid.all()):
        return per_sample.mean()
    return (per_sample * valid).sum() / valid.sum().clamp(min=1)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int,)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ConfigError(f"lqf: {name} must be true or false, got {value!r}")


@register_method("lqf")
class LQF(UpgradeMethod):
    """Fine-tune the linearized network with a squared loss and K-FAC (see module docstring)."""

    name = "lqf"
    prefix = "lqf"
    replaces_base_loss = True

    def __init__(self, *, kfac: bool = True, damping: float = 1e-2, update_every: int = 10,
                 target_scale: float = 1.0, layers: str = "all", momentum: float = 0.9,
                 init: str = "parent", registry: str = "", export_format: str = "linearized",
                 head_scale: float | str = "auto") -> None:
        super().__init__()
        self.kfac = _as_bool("lqf_kfac", kfac)
        self.damping = float(damping)
        check_positive("lqf", lqf_damping=self.damping, lqf_target_scale=float(target_scale))
        if int(update_every) != update_every or int(update_every) < 1:
            raise ConfigError(f"lqf: lqf_update_every must be an integer >= 1, got {update_every!r}")
        self.update_every = int(update_every)
        self.target_scale = float(target_scale)
        self.momentum = float(momentum)
        check_nonnegative("lqf", lqf_momentum=self.momentum)
        if not self.momentum < 1:
            raise ConfigError(f"lqf: lqf_momentum must be < 1, got {momentum!r}")
        if not isinstance(layers, str) or not layers.strip():
            raise ConfigError(f"lqf: lqf_layers must be 'all', 'last:N' or comma-separated "
                              f"parameter prefixes, got {layers!r}")
        self.layers = layers.strip()
        if not isinstance(init, str) or not init.strip():
            raise ConfigError(f"lqf: lqf_init must be 'parent', 'model' or NAME@VERSION, got {init!r}")
        self.init = init.strip()
        self.registry = str(registry or "")
        if export_format not in EXPORT_FORMATS:
            raise ConfigError(f"lqf: lqf_export_format must be one of {list(EXPORT_FORMATS)}, "
                              f"got {export_format!r}")
        self.export_format = export_format
        if isinstance(head_scale, str) and head_scale.strip().lower() in ("auto", "none"):
            self.head_scale: float | str = head_scale.strip().lower()
        else:
            try:
                self.head_scale = float(head_scale)
            except (TypeError, ValueError):
                raise ConfigError(f"lqf: lqf_head_scale must be 'auto', 'none' or a number > 0, "
                                  f"got {head_scale!r}") from None
            check_positive("lqf", lqf_head_scale=self.head_scale)

    # ------------------------------------------------------------- lifecycle
    def setup(self, ctx: UpgradeContext) -> None:
        super().setup(ctx)
        if self.init == "parent":
            if not ctx.has_old_model:
                raise ConfigError(
                    "method 'lqf' fine-tunes a pretrained network, and lqf_init='parent' takes it from "
                    "the old model: train against a parent (--old NAME@VERSION), or set "
                    "lqf_init=NAME@VERSION (with lqf_registry=ROOT), or lqf_init=model to linearize "
                    "the network as it is built")
            if not ctx.old_ref:
                raise ConfigError(
                    "method 'lqf': this trainer does not tell methods which model the parent is "
                    "(UpgradeContext.old_ref); set lqf_init to the parent's reference (NAME@VERSION)")
        if self.init != "model" and ctx.load_model is None:
            raise ConfigError("method 'lqf': lqf_init names a registry model, but the trainer passed "
                              "no model loader (UpgradeContext.load_model)")

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        return {}

    def base_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        return {"lqf": squared_loss(batch.new_logits, batch.y, self.target_scale)}

    # ---------------------------------------------------------- trainer hooks
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The linearized network. When set up (training), ``w0`` is first loaded
        per ``lqf_init``; without set-up (rebuilding a checkpoint) the weights
        come from the state dict loaded afterwards."""
        if self.ctx is not None and self.init != "model":
            self._load_initial_weights(model)
        lin = LinearizedModel(model, layers=self.layers)
        if self.ctx is not None:  # training: calibrate the head (a rebuild loads it instead)
            if self.head_scale == "auto":
                k = lin.num_classes
                lin.pending_head_rms = self.target_scale * math.sqrt(max(k - 1, 1) / k)
            elif self.head_scale != "none":
                lin.scale_head_(float(self.head_scale))
        return lin

    def make_optimizer(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0):
        params = [p for p in model.parameters() if p.requires_grad]
        if self.kfac:
            return KFACOptimizer(model, lr=lr, momentum=self.momentum, weight_decay=weight_decay,
                                 damping=self.damping, update_every=self.update_every)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=weight_decay)

    def export(self, module: nn.Module) -> tuple[dict[str, Tensor], str]:
        """``(state dict, format)`` to publish: the linear model, or the network at ``w``."""
        if self.export_format == "network":
            return module.network_state_dict(), "network"
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, "linearized"

    # ------------------------------------------------------------- internals
    def _load_initial_weights(self, model: nn.Module) -> None:
        ctx = self._require_setup()
        ref = ctx.old_ref if self.init == "parent" else self.init
        _, source = ctx.load_model(ref, root=self.registry or None)
        state = (source.network_state_dict() if isinstance(source, LinearizedModel)
                 else source.state_dict())
        load_pretrained(model, state, self._require_setup())


def load_pretrained(model: nn.Module, state: dict[str, Tensor], ctx: UpgradeContext | None = None,
                    who: str = "lqf") -> None:
    """Copy a pretrained network's weights into ``model`` (in place).

    Every non-head tensor must exist with the same shape. The head is copied
    row by row for the classes both heads know: through ``ctx.old_classes``
    when it describes this head, else whole when the shapes agree; other rows
    keep ``model``'s initialization.
    """
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing = sorted(k for k in own if not k.startswith("head.") and k not in body)
    wrong = sorted(k for k in body if k in own and tuple(own[k].shape) != tuple(body[k].shape))
    extra = sorted(k for k in body if k not in own)
    if missing or wrong or extra:
        raise ConfigError(f"{who}: the pretrained weights do not fit the new network (missing {missing[:4]}, "
                          f"shape mismatch {wrong[:4]}, unexpected {extra[:4]}); train with the "
                          "parent's architecture (same --model and --model-arg)")
    with torch.no_grad():
        for k, v in body.items():
            own[k].copy_(v)
        w, b = state.get("head.weight"), state.get("head.bias")
        hw, hb = own["head.weight"], own["head.bias"]
        if w is None or b is None or w.shape[1] != hw.shape[1]:
            return
        if ctx is not None and ctx.old_classes is not None and len(ctx.old_classes) == w.shape[0]:
            for j, pos in enumerate(ctx.old_classes):
                if 0 <= int(pos) < hw.shape[0]:
                    hw[int(pos)].copy_(w[j])
                    hb[int(pos)].copy_(b[j])
        elif w.shape == hw.shape:
            hw.copy_(w)
            hb.copy_(b)
