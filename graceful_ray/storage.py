"""One way to reach storage: local paths, ``file://``, ``s3://``, ``gs://``.

Everything graceful-ray persists (datasets, the registry, caches, serve logs)
goes through :func:`resolve`, so a cluster with shared object storage works the
same as a laptop. S3-compatible servers (MinIO, moto) are reached by setting
``AWS_ENDPOINT_URL`` or by an ``?endpoint_override=...`` query on the URI.
"""

from __future__ import annotations

import os
import posixpath
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from graceful_ray.errors import StorageError

# Lazy imports: boto3 and the GCS client (slow to import; the GCS client is optional) load only for
# s3:// and gs:// paths.


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

    def read_buffer(self) -> pa.Buffer:
        """The whole object in Arrow-owned memory: read this, not :meth:`read_bytes`,
        for anything handed to Arrow (``pq.read_table(pa.BufferReader(buf))``).

        Arrow's decode threads may drop their last reference to the input after
        the call returns; when that input wraps a Python ``bytes`` its destructor
        takes the GIL, and if the interpreter is finalizing by then the thread is
        torn down inside a C++ destructor: ``terminate called without an active
        exception`` (exit 134) after the command already succeeded. A seekable
        file's ``read_buffer`` returns memory Arrow allocated, freed without Python.
        """
        try:
            with self.fs.open_input_file(self.path) as f:
                return f.read_buffer()
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot read {self.uri}: {e}") from e

    def write_bytes(self, data: bytes) -> None:
        """Write a whole object. On object stores a PUT is atomic; locally we
        write a temporary sibling, fsync it and rename it, so readers never see
        half and a commit made after it (:class:`Staged`) never names lost bytes."""
        try:
            parent = posixpath.dirname(self.path)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            if self.is_local:
                tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
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

    def delete_file(self, missing_ok: bool = True) -> None:
        """Remove one file (object); a missing one is fine unless ``missing_ok`` is false."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError as e:
            if not missing_ok:
                raise StorageError(f"{self.uri} does not exist") from e
        except OSError as e:
            raise StorageError(f"cannot delete {self.uri}: {e}") from e

    def create_exclusive(self, data: bytes) -> bool:
        """Create this file whole, only if nothing is there yet; ``True`` when we created it.

        The one primitive that lets several writers race for a name without a
        lock service, and that every commit in graceful-ray rests on (see
        :class:`Staged`): locally a complete temporary file hard-linked into
        place (``link`` fails with EEXIST), so a reader never sees it
        half-written; on S3 a conditional PUT (``If-None-Match: *``, answered
        412 when the key exists); on GCS an upload with ``if_generation_match=0``
        (needs ``google-cloud-storage``). pyarrow.fs has no such call, hence the
        SDKs. Other filesystems raise :class:`StorageError` rather than silently
        losing the race.
        """
        if self.is_local:
            return _create_exclusive_local(self.path, data)
        if isinstance(self.fs, pafs.S3FileSystem):
            return _create_exclusive_s3(self, data)
        if type(self.fs).__name__ == "GcsFileSystem":
            return _create_exclusive_gcs(self, data)
        raise StorageError(
            f"cannot create {self.uri} exclusively: {type(self.fs).__name__} has no "
            "create-if-absent operation; use a local path, s3:// or gs://"
        )

    def remove_empty_dirs(self) -> None:
        """Remove the empty directories at and under this path, deepest first; what
        holds a file stays. Object stores have no directories: nothing to do."""
        if not self.is_local:
            return
        for parent, _, _ in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            try:
                os.rmdir(parent)  # only when empty: what others wrote there stays
            except OSError:
                pass

    def delete_dir(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def __str__(self) -> str:  # pragma: no cover - for messages
        return self.uri


def _create_exclusive_local(path: str, data: bytes) -> bool:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    except OSError as e:
        raise StorageError(f"cannot create {path}: {e}") from e
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Staged:
    """Files written under names no other writer uses, committed by creating a
    pointer only if it is absent: the one way graceful-ray commits (registry
    versions, gallery snapshots, backfill plans, the comparator's saved state,
    datasets).

    Readers follow pointers, so until the pointer exists nothing written here is
    visible. :meth:`commit` returns ``False`` when another writer created the
    pointer first; then, and when the ``with`` block raises before a commit, the
    files written here are removed again (best effort: what a crash leaves behind is never
    referenced, so it is debris, not data)::

        with Staged(root.join(f"snapshots/{seq}-{uuid4().hex}")) as staged:
            staged.write("snapshot.json", body)
            if not staged.commit(root.join(f"commits/{seq}.json"), pointer):
                raise ConcurrentUpdateError(...)

    A pointer that is meant to move (a dataset published again with
    ``overwrite``) is committed with ``replace=True``: one atomic whole-object
    write, so readers see the old version or the new one, never neither.
    """

    def __init__(self, prefix: Location) -> None:
        self.prefix = prefix
        self.written: list[Location] = []
        self.committed = False

    def write(self, rel: str, data: bytes) -> Location:
        loc = self.prefix.join(rel)
        loc.write_bytes(data)
        self.written.append(loc)
        return loc

    def open_output(self, rel: str) -> pa.NativeFile:
        """A stream to write ``rel`` under the prefix (a file too large for one
        :meth:`write`); it counts as this staging's like a written one."""
        loc = self.prefix.join(rel)
        try:
            self.prefix.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
            stream = loc.fs.open_output_stream(loc.path)
        except OSError as e:
            raise StorageError(f"cannot write {loc.uri}: {e}") from e
        self.written.append(loc)
        return stream

    def adopt(self, loc: Location) -> None:
        """Count a file already written (a claim) as this staging's: removed with it."""
        self.written.append(loc)

    def commit(self, pointer: Location, body: bytes, *, keep_if_taken: bool = False,
               replace: bool = False) -> bool:
        """Create ``pointer`` with ``body`` only if absent. ``False`` if it was taken:
        the files written here are removed, or, with ``keep_if_taken`` (a prefix
        that should have been ours alone, on a store that broke the exclusive
        create), left alone, since the same names may now hold the other writer's data.
        With ``replace`` the pointer is written whatever was there (atomically:
        :meth:`Location.write_bytes`), and the call returns ``True``."""
        if replace:
            pointer.write_bytes(body)
            self.committed = True
            return True
        if pointer.create_exclusive(body):
            self.committed = True
            return True
        if keep_if_taken:
            self.written = []
        else:
            self.discard()
        return False

    def discard(self) -> None:
        for loc in self.written:
            try:
                loc.delete_file()
            except StorageError:  # pragma: no cover - network trouble during cleanup
                pass
        self.written = []
        self.prefix.remove_empty_dirs()

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.committed:
            self.discard()


_S3_CLIENTS: dict[tuple, object] = {}
_S3_CLIENTS_LOCK = threading.Lock()


def s3_endpoint_url(uri: str) -> str | None:
    """The S3 endpoint a URI is served from, as boto3's ``endpoint_url``.

    Same rule as :func:`resolve`: an ``?endpoint_override=`` query on the URI
    wins, then ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself
    (``None``).
    """
    query = parse_qs(urlparse(uri).query)
    if "endpoint_override" in query:
        ep = query["endpoint_override"][0]
        if "://" in ep:
            return ep
        return f"{query.get('scheme', ['https'])[0]}://{ep}"
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_client(endpoint: str | None):
    """One boto3 client per (process, endpoint); clients are thread-safe, sessions are not."""
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"))
    with _S3_CLIENTS_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            import boto3

            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint,
                region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            _S3_CLIENTS[key] = client
        return client


def _create_exclusive_s3(loc: Location, data: bytes) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = loc.path.partition("/")
    try:
        _s3_client(s3_endpoint_url(loc.uri)).put_object(
            Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # 412: the key exists. 409 ConditionalRequestConflict: another
        # conditional write to the same key is in flight; either way not ours.
        if status in (409, 412) or err.get("Code") in ("PreconditionFailed",
                                                      "ConditionalRequestConflict"):
            return False
        raise StorageError(f"cannot create {loc.uri}: {e}") from e
    except BotoCoreError as e:
        raise StorageError(f"cannot create {loc.uri}: {e}") from e
    return True


def _create_exclusive_gcs(loc: Location, data: bytes) -> bool:  # pragma: no cover - no GCS in tests
    try:
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud import storage as gcs
    except ImportError as e:
        raise StorageError(
            f"creating {loc.uri} exclusively needs google-cloud-storage "
            "(pip install google-cloud-storage)") from e
    bucket, _, key = loc.path.partition("/")
    try:
        gcs.Client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        return False
    except Exception as e:  # noqa: BLE001 - google raises many families
        raise StorageError(f"cannot create {loc.uri}: {e}") from e
    return True


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
            # Small objects go up as one PutObject instead of a multipart upload:
            # fewer round trips, and moto (tests) answers CompleteMultipartUpload
            # with a root element pyarrow 26 rejects ("error embedded in a 200
            # OK response"), so without this every write to moto fails.
            allow_delayed_open=True,
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
