"""One way to reach storage: local paths, ``file://``, ``s3://``, ``gs://``.

Everything graceful-ray persists (datasets, the registry, caches, serve logs)
goes through :func:`resolve`, so a cluster with shared object storage works the
same as a laptop. S3-compatible servers (MinIO, moto) are reached by setting
``AWS_ENDPOINT_URL`` or by an ``?endpoint_override=...`` query on the URI.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from graceful_ray.errors import StorageError


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it (no scheme): what pyarrow calls take."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        base = self.uri.split("?", 1)
        uri = posixpath.join(base[0], *parts) + (f"?{base[1]}" if len(base) > 1 else "")
        return Location(self.fs, path, uri)

    # -- small conveniences over pyarrow.fs, all raising StorageError ---------
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot read {self.uri}: {e}") from e

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object. On object stores a PUT is atomic; locally we
        write a temporary sibling and rename it, so readers never see half."""
        try:
            parent = posixpath.dirname(self.path)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            if self.is_local:
                tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                os.replace(tmp, self.path)
            else:
                with self.fs.open_output_stream(self.path) as f:
                    f.write(data)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri}: {e}") from e

    def list(self) -> list[pafs.FileInfo]:
        """Direct children; empty when the directory does not exist."""
        try:
            return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"cannot list {self.uri}: {e}") from e

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete_dir(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def __str__(self) -> str:  # pragma: no cover - for messages
        return self.uri


def _s3_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    parsed = urlparse(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in (parsed.query or ""):
        ep = urlparse(endpoint)
        fs = pafs.S3FileSystem(
            endpoint_override=ep.netloc or ep.path,
            scheme=ep.scheme or "https",
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            allow_bucket_creation=True,
        )
        return fs, (parsed.netloc + parsed.path).rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def resolve(uri: str | os.PathLike) -> Location:
    """Turn a local path or URI into a :class:`Location`.

    Raises :class:`StorageError` naming the URI when the scheme is unknown or
    the filesystem cannot be reached.
    """
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty storage path: give a local directory or an s3:// / gs:// URI")
    scheme = urlparse(uri).scheme
    try:
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
            local = uri[len("file://"):] if scheme == "file" else uri
            local = os.path.abspath(os.path.expanduser(local))
            return Location(pafs.LocalFileSystem(), local, local)
        if scheme == "s3":
            fs, path = _s3_from_uri(uri)
        else:
            fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"cannot open storage {uri!r}: {e}") from e
    return Location(fs, path.rstrip("/"), uri.rstrip("/"))
