"""Training objectives for graceful model upgrades, Composer-style.

Each method is a pure loss function plus a thin adapter class with one job:
given a batch (labels, new outputs, old outputs) return the loss and its parts.
Methods compose with ``+``; :func:`build_method` turns a spec such as
``"bct+fd"`` and prefixed hyperparameters (``bct_lambda``, ``fd_beta`` ...) into
one object the trainer drives without knowing which method it is.

A method is one file under this package (or a module named in
``$GRACEFUL_RAY_METHOD_MODULES``): the class, registered with
``@register_method(name)``, and its ``METHOD_INFO`` declaration (help line,
hyperparameters and defaults, Tune ranges), which :mod:`.catalog` reads.

Importing this package does not import torch: the catalogue (what methods
exist, their help and hyperparameters) is all the CLI needs to list them and to
refuse an unknown ``--method``, in milliseconds. The classes, losses and the
registry (:mod:`.api`, torch) load on first use of any of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

# an attribute of the package from the start, so ``from graceful_ray.methods import
# catalog`` never falls through to __getattr__ (which loads torch)
from graceful_ray.methods import catalog  # noqa: F401


def __getattr__(name: str) -> Any:
    # PEP 562: the torch side (classes, losses, the registry) on first use, not at import
    if name.startswith("__"):
        raise AttributeError(name)
    api = importlib.import_module("graceful_ray.methods.api")
    try:
        return getattr(api, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
