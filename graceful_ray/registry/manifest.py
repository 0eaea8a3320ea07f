"""The manifest: everything the registry knows about one model version.

It is the contract between the stage that trains a model and every stage that
uses it (tune, serve, retrieval): how to rebuild the network, which global
class each head output means, how it was trained, which embedding space it
lives in, and the sha256 of every file so a corrupted copy is refused rather
than served. It is stored as ``manifest.json`` beside the weights and validated
on every read, so a hand-edited or truncated manifest fails with a message
naming the bad field instead of a ``KeyError`` deep in serving code.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from graceful_ray.errors import ModelError, RegistryError
from graceful_ray.methods.registry import load_methods
from graceful_ray.models import formats as model_formats
from graceful_ray.models.factory import ModelSpec

#: Bumped when the manifest layout changes incompatibly; readers refuse newer ones.
SCHEMA_VERSION = 1


def formats() -> list[str]:
    """The storable formats: ``network`` and those the methods register beside their
    code when they are imported (LQF's ``linearized``), so every declared method is."""
    load_methods()
    return model_formats.formats()


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PARENT_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})@v([1-9][0-9]*)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def valid_name(name: object) -> bool:
    """Model and alias names: letters, digits, ``.``, ``_``, ``-``; no leading dot or dash."""
    return isinstance(name, str) and bool(_NAME_RE.match(name)) and ".." not in name


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class Manifest:
    """One published model version (see the module docstring for why each field exists)."""

    name: str
    version: int
    architecture: dict[str, Any]  # ModelSpec.to_dict()
    embedding_dim: int
    classes: list[int]  # global class id of each head output, in order
    method: str
    hyperparameters: dict[str, Any]
    dataset_checksum: str | None
    metrics: dict[str, Any]
    parent: str | None  # "name@vN"
    embedding_space: str
    format: str = "network"
    files: dict[str, str] = field(default_factory=dict)  # relpath -> sha256
    created_at: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # -- derived -------------------------------------------------------------
    @property
    def ref(self) -> str:
        """The canonical reference ``name@vN``."""
        return f"{self.name}@v{self.version}"

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.architecture)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, **asdict(self)}

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=2, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise RegistryError(f"manifest of {self.ref} is not JSON-serialisable: {e}") from e

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise RegistryError(f"{source}: expected a JSON object, got {type(d).__name__}")
        schema = d.get("schema", SCHEMA_VERSION)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise RegistryError(
                f"{source}: manifest schema {schema!r} is newer than this graceful-ray "
                f"understands ({SCHEMA_VERSION}); upgrade graceful-ray to read it")
        required = ("name", "version", "architecture", "embedding_dim", "classes", "method",
                    "embedding_space")
        missing = [k for k in required if k not in d]
        if missing:
            raise RegistryError(f"{source}: manifest is missing field(s) {missing}")
        kwargs = {k: d[k] for k in required}
        optional = {"hyperparameters": {}, "dataset_checksum": None, "metrics": {},
                    "parent": None, "format": "network", "files": {}, "extra": {}}
        for k, default in optional.items():
            kwargs[k] = d.get(k, default)
        if "created_at" in d:
            kwargs["created_at"] = d["created_at"]
        try:
            return cls(**kwargs)
        except RegistryError as e:
            raise RegistryError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise RegistryError(f"{source}: not valid JSON ({e}); the file is damaged or "
                                "was not written by graceful-ray") from None
        return cls.from_dict(d, source=source)

    # -- validation ----------------------------------------------------------
    def _validate(self) -> None:
        def bad(what: str) -> RegistryError:
            return RegistryError(f"invalid manifest field {what}")

        if not valid_name(self.name):
            raise bad(f"name={self.name!r}: use letters, digits, '.', '_', '-' (max 128)")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise bad(f"version={self.version!r}: must be an integer >= 1")
        if not isinstance(self.architecture, dict):
            raise bad(f"architecture={self.architecture!r}: must be ModelSpec.to_dict()")
        try:
            spec = ModelSpec.from_dict(self.architecture)
        except ModelError as e:
            raise bad(f"architecture: {e}") from None
        if (isinstance(self.embedding_dim, bool) or not isinstance(self.embedding_dim, int)
                or self.embedding_dim < 1):
            raise bad(f"embedding_dim={self.embedding_dim!r}: must be a positive integer")
        if (not isinstance(self.classes, list) or not self.classes
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in self.classes)):
            raise bad(f"classes={self.classes!r}: must be a non-empty list of integer class ids")
        if len(set(self.classes)) != len(self.classes):
            raise bad(f"classes={self.classes!r}: class ids must be unique")
        if len(self.classes) != spec.num_classes:
            raise bad(f"classes: {len(self.classes)} ids for a head of {spec.num_classes} "
                      "outputs; give one global class id per head output")
        if not isinstance(self.method, str) or not self.method:
            raise bad(f"method={self.method!r}: must be a non-empty string")
        for key in ("hyperparameters", "metrics", "extra"):
            if not isinstance(getattr(self, key), dict):
                raise bad(f"{key}={getattr(self, key)!r}: must be a JSON object")
        if self.dataset_checksum is not None and not isinstance(self.dataset_checksum, str):
            raise bad(f"dataset_checksum={self.dataset_checksum!r}: must be a string or null")
        if self.parent is not None and (not isinstance(self.parent, str)
                                        or not _PARENT_RE.match(self.parent)):
            raise bad(f"parent={self.parent!r}: must be 'name@vN' or null")
        if not isinstance(self.embedding_space, str) or not self.embedding_space:
            raise bad(f"embedding_space={self.embedding_space!r}: must be a non-empty string")
        if self.format not in formats():
            raise bad(f"format={self.format!r}: must be one of {formats()}")
        if not isinstance(self.files, dict):
            raise bad(f"files={self.files!r}: must map relative path -> sha256")
        for rel, digest in self.files.items():
            if not valid_relpath(rel):
                raise bad(f"files: {rel!r} is not a safe relative path")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise bad(f"files: sha256 of {rel!r} is {digest!r}, not 64 hex digits")
        try:
            if not isinstance(self.created_at, str):
                raise ValueError
            datetime.fromisoformat(self.created_at)
        except ValueError:
            raise bad(f"created_at={self.created_at!r}: must be an ISO-8601 time") from None


#: Names inside a version directory that are the registry's own, not files of the model.
RESERVED_FILES = frozenset({"manifest.json", ".claim"})


def valid_relpath(rel: object) -> bool:
    """A relative POSIX path inside a version directory: no ``..``, no absolute, no hidden parts."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return False
    return rel not in RESERVED_FILES and not parts[0].startswith(".")
