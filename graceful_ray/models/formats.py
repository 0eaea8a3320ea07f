"""How a registry model's weights are stored ("format") and the model rebuilt from them.

``network`` is a network's own ``state_dict``. A method whose trained model is
not a plain network registers its format here, beside its own code (LQF's
``linearized``: the parent's weights plus the linear displacement), so the
registry rebuilds every model without knowing any method.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

#: (the network built from the manifest's architecture, the stored state) -> the model
Rebuild = Callable[[nn.Module, Mapping[str, torch.Tensor]], nn.Module]


def _network(network: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    network.load_state_dict(state, strict=True)
    return network


_FORMATS: dict[str, Rebuild] = {"network": _network}


def register_format(name: str, rebuild: Rebuild) -> None:
    """Make ``name`` a storable format; ``rebuild`` turns the stored state into the model."""
    _FORMATS[name] = rebuild


def formats() -> list[str]:
    return sorted(_FORMATS)


def rebuild(name: str, network: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model stored in format ``name`` (a KeyError for one nobody registered)."""
    return _FORMATS[name](network, state)
