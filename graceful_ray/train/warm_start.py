"""Warm start (``--init-from-old``): v2 begins training at v1's weights.

The simplest backward-compatibility baseline: a model fine-tuned from its
predecessor stays near it in weight space and so repeats more of its decisions
than one trained from scratch (it is also where weight interpolation,
``graceful_ray.interpolate``, works best: the two ends share a basin). It needs the
old model's architecture: every backbone tensor must exist with the same shape;
head rows are copied for the classes both heads know (``UpgradeContext.old_classes``),
rows of added classes keep their fresh initialisation. A model that does not fit
is refused with a clear error before any worker starts.
"""

from __future__ import annotations

from torch import nn

from graceful_ray.errors import ConfigError
from graceful_ray.methods import UpgradeContext
from graceful_ray.methods.lqf import LinearizedModel, load_pretrained
from graceful_ray.registry import load_model


def warm_start(model: nn.Module, registry: str | None, ctx: UpgradeContext) -> None:
    """Load the old model ``ctx.old_ref`` from ``registry`` into ``model`` (in place)."""

    if not ctx.old_ref or not registry:
        raise ConfigError("init_from_old needs the old model (--old NAME@VERSION) and its registry")
    manifest, old = load_model(registry, ctx.old_ref)
    state = old.network_state_dict() if isinstance(old, LinearizedModel) else old.state_dict()
    try:
        load_pretrained(model, state, ctx, who="init_from_old")
    except ConfigError as e:
        raise ConfigError(f"{e} (the old model {manifest.ref} is {manifest.architecture})") from None
