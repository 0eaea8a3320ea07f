"""A registry version as a model: its verified weights rebuilt into the network its manifest names.

The store (:mod:`graceful_ray.registry.store`) holds versions, weights and
manifests; it does not build networks. This module joins the two: the
manifest's ``architecture`` (a :class:`~graceful_ray.models.factory.ModelSpec`)
builds the network, and its ``format`` says how the stored state becomes the
model (:mod:`graceful_ray.models.formats`: ``network`` loads the state into the
network; a method's own format, such as LQF's ``linearized``, is registered by
that method).
"""

from __future__ import annotations

import os

from torch import nn

from graceful_ray.errors import ConfigError, ModelError, RegistryError
from graceful_ray.models.factory import ModelSpec, build_model
from graceful_ray.models.formats import formats, rebuild
from graceful_ray.registry.manifest import Manifest
from graceful_ray.registry.store import Registry


def load_model(registry: Registry | str | os.PathLike, ref: str) -> tuple[Manifest, nn.Module]:
    """``(manifest, model)``: version ``ref`` of ``registry`` (a :class:`Registry` or its
    root) rebuilt from its spec, weights loaded and verified, in eval mode.

    Format ``network`` gives the network itself; a method's own format gives
    what that method registered in :mod:`graceful_ray.models.formats` (LQF's
    ``linearized``: the linearized function that was trained, with the same
    ``forward`` / ``forward_features`` interface).
    """
    registry = registry if isinstance(registry, Registry) else Registry(registry)
    manifest, state = registry.load_state_dict(ref)
    if manifest.format not in formats():
        raise RegistryError(
            f"{manifest.ref} is stored in format {manifest.format!r}, which this version of "
            "graceful-ray cannot rebuild; load its weights with Registry.load_state_dict")
    network = build_model(ModelSpec.from_dict(manifest.architecture))
    try:
        model = rebuild(manifest.format, network, state)
    except ConfigError as e:
        raise RegistryError(
            f"{manifest.ref} is stored in format {manifest.format!r} but its weights do not "
            f"rebuild a {manifest.architecture.get('factory')!r} in it: {e}") from e
    except RuntimeError as e:
        raise ModelError(f"{manifest.ref}: weights do not fit the architecture "
                         f"{manifest.architecture}: {e}") from e
    model.eval()
    return manifest, model
