"""Logit difference inhibition (ELODI, Zhao et al., 2022).

``L = CE + lambda * mean_i mean_c max(|z_new,ic - z_ref,ic| - xi, 0)^p``

A dead-zone penalty on logit differences: differences up to ``xi`` are free, so
the new model keeps room to improve, while large departures from the reference
(which cause flips) are inhibited. By default the reference is the old model
(``MethodBatch.old_logits``, from the cache or the online teacher). The paper
recommends an *ensemble* reference: ``elodi_refs`` names several registry
versions (``"NAME@v1,NAME@v5,..."``, e.g. models trained like v1 with other
seeds; list the old model too if it should be one of them), and the reference
is the mean of their logits, run on the same (augmented) batch inputs
(``MethodBatch.x``). An ensemble's average departs less from any one member than
members do from each other, so inhibiting differences to it removes the
seed-to-seed churn that causes flips without pinning v2 to v1's own mistakes.
xi = 0.5, p = 2 are the paper's values for one reference model. Only classes
the new head and every reference share are compared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graceful_ray.errors import ConfigError
from graceful_ray.methods.base import MethodBatch, UpgradeContext, check_nonnegative, check_positive, upcast
from graceful_ray.methods.focal_distillation import _Distillation
from graceful_ray.methods.registry import register_method

# Read by graceful_ray/methods/catalog.py without importing this file (a plain literal).
METHOD_INFO = {
    "elodi": {"help": "logit difference inhibition against the old logits, or the mean logits of "
                      "reference models (elodi_refs=NAME@v1,NAME@v5)",
              "hyperparameters": {"elodi_lambda": 1.0, "elodi_xi": 0.5, "elodi_p": 2.0, "elodi_refs": ""},
              "space": {"elodi_lambda": "loguniform:0.01:10", "elodi_xi": "uniform:0.1:1"},
              "tradeoff": {"order": 30}},
}


def logit_difference_inhibition_loss(new_logits: Tensor, ref_logits: Tensor, xi: float = 0.5,
                                     p: float = 2.0) -> Tensor:
    """Per-sample ``mean_c max(|new_c - ref_c| - xi, 0)^p``, shape ``(B,)``; ref is a constant."""
    gap = (upcast(new_logits) - upcast(ref_logits.detach())).abs() - float(xi)
    return gap.clamp_min(0.0).pow(float(p)).mean(dim=1)


def parse_refs(refs) -> list[str]:
    """``"a@v1, a@v5"`` or ``["a@v1", "a@v5"]`` -> ``["a@v1", "a@v5"]`` (``""``: none)."""
    items = refs.split(",") if isinstance(refs, str) else list(refs or [])
    out = [str(r).strip() for r in items if str(r).strip()]
    if len(set(out)) != len(out):
        raise ConfigError(f"elodi: elodi_refs names a model twice: {out}")
    return out


def ensemble_logits(models: list[torch.nn.Module], positions: list[Tensor], x: Tensor) -> Tensor:
    """The mean of the reference models' logits on ``x``, each restricted to ``positions[k]``; a constant."""
    with torch.no_grad():
        return torch.stack([m(x).float().index_select(1, pos.to(x.device))
                            for m, pos in zip(models, positions)]).mean(0)


@register_method("elodi")
class ELODI(_Distillation):
    """Cross-entropy plus ``lam`` times the logit difference inhibition loss. Part ``elodi``.

    Hyperparameters ``elodi_lambda``, ``elodi_xi``, ``elodi_p``, ``elodi_refs``
    (``""``: the old model is the reference; else comma-separated registry refs
    whose mean logits are, loaded from the trainer's registry).
    """

    name = "elodi"
    prefix = "elodi"
    kind = "lm"  # unused; keeps the shared validation happy
    alpha, beta, temperature = 1.0, 0.0, 1.0

    def __init__(self, *, lam: float = 1.0, xi: float = 0.5, p: float = 2.0, refs: str = "") -> None:
        super().__init__()
        self.lam, self.xi, self.p = float(lam), float(xi), float(p)
        self._refs = parse_refs(refs)
        self.refs = ",".join(self._refs)
        self._validate()
        check_nonnegative("elodi", elodi_xi=self.xi)
        check_positive("elodi", elodi_p=self.p)
        self._ref_models: list[torch.nn.Module] = []
        self._ref_positions: list[Tensor] = []
        self._ref_columns: Tensor | None = None

    def setup(self, ctx: UpgradeContext) -> None:
        super().setup(ctx)
        if not self._refs:
            return
        if ctx.load_model is None:
            raise ConfigError("elodi: elodi_refs are registry versions, but the trainer passed no "
                              "model loader (UpgradeContext.load_model)")
        new_classes = list(ctx.classes) if ctx.classes is not None else list(range(ctx.num_classes))
        loaded = []
        for ref in self._refs:
            manifest, model = ctx.load_model(ref)
            for p in model.parameters():
                p.requires_grad_(False)
            loaded.append((manifest, model.eval()))
        shared = [c for c in new_classes if all(c in m.classes for m, _ in loaded)]
        if not shared:
            raise ConfigError(f"elodi: the references {self._refs} share no class with the new model")
        self.set_references([m for _, m in loaded], [list(m.classes) for m, _ in loaded], new_classes, shared)

    def set_references(self, models: list[torch.nn.Module], ref_classes: list[list[int]],
                       new_classes: list[int], shared: list[int]) -> None:
        """Use ``models`` (global class ids ``ref_classes[k]``) as the reference ensemble, on classes ``shared``."""
        self._ref_models = list(models)
        self._ref_positions = [torch.tensor([list(rc).index(c) for c in shared]) for rc in ref_classes]
        self._ref_columns = torch.tensor([new_classes.index(c) for c in shared])

    def to(self, device):
        super().to(device)
        self._ref_models = [m.to(device) for m in self._ref_models]
        self._ref_positions = [p.to(device) for p in self._ref_positions]
        return self

    def extra_loss(self, batch: MethodBatch) -> dict[str, Tensor]:
        if self._ref_models:
            self._require_setup()
            (x,) = self._require(batch, "x")
            assert self._ref_columns is not None
            new = batch.new_logits.index_select(1, self._ref_columns.to(batch.new_logits.device))
            ref = ensemble_logits(self._ref_models, self._ref_positions, x)
        else:
            new, ref = self.aligned_logits(batch)
        return {"elodi": self.lam * logit_difference_inhibition_loss(new, ref, self.xi, self.p).mean()}
