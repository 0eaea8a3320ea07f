"""The first-order Taylor expansion of a network around its weights, as a module.

``LinearizedModel`` wraps an :class:`~graceful_ray.models.EmbeddingClassifier`
``f`` and computes

    f_lin(x; w) = f(x; w0) + J(x; w0) (w - w0)

for the embedding *and* the logits together: both are outputs of one function
of ``w``, pushed forward by one ``torch.func.jvp`` call. Forward-mode AD computes
``J(x; w0) v`` for a tangent ``v = w - w0`` at the cost of about one extra
forward pass; the Jacobian (``batch x outputs x parameters`` numbers) is never
materialized. Backpropagating through the tangent output gives
``J(x; w0)^T r``, so training ``w`` is training a linear model in ``w``: with a
squared loss the problem is convex (Achille et al., "LQF: Linear Quadratic
Fine-Tuning", CVPR 2021).

Parameterization. ``w0`` is stored as buffers (``w0.<name>``); only the
*difference* ``delta = w - w0`` of the linearized parameters is trainable
(``delta.<name>``, zero at the start). Weight decay on ``delta`` is the
``||w - w0||^2`` regularizer of the paper (it pulls towards the pretrained
weights, not towards zero). Parameters outside the linearized subset stay frozen
at ``w0``. The network's buffers (BatchNorm running statistics) are copied as
``buf.<name>``. (Names have their dots replaced by ``__``.)

Modes. The linearization is of the *eval-mode* network: BatchNorm uses its
running statistics (frozen at w0; a train-mode BatchNorm would make ``f`` depend
on the batch, so there would be no single function to linearize), dropout is
off. ``train()``/``eval()`` on this module do not change the function.

The wrapped network itself is kept as a template with empty placeholder tensors
(not a registered submodule): every call supplies all its parameters and
buffers through :func:`torch.func.functional_call`, so the state dict holds
exactly ``w0``, ``delta`` and the buffers, and ``.to(device)`` moves them all.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, jvp

from graceful_ray.errors import ConfigError
from graceful_ray.models.base import EmbeddingClassifier, ModelOutput

__all__ = ["LinearizedModel", "select_parameters", "parameter_blocks", "mangle"]


def mangle(name: str) -> str:
    """A parameter name as a buffer/parameter attribute name (no dots)."""
    return name.replace(".", "__")


class _Features(nn.Module):
    """``forward(x) -> (embedding, logits)`` so functional_call reaches forward_features."""

    def __init__(self, net: EmbeddingClassifier):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        emb, logits = self.net.forward_features(x)
        return emb, logits


def parameter_blocks(net: nn.Module) -> list[tuple[str, list[str]]]:
    """The network's blocks in definition order: each module that owns parameters
    directly, with the full names of those parameters (frozen ones included)."""
    blocks = []
    for mod_name, mod in net.named_modules():
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own:
            blocks.append((mod_name, [f"{mod_name}.{n}" if mod_name else n for n in own]))
    return blocks


def select_parameters(net: nn.Module, layers: str | Sequence[str] = "all") -> list[str]:
    """Names of the parameters to linearize.

    ``layers`` is ``"all"``; ``"last:N"`` (the last ``N`` blocks, a block being a
    module that owns parameters, e.g. a Conv1d or the head); or parameter-name
    prefixes, as a list or a comma-separated string (``"backbone.proj,head"``).
    Parameters with ``requires_grad=False`` in ``net`` are never linearized.
    """
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if isinstance(layers, str):
        spec = layers.strip()
        if spec == "all":
            chosen = names
        elif spec.startswith("last:"):
            try:
                k = int(spec[5:])
            except ValueError:
                raise ConfigError(f"lqf layers {layers!r}: 'last:N' needs an integer N") from None
            blocks = parameter_blocks(net)
            if not 1 <= k <= len(blocks):
                raise ConfigError(f"lqf layers {layers!r}: the network has {len(blocks)} blocks "
                                  f"({', '.join(b for b, _ in blocks)}); N must be 1..{len(blocks)}")
            wanted = {p for _, ps in blocks[-k:] for p in ps}
            chosen = [n for n in names if n in wanted]
        else:
            chosen = _by_prefix(names, [s.strip() for s in spec.split(",") if s.strip()], layers)
    else:
        chosen = _by_prefix(names, list(layers), layers)
    if not chosen:
        raise ConfigError(f"lqf layers {layers!r} select no trainable parameter")
    return chosen


def _by_prefix(names: list[str], prefixes: list[str], layers) -> list[str]:
    if not prefixes:
        raise ConfigError(f"lqf layers {layers!r}: give 'all', 'last:N' or parameter-name prefixes")
    for pre in prefixes:
        if not any(n == pre or n.startswith(pre.rstrip(".") + ".") for n in names):
            raise ConfigError(f"lqf layers: prefix {pre!r} matches no parameter; parameters are "
                              f"{names}")
    return [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]


def _assign(module: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if isinstance(value, nn.Parameter):
        mod._parameters[leaf] = value
    else:
        mod._buffers[leaf] = value


def _hollow_copy(net: nn.Module) -> nn.Module:
    """A copy of the architecture whose parameters and buffers are empty
    placeholders (every call supplies the real ones). Not the meta device: its
    kernels cost seconds of one-time set-up on first use."""
    memo = {id(t): nn.Parameter(torch.empty(0, dtype=t.dtype), requires_grad=False)
            for t in net.parameters()}
    memo.update({id(b): torch.empty(0, dtype=b.dtype) for b in net.buffers()})
    return copy.deepcopy(net, memo).eval()


class LinearizedModel(nn.Module):
    """``f(x; w0) + J(x; w0)(w - w0)`` of an EmbeddingClassifier, computed with jvp.

    Args:
        net: the network; its current weights become ``w0`` (copied).
        layers: which parameters are linearized (see :func:`select_parameters`);
            the others stay frozen at ``w0``.

    The module quacks like an :class:`EmbeddingClassifier` where the rest of
    graceful-ray needs it to: ``forward(x)`` returns logits,
    ``forward_features(x)`` returns ``(embedding, logits)``, and
    ``embedding_dim``, ``num_classes``, ``input_shape`` and ``head`` exist.
    """

    def __init__(self, net: EmbeddingClassifier, layers: str | Sequence[str] = "all") -> None:
        super().__init__()
        if not isinstance(net, EmbeddingClassifier):
            raise ConfigError(f"LinearizedModel wraps an EmbeddingClassifier, got {type(net).__name__}")
        names = [n for n, _ in net.named_parameters()]
        self.linearized: list[str] = select_parameters(net, layers)
        mangled = [mangle(n) for n in names]
        if len(set(mangled)) != len(mangled):
            raise ConfigError("parameter names collide once dots become '__'; rename the modules")
        params = dict(net.named_parameters())
        buffers = dict(net.named_buffers())
        self.w0 = nn.Module()
        self.delta = nn.Module()
        self.buf = nn.Module()
        for n in names:
            self.w0.register_buffer(mangle(n), params[n].detach().clone())
        for n in self.linearized:
            self.delta.register_parameter(mangle(n), nn.Parameter(torch.zeros_like(params[n].detach())))
        for n, b in buffers.items():
            self.buf.register_buffer(mangle(n), b.detach().clone())
        self._param_names = names
        self._buffer_names = list(buffers)
        object.__setattr__(self, "_template", _Features(_hollow_copy(net)))
        self.embedding_dim = int(net.embedding_dim)
        self.num_classes = int(net.num_classes)
        self.input_shape = tuple(net.input_shape)
        self.record_inputs = False  # K-FAC asks for the last training batch
        self.last_input: Tensor | None = None
        # Head calibration (see calibrate_head): pending until the first training
        # batch when set to a target RMS; the flag is saved so a resumed or
        # rebuilt model never calibrates twice.
        self.pending_head_rms: float | None = None
        self.register_buffer("head_calibrated", torch.zeros((), dtype=torch.bool))

    # ---------------------------------------------------------------- rebuild
    @classmethod
    def from_state_dict(cls, net: EmbeddingClassifier, state: dict[str, Tensor]) -> "LinearizedModel":
        """Rebuild from a state dict (e.g. a registry's "linearized" weights): the
        linearized subset is read off the ``delta.*`` keys."""
        by_mangled = {mangle(n): n for n, _ in net.named_parameters()}
        lin = []
        for key in state:
            if key.startswith("delta."):
                m = key[len("delta."):]
                if m not in by_mangled:
                    raise ConfigError(f"linearized weights have {key!r}, which is no parameter of the "
                                      "architecture")
                lin.append(by_mangled[m])
        if not lin:
            raise ConfigError("these weights are not a linearized model: no 'delta.*' entries")
        order = {n: i for i, n in enumerate(by_mangled.values())}
        model = cls(net, layers=sorted(lin, key=order.__getitem__))
        model.load_state_dict(state, strict=True)
        return model

    # ---------------------------------------------------------------- helpers
    @property
    def template(self) -> EmbeddingClassifier:
        """The wrapped architecture (with empty placeholders; weights are supplied per call)."""
        return self._template.net

    def w0_parameters(self) -> dict[str, Tensor]:
        return {n: getattr(self.w0, mangle(n)) for n in self._param_names}

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self.delta, mangle(n)) for n in self.linearized}

    def network_buffers(self) -> dict[str, Tensor]:
        return {n: getattr(self.buf, mangle(n)) for n in self._buffer_names}

    def call_network(self, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """The eval-mode network ``(embedding, logits)`` at weights ``params`` (all of them)."""
        tensors = {f"net.{k}": v for k, v in params.items()}
        tensors.update({f"net.{k}": v for k, v in self.network_buffers().items()})
        self._template.eval()
        return functional_call(self._template, tensors, (x,), strict=True)

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def scale_head_(self, scale: float, center: bool = True) -> None:
        """Replace the head at ``w0`` by ``scale * (W - mean_k W_k)``, ``scale * (b - mean b)``.

        For ``scale > 0`` this changes no decision (argmax is invariant to a
        positive scale and to a per-sample shift; centering the rows shifts every
        logit of a sample by the same amount), but it changes the linearization
        point: used to bring a cross-entropy head's logits to the scale of the
        squared loss's targets (see :meth:`calibrate_head`).
        """
        if not scale > 0:
            raise ConfigError(f"head scale must be > 0, got {scale}")
        w, b = getattr(self.w0, mangle("head.weight")), getattr(self.w0, mangle("head.bias"))
        if center:
            w.sub_(w.mean(dim=0, keepdim=True))
            b.sub_(b.mean())
        w.mul_(scale)
        b.mul_(scale)
        self.head_calibrated.fill_(True)

    @torch.no_grad()
    def calibrate_head(self, x: Tensor, target_rms: float) -> float:
        """Center the head at ``w0`` and scale it so that the centered logits on
        ``x`` have root-mean-square norm ``target_rms`` per sample; returns the
        scale. Decisions are unchanged (see :meth:`scale_head_`). The statistic
        is summed over DDP ranks when ``torch.distributed`` is initialized."""

        _, logits = self.call_network(self.w0_parameters(), x)
        centered = logits.double() - logits.double().mean(dim=1, keepdim=True)
        stats = torch.stack([(centered ** 2).sum(), torch.tensor(float(len(x)), dtype=torch.float64,
                                                                  device=centered.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        rms = float((stats[0] / stats[1].clamp(min=1)).sqrt())
        scale = float(target_rms) / rms if rms > 0 else 1.0
        self.scale_head_(scale)
        return scale

    def forward_features(self, x: Tensor) -> ModelOutput:
        if self.training and torch.is_grad_enabled():
            if self.pending_head_rms is not None and not bool(self.head_calibrated):
                self.calibrate_head(x, self.pending_head_rms)
            if self.record_inputs:
                self.last_input = x.detach()
        w0, deltas = self.w0_parameters(), self.delta_parameters()
        frozen = {n: t for n, t in w0.items() if n not in deltas}
        primals = {n: w0[n] for n in self.linearized}

        def f(lin: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return self.call_network({**frozen, **lin}, x)

        (emb0, logits0), (d_emb, d_logits) = jvp(f, (primals,), (deltas,))
        return ModelOutput(emb0 + d_emb, logits0 + d_logits)

    def tangent(self, x: Tensor, tangents: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``J(x; w0) u`` for a tangent ``u`` given on some parameters (the others
        zero): ``(d_embedding, d_logits)``, by one jvp. Exact curvature-vector
        products of the squared loss (``mean_i ||J_i u||^2 = u^T H u``) come
        from it without forming ``H``."""
        w0 = self.w0_parameters()
        frozen = {n: t for n, t in w0.items() if n not in tangents}

        def f(sub: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return self.call_network({**frozen, **sub}, x)

        _, (d_emb, d_logits) = jvp(f, ({n: w0[n] for n in tangents},), (dict(tangents),))
        return d_emb, d_logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).logits

    def embed(self, x: Tensor) -> Tensor:
        return self.forward_features(x).embedding

    # ----------------------------------------------------------------- export
    def network_state_dict(self) -> dict[str, Tensor]:
        """Plain network weights ``w = w0 + delta`` (and the buffers), detached."""
        w0, deltas = self.w0_parameters(), self.delta_parameters()
        out = {n: (w0[n] + deltas[n] if n in deltas else w0[n]).detach().clone() for n in self._param_names}
        out.update({n: b.detach().clone() for n, b in self.network_buffers().items()})
        return out

    def to_network(self) -> EmbeddingClassifier:
        """The original architecture with weights ``w``, in eval mode.

        This is the *network* at ``w``, not the linear model: the two agree to
        first order in ``w - w0`` (exactly at ``w = w0``).
        """
        net = copy.deepcopy(self.template)
        params = set(self._param_names)
        for name, value in self.network_state_dict().items():
            _assign(net, name, nn.Parameter(value) if name in params else value)
        return net.eval()

    def w0_device(self) -> torch.device:
        return next(iter(self.w0_parameters().values())).device

    @property
    def head(self) -> nn.Linear:
        """The head of the *network* at ``w`` (a copy). Note that the linearized
        logits are not exactly ``head(embedding)``: they differ by the
        second-order term ``delta_W J_z delta`` (zero when the head or the backbone
        is not linearized). Methods that use an old model's head (BCT) get this
        first-order approximation."""
        w = self.network_state_dict()
        head = nn.Linear(self.embedding_dim, self.num_classes, device=w["head.weight"].device)
        with torch.no_grad():
            head.weight.copy_(w["head.weight"])
            head.bias.copy_(w["head.bias"])
        return head

    def extra_repr(self) -> str:
        n_lin = sum(p.numel() for p in self.delta_parameters().values())
        n_all = sum(p.numel() for p in self.w0_parameters().values())
        return f"linearized={n_lin}/{n_all} parameters ({len(self.linearized)} tensors)"
