"""Errors of the retrieval package: each says what is wrong and what to do.

They extend the package-wide families in :mod:`graceful_ray.errors`, so a
caller that catches ``ValueError`` / ``IncompatibleModelError`` still catches
them, and the CLI prints them as one line.
"""

from __future__ import annotations

from graceful_ray.errors import GracefulRayError, IncompatibleModelError


class GalleryError(GracefulRayError, ValueError):
    """A gallery is missing, damaged, or an operation on it is not possible."""


class QueryError(GracefulRayError, ValueError):
    """Query embeddings (or ``k``) do not fit the gallery: wrong dimension, NaN, empty."""


class EmbeddingSpaceError(IncompatibleModelError):
    """A model may not search (or backfill) a gallery: it lives in another embedding space.

    ``query`` and ``gallery_models`` name the models; ``remedies`` lists the
    ways out (backfill, transformation, compatible training).
    """

    def __init__(self, message: str, *, query: str | None = None,
                 gallery_models: list[str] | None = None, remedies: list[str] | None = None):
        super().__init__(message)
        self.query = query
        self.gallery_models = list(gallery_models or [])
        self.remedies = list(remedies or [])


class ConcurrentUpdateError(GalleryError):
    """Another writer published a snapshot on top of the one this writer started from."""


class BackfillError(GalleryError):
    """A backfill cannot run or resume as asked."""


class SimulatedCrash(RuntimeError):
    """Raised by the backfill's test hooks to stand in for a killed job."""
