"""Where graceful-ray keeps its files unless told otherwise.

One project root, ``$GRACEFUL_RAY_ROOT`` (default ``./.graceful-ray``), holds the
registry, the training and tune runs and the reports, so every command's
defaults name the same places.
"""

from __future__ import annotations

import os

ROOT_ENV = "GRACEFUL_RAY_ROOT"


def project_root() -> str:
    """The project root: ``$GRACEFUL_RAY_ROOT``, else ``./.graceful-ray`` (absolute)."""
    return os.environ.get(ROOT_ENV, os.path.abspath(".graceful-ray"))


def under_root(*parts: str) -> str:
    """A place under the project root, e.g. ``under_root("tune")``."""
    return os.path.join(project_root(), *parts)


def registry_root(explicit: str | None = None) -> str:
    """The registry every command shares: ``explicit`` when given, else ``<root>/registry``."""
    return explicit or under_root("registry")
