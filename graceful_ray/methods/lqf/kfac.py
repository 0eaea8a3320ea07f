"""K-FAC preconditioning (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions).

For a layer ``s = W a`` (``a`` the layer input with a trailing 1 for the bias,
``s`` its output) the Gauss-Newton/Fisher block of ``vec([W b])`` is approximated
by a Kronecker product ``A (x) G`` with

    A = E[a a^T]    (input covariance, (in+1) x (in+1))
    G = E[g g^T]    (covariance of the gradient w.r.t. the output, out x out)

and the preconditioned gradient of the ``out x (in+1)`` gradient matrix ``M`` is
``(G + gamma_G I)^-1 M (A + gamma_A I)^-1``: Tikhonov damping split between the
factors in proportion to their mean eigenvalues (``pi``, Martens & Grosse section
6.3). By default the damping is *relative*: ``gamma_A = sqrt(lambda) tr(A)/dim A``,
``gamma_G = sqrt(lambda) tr(G)/dim G``, i.e. ``lambda`` times the mean eigenvalue
of ``A (x) G`` (the curvature of a fine-tuned network spans orders of magnitude
between layers, so no absolute ``lambda`` suits them all);
``relative_damping=False`` gives the paper's absolute form
``gamma_A = pi sqrt(lambda)``, ``gamma_G = sqrt(lambda) / pi``.

Supported layers: ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d`` (groups 1, zero
padding given as integers). For a convolution ``a`` is the unfolded input patch
at each output position (``in * kernel + 1``); following KFC's spatially
uncorrelated derivatives assumption, ``A`` sums the patch covariance over
positions (mean over samples) and ``G`` averages the output-gradient covariance
over positions. Any other linearized parameter (BatchNorm's affine, an
unsupported conv) gets the identity, i.e. a plain SGD step.

**What is preconditioned in LQF, and why.** LQF trains the linear model
``f_lin(x; w0 + d) = f(x; w0) + J(x; w0) d``. Its "layers" are tangent layers: the
tangent of a linear layer's output is ``ds = dW a + W da`` where ``a`` is the
*primal* input at ``w0``. So the gradient with respect to ``dW`` is ``g~ a^T``,
with ``a`` the network's input to that layer at ``w0`` and ``g~`` the gradient of
the loss w.r.t. the tangent output, which is backpropagated by the same
(transposed) Jacobians as in the network at ``w0``. For the squared loss
``0.5 ||f_lin - t||^2`` the Hessian of the linear problem is exactly the
Gauss-Newton matrix ``E[J^T J]`` of the network at ``w0``; it does not depend on
``d`` or on the residual. We therefore precondition with the K-FAC factors of the
*original network at w0* (as the LQF paper does):

* ``A`` from the layer inputs of a forward pass of the network at ``w0``;
* ``G`` from ``g = J_l^T v`` with ``v ~ N(0, I)`` on the logits, i.e. a backward
  pass of ``(logits * v).sum()`` through the network at ``w0``: a Monte-Carlo
  estimate of the Gauss-Newton matrix of the squared loss (whose output
  Hessian is the identity). Using ``v`` instead of the residual keeps ``G``
  from vanishing as the fit improves (the empirical-Fisher failure mode).

Schedule. Because this curvature is constant for LQF, the factors are a running
*mean* over every batch seen (``stat_decay=None``; an exponential moving average
is available for non-stationary use). Statistics are collected on every step
(``cov_every``; one extra forward and backward of the plain network, cheaper
than the jvp step itself); the inverses are recomputed every ``update_every``
steps, and on each of the first ``WARMUP_STEPS`` steps, since factors from one
batch are rank-deficient and their damped inverse blows up any gradient
component that batch did not span (observed: divergence within 3 steps).

Per-layer step scale (``rescale``). The spatially-uncorrelated-derivatives
assumption makes K-FAC underestimate a convolution's curvature by up to its
number of output positions (on the benchmark's cnn1d the best step along the
conv layers' K-FAC direction was 0.02-0.05, along the linear layers' about 1).
The linear model gives the exact curvature along any direction for one jvp
(``u^T H u = mean_i ||J_i u||^2``), so at each refresh every layer's step is
scaled by the exact minimizer ``alpha = g^T u / u^T H u`` along its K-FAC
direction ``u`` (clipped to [1e-4, 10]). ``lr`` multiplies on top: with
``rescale`` a step of ``lr = 1`` is a per-layer exact line search, and summing
``L`` layers' such steps can overshoot by up to ``L``, so use ``lr`` around
``1/L`` without momentum and ten times less with momentum 0.9.

A composite objective (``lqf+fd``) is preconditioned with the same factors: the
focal-distillation term adds a (bounded) multiple of the same ``J^T J``
structure on the logits. Conventions: ``A`` and ``G`` are per-sample (``g`` is
the gradient of one sample's loss) and the minimized loss is the batch *mean*,
so ``A (x) G`` approximates its Hessian. Factors are averaged over DDP ranks
when ``torch.distributed`` is initialized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from graceful_ray.errors import ConfigError

WARMUP_STEPS = 10

__all__ = ["KFACOptimizer", "KFACLayer", "kfac_layers", "linear_factors", "conv_factors", "supports"]


@dataclass
class KFACLayer:
    """One preconditioned layer: the module in the network and its trainable tensors."""

    name: str  # module name in the network
    module: nn.Module
    weight: nn.Parameter  # the trainable tensor for the layer's weight (LQF: its delta)
    bias: nn.Parameter | None  # the trainable tensor for its bias, if trained

    @property
    def in_dim(self) -> int:
        return self.weight[0].numel() + (1 if self.bias is not None else 0)


def supports(module: nn.Module) -> bool:
    """Whether K-FAC factors are defined for ``module`` here."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))
    return False


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, dilation, padding, stride) as 2-D tuples (a Conv1d is a 1 x k Conv2d)."""
    if isinstance(module, nn.Conv1d):
        k, d, p, s = (int(v[0]) if isinstance(v, tuple) else int(v)
                      for v in (module.kernel_size, module.dilation, module.padding, module.stride))
        return (1, k), (1, d), (0, p), (1, s)
    return tuple(tuple(int(e) for e in v) for v in (module.kernel_size, module.dilation, module.padding,
                                                   module.stride))


def linear_factors(a: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """``(A, G)`` of a linear layer from inputs ``a`` (B, ..., in) and output
    gradients ``g`` (B, ..., out): ``A = E_b[sum_t a a^T]`` (with a ones column
    when ``bias``), ``G = E_{b,t}[g g^T]`` (``t`` = extra positions, if any)."""
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1]).float()
    g = g.reshape(-1, g.shape[-1]).float()
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    a = a.reshape(-1, a.shape[-1])
    return a.T @ a / n, g.T @ g / g.shape[0]


def conv_factors(module: nn.Module, x: Tensor, g: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """``(A, G)`` of a Conv1d/Conv2d from its input ``x`` and output gradient ``g``
    (KFC: ``A`` sums unfolded-patch covariances over output positions)."""
    kernel, dilation, padding, stride = _conv_geometry(module)
    if isinstance(module, nn.Conv1d):
        x, g = x.unsqueeze(2), g.unsqueeze(2)
    n = x.shape[0]
    patches = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)  # B, C*k, T
    patches = patches.transpose(1, 2)  # B, T, C*k
    if bias:
        patches = torch.cat([patches, patches.new_ones(*patches.shape[:-1], 1)], dim=-1)
    patches = patches.reshape(-1, patches.shape[-1])
    gg = g.float().flatten(2).transpose(1, 2).reshape(-1, g.shape[1])  # B*T, out
    return patches.T @ patches / n, gg.T @ gg / gg.shape[0]


def kfac_layers(model: nn.Module) -> list[KFACLayer]:
    """The K-FAC layers of a :class:`~graceful_ray.methods.lqf.LinearizedModel`: its
    linearized Linear/Conv layers, paired with their ``delta`` tensors."""
    deltas = model.delta_parameters()
    out = []
    for name, mod in model.template.named_modules():
        if not supports(mod):
            continue
        w = deltas.get(f"{name}.weight")
        if w is None:
            continue
        out.append(KFACLayer(name, mod, w, deltas.get(f"{name}.bias")))
    return out


class KFACOptimizer(torch.optim.Optimizer):
    """SGD with momentum on K-FAC-preconditioned gradients of a LinearizedModel.

    ``step()`` (called after ``backward()``): every ``cov_every`` steps it runs the
    network at ``w0`` on the batch the model last saw in training and folds the
    batch's ``(A, G)`` into the running factors; on refresh steps (see the module
    docstring) it re-inverts them and refits the per-layer scales; then for each
    K-FAC layer it replaces the gradient ``M`` (with weight decay added,
    ``M + weight_decay * delta``) by ``scale * G_d^-1 M A_d^-1``, applies momentum
    and steps. Other trainable tensors take the plain (decayed) gradient.

    Args:
        model: the :class:`LinearizedModel` being trained.
        lr, momentum, weight_decay: as in ``torch.optim.SGD`` (L2 coupled,
            i.e. added to the gradient before preconditioning).
        damping: Tikhonov ``lambda`` (relative to the mean eigenvalue of
            ``A (x) G`` with ``relative_damping``, else absolute and split by
            ``pi`` when ``pi_damping``).
        update_every: recompute the inverses (and scales) every this many steps.
        cov_every: collect factor statistics every this many steps.
        rescale: fit each layer's step to the exact curvature along it.
        stat_decay: ``None`` for a running mean over all collected batches (the
            curvature of LQF is constant), else an exponential decay in (0, 1).
        kl_clip: optional trust region: scale the step so that
            ``lr^2 * <update, grad> <= kl_clip`` (Ba et al., 2017).
        seed: seeds the Monte-Carlo output vectors ``v``.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, *, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 1e-3, update_every: int = 10,
                 relative_damping: bool = True, pi_damping: bool = True, stat_decay: float | None = None,
                 kl_clip: float | None = None, rescale: bool = True, cov_every: int = 1,
                 seed: int = 0) -> None:
        if not lr > 0:
            raise ConfigError(f"K-FAC: lr must be > 0, got {lr}")
        if not damping > 0:
            raise ConfigError(f"K-FAC: damping must be > 0, got {damping}")
        if int(update_every) < 1 or int(cov_every) < 1:
            raise ConfigError(f"K-FAC: update_every and cov_every must be >= 1, got {update_every}, "
                              f"{cov_every}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"K-FAC: momentum must be in [0, 1), got {momentum}")
        if stat_decay is not None and not 0 < stat_decay < 1:
            raise ConfigError(f"K-FAC: stat_decay must be None or in (0, 1), got {stat_decay}")
        if not hasattr(model, "delta_parameters"):
            raise ConfigError("KFACOptimizer preconditions a LinearizedModel")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.model = model
        self.layers = kfac_layers(model)
        self.damping = float(damping)
        self.update_every = int(update_every)
        self.cov_every = int(cov_every)
        self.relative_damping = bool(relative_damping)
        self.pi_damping = bool(pi_damping)
        self.stat_decay = stat_decay
        self.kl_clip = kl_clip
        self.rescale = bool(rescale)
        self.seed = int(seed)
        model.record_inputs = True
        # Global progress lives in the state dict (under a string key) so a
        # resumed run continues the same factor schedule.
        self.state["kfac"] = {"steps": 0, "collected": 0}

    # ------------------------------------------------------------- statistics
    def batch_factors(self, x: Tensor, v: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """This batch's ``(A, G)`` for every layer (by module name), from the network
        at ``w0``; ``v`` (B, K) are the output vectors backpropagated for ``G``
        (default: standard normal, seeded by the step)."""
        model = self.model
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        handles = []
        for layer in self.layers:
            def hook(mod, args, out, name=layer.name):
                inputs[name] = args[0].detach()
                outputs[name] = out
            handles.append(layer.module.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                x = x.detach().clone().requires_grad_(True)  # puts every layer output in the graph
                _, logits = model.call_network(model.w0_parameters(), x)
                if v is None:
                    gen = torch.Generator(device="cpu").manual_seed(
                        self.seed * 1_000_003 + self.state["kfac"]["steps"])
                    v = torch.randn(logits.shape, generator=gen)
                v = v.to(logits.device, logits.dtype)
                names = [layer.name for layer in self.layers]
                grads = torch.autograd.grad((logits * v).sum(), [outputs[n] for n in names])
        finally:
            for h in handles:
                h.remove()
        out = {}
        for layer, g in zip(self.layers, grads):
            a = inputs[layer.name]
            bias = layer.bias is not None
            if isinstance(layer.module, nn.Linear):
                out[layer.name] = linear_factors(a, g, bias)
            else:
                out[layer.name] = conv_factors(layer.module, a, g, bias)
        return out

    @torch.no_grad()
    def update_factors(self, x: Tensor) -> None:
        """Fold the factors of batch ``x`` into the running ones and re-invert."""
        self.accumulate(x)
        self.invert()

    @torch.no_grad()
    def invert(self) -> None:
        """Recompute the damped inverses of the running factors."""
        for layer in self.layers:
            st = self.state[layer.weight]
            st["A_inv"], st["G_inv"] = self._damped_inverses(st["A"], st["G"])

    @torch.no_grad()
    def accumulate(self, x: Tensor) -> None:
        """Fold the factors of batch ``x`` into the running ones (no inversion)."""
        batch = self.batch_factors(x)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for a, g in batch.values():
                dist.all_reduce(a)
                dist.all_reduce(g)
                a.div_(world)
                g.div_(world)
        glob = self.state["kfac"]
        glob["collected"] += 1
        k = glob["collected"]
        w_new = 1.0 / k if self.stat_decay is None else max(1.0 - self.stat_decay, 1.0 / k)
        for layer in self.layers:
            a, g = batch[layer.name]
            st = self.state[layer.weight]
            if "A" not in st:
                st["A"], st["G"] = a.clone(), g.clone()
            else:
                st["A"].mul_(1 - w_new).add_(a, alpha=w_new)
                st["G"].mul_(1 - w_new).add_(g, alpha=w_new)

    def damping_terms(self, A: Tensor, G: Tensor) -> tuple[float, float]:
        """``(gamma_A, gamma_G)`` added to the factors' diagonals; their product is
        the damping of the Kronecker product (``lambda``, or ``lambda`` times the
        mean eigenvalue of ``A (x) G`` when ``relative_damping``)."""
        root = math.sqrt(self.damping)
        ta = max(float(torch.trace(A)) / A.shape[0], 0.0)
        tg = max(float(torch.trace(G)) / G.shape[0], 0.0)
        if self.relative_damping and ta > 0 and tg > 0:
            return root * ta, root * tg
        pi = math.sqrt(ta / tg) if (self.pi_damping and ta > 0 and tg > 0) else 1.0
        return pi * root, root / pi

    def _damped_inverses(self, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        gamma_a, gamma_g = self.damping_terms(A, G)
        eye_a = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
        eye_g = torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
        a_inv = torch.linalg.inv(A.double() + gamma_a * eye_a)
        g_inv = torch.linalg.inv(G.double() + gamma_g * eye_g)
        return a_inv.float(), g_inv.float()

    def _fit_scale(self, layer: KFACLayer, gw: Tensor, gb: Tensor | None, uw: Tensor,
                   ub: Tensor | None) -> None:
        """Scale this layer's K-FAC step to the exact curvature along it.

        K-FAC's scale can be off per layer: for convolutions the spatially
        uncorrelated derivatives assumption underestimates the curvature by up to
        the number of positions (neighbouring positions' gradients are strongly
        correlated). The linear model gives the exact answer cheaply:
        ``u^T H u = mean_i ||J_i u||^2`` is one jvp on the refresh batch, and
        ``alpha = g^T u / (u^T H u)`` minimizes the quadratic along ``u``. The
        layer's steps are multiplied by ``alpha`` (clipped to [1e-4, 10]) until
        the next refresh; ``lr`` stays a global multiplier on top.
        """
        x = self.model.last_input
        tangents = {self._name_of(layer.weight): uw}
        if layer.bias is not None and ub is not None:
            tangents[self._name_of(layer.bias)] = ub
        with torch.enable_grad():
            _, d_logits = self.model.tangent(x.detach(), {k: v.detach() for k, v in tangents.items()})
        curvature = float((d_logits.detach().float() ** 2).sum(dim=1).mean())
        wd = self.param_groups[0]["weight_decay"]
        curvature += wd * float((uw * uw).sum() + ((ub * ub).sum() if ub is not None else 0.0))
        slope = float((gw * uw).sum() + ((gb * ub).sum() if gb is not None and ub is not None else 0.0))
        if curvature > 0 and slope > 0 and math.isfinite(slope / curvature):
            self.state[layer.weight]["scale"] = min(10.0, max(1e-4, slope / curvature))

    def _name_of(self, p: Tensor) -> str:
        if not hasattr(self, "_names"):
            self._names = {id(t): n for n, t in self.model.delta_parameters().items()}
        return self._names[id(p)]

    # ------------------------------------------------------------------- step
    def precondition(self, layer: KFACLayer, grad_w: Tensor, grad_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``G^-1 [grad_w grad_b] A^-1`` reshaped back to the tensors' shapes."""
        st = self.state[layer.weight]
        m = grad_w.reshape(grad_w.shape[0], -1)
        if grad_b is not None:
            m = torch.cat([m, grad_b.reshape(-1, 1)], dim=1)
        u = st["G_inv"] @ m @ st["A_inv"]
        if grad_b is not None:
            return u[:, :-1].reshape(grad_w.shape), u[:, -1].reshape(grad_b.shape)
        return u.reshape(grad_w.shape), None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        glob = self.state["kfac"]
        t = glob["steps"]
        # Warm-up: refresh at each of the first steps, while the running factors
        # hold few samples (a factor estimated from one batch is rank-deficient and
        # its damped inverse blows up gradient components the batch did not span).
        refreshed = bool(self.layers) and (t < min(self.update_every, WARMUP_STEPS)
                                           or t % self.update_every == 0)
        if self.layers and (t % self.cov_every == 0 or refreshed):
            x = self.model.last_input
            if x is None:
                raise ConfigError("K-FAC needs the training batch: run the LinearizedModel forward "
                                  "(in training, with gradients) before optimizer.step()")
            self.accumulate(x)
        if refreshed:
            self.invert()
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]

        def decayed(p: Tensor) -> Tensor | None:
            if p.grad is None:
                return None
            return p.grad.add(p, alpha=wd) if wd else p.grad.clone()

        updates: dict[int, tuple[Tensor, Tensor]] = {}  # id(p) -> (p, update)
        grads: dict[int, Tensor] = {}
        covered = set()
        for layer in self.layers:
            gw = decayed(layer.weight)
            gb = decayed(layer.bias) if layer.bias is not None else None
            covered.add(id(layer.weight))
            if layer.bias is not None:
                covered.add(id(layer.bias))
            if gw is None and gb is None:
                continue
            if gw is None:
                gw = torch.zeros_like(layer.weight)
            if layer.bias is not None and gb is None:
                gb = torch.zeros_like(layer.bias)
            uw, ub = self.precondition(layer, gw, gb)
            if self.rescale:
                if refreshed:
                    self._fit_scale(layer, gw, gb, uw, ub)
                s = self.state[layer.weight].get("scale", 1.0)
                uw = uw * s
                ub = ub * s if ub is not None else None
            updates[id(layer.weight)] = (layer.weight, uw)
            grads[id(layer.weight)] = gw
            if layer.bias is not None:
                updates[id(layer.bias)] = (layer.bias, ub)
                grads[id(layer.bias)] = gb
        for p in group["params"]:
            if id(p) in covered:
                continue
            g = decayed(p)
            if g is not None:
                updates[id(p)] = (p, g)
                grads[id(p)] = g

        scale = 1.0
        if self.kl_clip is not None and updates:
            vg = sum(float((u * grads[k]).sum()) for k, (_, u) in updates.items())
            if vg > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / (lr * lr * vg)))

        for _, (p, u) in updates.items():
            if scale != 1.0:
                u = u * scale
            st = self.state[p]
            if mom:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = u.clone()
                else:
                    buf.mul_(mom).add_(u)
                u = buf
            p.add_(u, alpha=-lr)
        glob["steps"] += 1
        return loss
