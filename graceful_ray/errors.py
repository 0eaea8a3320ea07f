"""The errors graceful-ray raises on bad input.

Every error says what is wrong and what to do about it. They subclass
``ValueError`` (or ``LookupError``) as well, so callers that only know the
builtin families still catch them.
"""

from __future__ import annotations


class GracefulRayError(Exception):
    """Base class of every error graceful-ray raises on purpose."""


class ConfigError(GracefulRayError, ValueError):
    """A configuration value or command-line argument is invalid."""


class StorageError(GracefulRayError, OSError):
    """A storage URI cannot be resolved or a filesystem operation failed."""


class DatasetError(GracefulRayError, ValueError):
    """A dataset does not follow the Parquet data contract.

    Carries where the problem is (file, column, row) so a user can find it.
    """

    def __init__(self, message: str, *, file: str | None = None,
                 column: str | None = None, row: int | None = None) -> None:
        where = ", ".join(
            f"{k} {v}" for k, v in (("file", file), ("column", column), ("row", row))
            if v is not None
        )
        super().__init__(f"{message} ({where})" if where else message)
        self.file, self.column, self.row = file, column, row


class ModelError(GracefulRayError, ValueError):
    """A model cannot be built, or its inputs or weights do not fit it."""


class RegistryError(GracefulRayError):
    """Base class of model-registry errors."""


class VersionNotFoundError(RegistryError, LookupError):
    """The requested model name, version or alias does not exist."""


class IntegrityError(RegistryError, ValueError):
    """A stored file does not match the checksum its manifest recorded."""


class IncompatibleModelError(GracefulRayError, ValueError):
    """Two models are used together although they are not compatible."""


class MetricsError(GracefulRayError, ValueError):
    """Inputs to a metric are malformed (shapes, dtypes, NaN, empty)."""
