"""Versioned model store with lineage and embedding spaces, on any pyarrow filesystem."""

from graceful_ray.registry.load import load_model
from graceful_ray.registry.manifest import Manifest
from graceful_ray.registry.store import Registry

__all__ = ["Manifest", "Registry", "load_model"]
