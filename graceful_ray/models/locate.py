"""``package.module:callable`` -> the callable: how a user's own model factory is named."""

from __future__ import annotations

import importlib
from typing import Any

from graceful_ray.errors import ModelError


def locate(path: str) -> Any:
    """Import ``package.module`` and return its attribute ``callable`` (one-line error otherwise)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"{path!r} is not an import path 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import model module {module_name!r} for {path!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelError(f"module {module_name!r} has no attribute {attr!r} (model {path!r})") from None
