"""The model registry: versioned, checksummed model versions on any pyarrow filesystem.

Layout under ``root`` (a local directory, ``s3://...`` or ``gs://...``)::

    <root>/<name>/v<N>/manifest.json        the Manifest (written last)
    <root>/<name>/v<N>/model.safetensors    the weights (never pickle)
    <root>/<name>/v<N>/<extra files>        anything the publisher attached
    <root>/<name>/aliases/<alias>.json      {"version": N, "previous": M, "history": [...]}

**A version is visible only once its directory holds ``manifest.json``**, on
every backend; listing and resolving ignore anything else, so readers never see
a half-written version.

Every backend commits the same way, through :class:`graceful_ray.storage.Staged`
(write under a prefix no other writer uses, then create the pointer only if it
is absent). The publisher first *claims* ``v<N>`` by an exclusive create of
``v<N>/.claim`` (locally a hard link, which fails when the name exists; S3
``PUT`` with ``If-None-Match: *``, answered 412 when the key exists; GCS
``if_generation_match=0``); a failed claim means another publisher owns ``N``,
so it tries ``N+1``. It then writes the files and creates ``manifest.json``
last, itself exclusively, so a committed version can never be overwritten. A
claimed directory without a manifest is either in progress or left by a
publisher that crashed; it stays invisible, and later publishers skip its
number. The manifest appearing whole is the commit point. (Registries written
before this rule, locally by renaming a staging directory to ``v<N>``, read the
same: their versions have manifests and no claims, and a claim that lands in a
committed version is withdrawn.)

Loading re-computes the sha256 of every file it reads and compares it to the
manifest before the bytes are used, so a truncated upload, a tampered file or a
bit flip is refused with :class:`IntegrityError` instead of being served.

Aliases (``production``, ``candidate``) are one small JSON object each, moved
by a single atomic write (``os.replace`` locally, one ``PUT`` on object stores).
The alias keeps its history (each target and when it was set); two
administrators moving the same alias at the same instant both succeed and the
last write wins, which may drop the other's history entry: alias moves are rare,
deliberate operations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import os
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow.fs as pafs
import safetensors.torch
import torch
from safetensors import SafetensorError

from graceful_ray.errors import (IntegrityError, ModelError, RegistryError, StorageError,
                                 VersionNotFoundError)
from graceful_ray.models.factory import ModelSpec, build_model
from graceful_ray.registry.manifest import (RESERVED_FILES, Manifest, formats, utc_now,
                                            valid_name, valid_relpath)
from graceful_ray.storage import Location, Staged, resolve

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CLAIM_FILE = ".claim"
ALIASES_DIR = "aliases"
_MAX_ATTEMPTS = 1000
_ALIAS_HISTORY = 100
_VERSION_SEL = re.compile(r"^v?([0-9]+)$")
_VERSION_PATH = re.compile(r"^v([1-9][0-9]*)(?:/(.*))?$")


class Registry:
    """A versioned model store rooted at a local path or an ``s3://`` / ``gs://`` URI.

    References (``ref``) name a version: ``"name"`` or ``"name@latest"`` (the
    highest committed version), ``"name@v3"`` or ``"name@3"``, or
    ``"name@production"`` (an alias).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root: Location = resolve(root)
        # Committed versions are immutable, so their manifests can be cached.
        self._manifests: dict[tuple[str, int], Manifest] = {}

    def __repr__(self) -> str:
        return f"Registry({self.root.uri!r})"

    @property
    def uri(self) -> str:
        return self.root.uri

    # ------------------------------------------------------------------ paths
    def _model_dir(self, name: str) -> Location:
        return self.root.join(name)

    def _version_dir(self, name: str, version: int) -> Location:
        return self.root.join(name, f"v{version}")

    def _alias_file(self, name: str, alias: str) -> Location:
        return self.root.join(name, ALIASES_DIR, f"{alias}.json")

    def _scan(self, name: str) -> tuple[list[int], set[int]]:
        """(committed versions ascending, every version number in use incl. claimed)."""
        base = self._model_dir(name)
        try:
            infos = base.fs.get_file_info(
                pafs.FileSelector(base.path, recursive=True, allow_not_found=True))
        except OSError as e:
            raise StorageError(f"cannot list {base.uri}: {e}") from e
        committed: set[int] = set()
        taken: set[int] = set()
        prefix = base.path.rstrip("/") + "/"
        for info in infos:
            path = info.path.replace(os.sep, "/") if base.is_local else info.path
            if not path.startswith(prefix):
                continue
            m = _VERSION_PATH.match(path[len(prefix):])
            if not m:
                continue
            n = int(m.group(1))
            taken.add(n)
            if m.group(2) == MANIFEST_FILE and info.type == pafs.FileType.File:
                committed.add(n)
        return sorted(committed), taken

    # --------------------------------------------------------------- resolve
    def _parse_ref(self, ref: str) -> tuple[str, str]:
        if not isinstance(ref, str):
            raise VersionNotFoundError(f"a model reference is a string like 'name@v3', got {ref!r}")
        name, sep, sel = ref.partition("@")
        if not valid_name(name):
            raise VersionNotFoundError(
                f"invalid model reference {ref!r}: expected 'name', 'name@latest', 'name@v3', "
                "'name@3' or 'name@<alias>' with a name of letters, digits, '.', '_', '-'")
        if sep and not sel:
            raise VersionNotFoundError(f"invalid model reference {ref!r}: nothing after '@'")
        return name, (sel if sep else "latest")

    def _describe(self, name: str, committed: list[int]) -> str:
        if not committed:
            models = self.list_models()
            return (f"no model {name!r} in registry {self.uri}; models there: "
                    f"{models if models else 'none'}")
        aliases = self._aliases(name)
        alias_txt = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
        return (f"versions of {name!r}: {', '.join(f'v{v}' for v in committed)}; "
                f"aliases: {alias_txt}")

    def resolve(self, ref: str) -> tuple[str, int]:
        """``ref`` -> ``(name, version)`` of a committed version.

        Raises :class:`VersionNotFoundError` listing the versions and aliases that exist.
        """
        name, sel = self._parse_ref(ref)
        m = _VERSION_SEL.match(sel)
        if m and (name, int(m.group(1))) in self._manifests:
            return name, int(m.group(1))
        committed, _ = self._scan(name)
        if sel == "latest":
            if not committed:
                raise VersionNotFoundError(f"{ref!r}: {self._describe(name, committed)}")
            return name, committed[-1]
        if m:
            version = int(m.group(1))
            if version not in committed:
                raise VersionNotFoundError(
                    f"{ref!r}: {name!r} has no version v{version}; "
                    f"{self._describe(name, committed)}")
            return name, version
        if not valid_name(sel):
            raise VersionNotFoundError(
                f"invalid model reference {ref!r}: after '@' give 'latest', 'vN', 'N' or an alias")
        record = self._read_alias(name, sel)
        if record is None:
            raise VersionNotFoundError(
                f"{ref!r}: {name!r} has no alias {sel!r}; {self._describe(name, committed)}")
        version = record["version"]
        if version not in committed:
            raise VersionNotFoundError(
                f"{ref!r}: alias {sel!r} points at v{version}, which does not exist; "
                f"{self._describe(name, committed)}")
        return name, version

    def get(self, ref: str) -> Manifest:
        """The manifest of a committed version (see the class docstring for ``ref`` forms)."""
        name, version = self.resolve(ref)
        return self._manifest(name, version)

    def _manifest(self, name: str, version: int) -> Manifest:
        cached = self._manifests.get((name, version))
        if cached is not None:
            return cached
        loc = self._version_dir(name, version).join(MANIFEST_FILE)
        manifest = Manifest.from_json(loc.read_bytes(), source=loc.uri)
        if (manifest.name, manifest.version) != (name, version):
            raise IntegrityError(
                f"{loc.uri} describes {manifest.ref}, not {name}@v{version}: the version "
                "directory was copied or renamed by hand; restore it from the original")
        self._manifests[(name, version)] = manifest
        return manifest

    # ---------------------------------------------------------------- listing
    def list_models(self) -> list[str]:
        """Names with at least one committed version, sorted."""
        names = []
        for info in self.root.list():
            if info.type == pafs.FileType.Directory and valid_name(info.base_name):
                if self._scan(info.base_name)[0]:
                    names.append(info.base_name)
        return sorted(names)

    def versions(self, name: str) -> list[Manifest]:
        """Every committed version of ``name``, oldest first (empty for an unknown name)."""
        if not valid_name(name):
            raise VersionNotFoundError(f"invalid model name {name!r}")
        return [self._manifest(name, v) for v in self._scan(name)[0]]

    def lineage(self, ref: str) -> list[Manifest]:
        """``ref`` and its ancestors, newest first, following ``parent``."""
        chain = [self.get(ref)]
        seen = {chain[0].ref}
        while chain[-1].parent is not None:
            parent = chain[-1].parent
            if parent in seen:  # impossible unless manifests were edited by hand
                raise IntegrityError(f"lineage of {ref!r} loops at {parent}")
            try:
                chain.append(self.get(parent))
            except VersionNotFoundError as e:
                raise VersionNotFoundError(
                    f"lineage of {ref!r} is broken: {chain[-1].ref}'s parent {parent} is "
                    f"missing ({e})") from None
            seen.add(parent)
        return chain

    def same_space(self, a_ref: str, b_ref: str) -> bool:
        """Whether two versions' embeddings are comparable (one shares the other's space)."""
        return self.get(a_ref).embedding_space == self.get(b_ref).embedding_space

    # ------------------------------------------------------------------ load
    def read_file(self, ref: str | Manifest, relpath: str) -> bytes:
        """One file of a version, verified against the manifest's sha256."""
        manifest = ref if isinstance(ref, Manifest) else self.get(ref)
        if relpath not in manifest.files:
            raise RegistryError(
                f"{manifest.ref} has no file {relpath!r}; its files: {sorted(manifest.files)}")
        loc = self._version_dir(manifest.name, manifest.version).join(relpath)
        try:
            data = loc.read_bytes()
        except StorageError:
            if not loc.exists():
                raise IntegrityError(
                    f"{manifest.ref}: file {relpath!r} listed in the manifest is missing "
                    f"({loc.uri}); the version is damaged: restore the file or re-publish"
                ) from None
            raise
        actual = hashlib.sha256(data).hexdigest()
        expected = manifest.files[relpath]
        if actual != expected:
            raise IntegrityError(
                f"{manifest.ref}: file {relpath!r} ({len(data)} bytes) has sha256 {actual} but "
                f"the manifest recorded {expected}: it was changed or truncated after publishing; "
                "restore it or re-publish the model")
        return data

    def load_state_dict(self, ref: str) -> tuple[Manifest, dict[str, Any]]:
        """The verified weights of a version as CPU tensors."""

        manifest = self.get(ref)
        data = self.read_file(manifest, WEIGHTS_FILE)
        try:
            return manifest, safetensors.torch.load(data)
        except (SafetensorError, ValueError) as e:
            raise IntegrityError(f"{manifest.ref}: {WEIGHTS_FILE} is not a valid safetensors "
                                 f"file: {e}") from e

    # --------------------------------------------------------------- publish
    def publish(self, name: str, model_or_state_dict: Any, *, spec: ModelSpec | Mapping,
                classes: Iterable[int], method: str = "plain",
                hyperparameters: Any = None, dataset_checksum: str | None = None,
                metrics: Mapping | None = None, parent: str | None = None,
                compatible_with_parent: bool = False, format: str = "network",
                extra: Mapping | None = None, extra_files: Mapping[str, bytes] | None = None,
                embedding_dim: int | None = None) -> Manifest:
        """Store a new version of ``name``; returns its manifest (``manifest.ref`` is ``name@vN``).

        ``classes`` are the global class ids of the head's outputs, in order.
        ``parent`` (any ref) is recorded as ``name@vN``; with
        ``compatible_with_parent`` the new version joins the parent's
        embedding space, otherwise it opens its own (``name@vN``).
        ``extra_files`` (relative path -> bytes) are stored and checksummed
        beside the weights. Concurrent publishers get distinct versions.
        """
        if not valid_name(name):
            raise RegistryError(f"invalid model name {name!r}: use letters, digits, '.', '_', "
                                "'-' (max 128), starting with a letter or digit")
        if isinstance(spec, Mapping):
            spec = ModelSpec.from_dict(dict(spec))
        if not isinstance(spec, ModelSpec):
            raise RegistryError(f"spec must be a ModelSpec, got {type(spec).__name__}")
        if format not in formats():
            raise RegistryError(f"format {format!r} is not one of {formats()}")
        try:
            class_ids = [operator.index(c) for c in classes]
        except TypeError:
            raise RegistryError(f"classes must be integer class ids, got {classes!r}") from None

        tensors = _prepare_tensors(_state_dict_of(model_or_state_dict))
        model_dim = _check_fits(spec, tensors, check_keys=(format == "network"))
        if embedding_dim is None:
            embedding_dim = model_dim

        parent_manifest = self.get(parent) if parent is not None else None
        if compatible_with_parent:
            if parent_manifest is None:
                raise RegistryError("compatible_with_parent=True needs a parent version")
            if parent_manifest.embedding_dim != embedding_dim:
                raise RegistryError(
                    f"{name} cannot share the embedding space of {parent_manifest.ref}: "
                    f"embedding dim {embedding_dim} vs {parent_manifest.embedding_dim}")

        blobs = {WEIGHTS_FILE: _serialize(tensors)}
        for rel, data in (extra_files or {}).items():
            if not valid_relpath(rel) or rel == WEIGHTS_FILE:
                raise RegistryError(
                    f"extra file name {rel!r} is not allowed: give a relative path without "
                    f"'..' or hidden parts, other than {sorted(RESERVED_FILES | {WEIGHTS_FILE})}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise RegistryError(f"extra file {rel!r} must be bytes, got {type(data).__name__}")
            blobs[rel] = bytes(data)
        files = {rel: hashlib.sha256(data).hexdigest() for rel, data in blobs.items()}

        common = dict(
            name=name, architecture=spec.to_dict(), embedding_dim=int(embedding_dim),
            classes=class_ids, method=method,
            hyperparameters=_jsonable(hyperparameters or {}, "hyperparameters"),
            dataset_checksum=dataset_checksum,
            metrics=_jsonable(metrics or {}, "metrics"),
            parent=parent_manifest.ref if parent_manifest else None,
            format=format, files=files, extra=_jsonable(extra or {}, "extra"))

        def make_manifest(version: int) -> Manifest:
            space = (parent_manifest.embedding_space if compatible_with_parent
                     else f"{name}@v{version}")
            return Manifest(version=version, embedding_space=space, created_at=utc_now(),
                            **common)

        make_manifest(1)  # validate everything before writing anything
        manifest = self._commit(name, blobs, make_manifest)
        self._manifests[(name, manifest.version)] = manifest
        log.info("published %s (%s) in %s", manifest.ref, manifest.embedding_space, self.uri)
        return manifest

    def _claim(self, name: str) -> tuple[int, Location]:
        """A version number of our own: ``v<N>/.claim`` created exclusively."""
        token = uuid.uuid4().hex
        claim_body = json.dumps({"token": token, "host": socket.gethostname(),
                                 "pid": os.getpid(), "claimed_at": utc_now()}).encode()
        version = max(self._scan(name)[1], default=0) + 1
        for _ in range(_MAX_ATTEMPTS):
            vdir = self._version_dir(name, version)
            claim = vdir.join(CLAIM_FILE)
            if claim.create_exclusive(claim_body) and _claim_is_ours(claim, token):
                if not vdir.join(MANIFEST_FILE).exists():
                    return version, claim
                claim.delete_file()  # a version committed before claims existed: not ours
            log.debug("%s@v%d taken by another publisher; trying the next", name, version)
            version = max(version, max(self._scan(name)[1], default=0)) + 1
        raise RegistryError(f"could not claim a version number for {name!r} in "
                            f"{_MAX_ATTEMPTS} attempts")

    def _commit(self, name: str, blobs: dict[str, bytes], make_manifest) -> Manifest:
        version, claim = self._claim(name)
        vdir = self._version_dir(name, version)
        with Staged(vdir) as staged:
            staged.adopt(claim)  # an uncommitted number is given back with the files
            for rel, data in blobs.items():
                staged.write(rel, data)
            manifest = make_manifest(version)
            if not staged.commit(vdir.join(MANIFEST_FILE), manifest.to_json().encode(),
                                 keep_if_taken=True):
                raise RegistryError(
                    f"{name}@v{version} was committed by another publisher although this one "
                    f"claimed it: the store at {self.uri} does not honour exclusive creates "
                    "(If-None-Match); publish from one writer at a time there")
            return manifest

    # ---------------------------------------------------------------- aliases
    def _read_alias(self, name: str, alias: str) -> dict | None:
        loc = self._alias_file(name, alias)
        try:
            data = loc.read_bytes()
        except StorageError:
            if loc.exists():
                raise
            return None
        try:
            record = json.loads(data)
            version = record["version"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise ValueError(f"version {version!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise RegistryError(f"alias file {loc.uri} is damaged ({e}); set the alias again "
                                "with Registry.set_alias") from None
        return record

    def alias_record(self, name: str, alias: str) -> dict:
        """The alias's stored record: version, previous version, when, and its history."""
        record = self._read_alias(name, alias) if valid_name(alias) else None
        if record is None:
            raise VersionNotFoundError(f"{name!r} has no alias {alias!r}; aliases: "
                                       f"{self.aliases(name) or 'none'}")
        return record

    def set_alias(self, name: str, alias: str, version_ref: str | int) -> Manifest:
        """Point ``name@alias`` at a committed version (``3``, ``"v3"``, ``"latest"``,
        another alias, or a full ``"name@v3"``); returns that version's manifest."""
        if not valid_name(alias) or alias == "latest" or _VERSION_SEL.match(alias):
            raise RegistryError(
                f"invalid alias {alias!r}: use letters, digits, '.', '_', '-', not 'latest' and "
                "not a version number")
        if isinstance(version_ref, int) and not isinstance(version_ref, bool):
            ref = f"{name}@v{version_ref}"
        elif isinstance(version_ref, str) and "@" in version_ref:
            if version_ref.partition("@")[0] != name:
                raise RegistryError(f"alias {name}@{alias} cannot point at {version_ref!r}: "
                                    "an alias points at a version of its own model")
            ref = version_ref
        else:
            ref = f"{name}@{version_ref}"
        manifest = self.get(ref)
        previous = self._read_alias(name, alias)
        now = utc_now()
        history = list(previous.get("history", [])) if previous else []
        history.append({"version": manifest.version, "set_at": now,
                        "previous": previous["version"] if previous else None})
        record = {"name": name, "alias": alias, "version": manifest.version, "updated_at": now,
                  "previous": previous["version"] if previous else None,
                  "history": history[-_ALIAS_HISTORY:]}
        self._alias_file(name, alias).write_bytes(json.dumps(record, indent=2).encode())
        log.info("alias %s@%s -> v%d (was %s)", name, alias, manifest.version,
                 f"v{record['previous']}" if record["previous"] else "unset")
        return manifest

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for ``name``."""
        if not valid_name(name):
            raise VersionNotFoundError(f"invalid model name {name!r}")
        return self._aliases(name)

    def _aliases(self, name: str) -> dict[str, int]:
        out = {}
        for info in self.root.join(name, ALIASES_DIR).list():
            if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
                alias = info.base_name[:-len(".json")]
                if valid_name(alias):
                    record = self._read_alias(name, alias)
                    if record is not None:
                        out[alias] = record["version"]
        return dict(sorted(out.items()))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``; :class:`VersionNotFoundError` when it does not exist."""
        self.alias_record(name, alias)
        self._alias_file(name, alias).delete_file(missing_ok=False)


# ---------------------------------------------------------------------- helpers
def _state_dict_of(obj: Any) -> dict[str, Any]:
    if isinstance(obj, torch.nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = dict(obj)
    else:
        raise RegistryError(f"publish takes an nn.Module or a state dict, got {type(obj).__name__}")
    if not state:
        raise RegistryError("refusing to publish an empty state dict")
    for key, value in state.items():
        if not isinstance(key, str):
            raise RegistryError(f"state dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise RegistryError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; put "
                "non-tensor data in `extra` or `extra_files`")
    return state


def _prepare_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Detached, contiguous CPU tensors, none sharing storage with another.

    safetensors refuses tensors that share memory (tied weights) and stores
    only contiguous data; cloning the later aliases stores each tied copy
    separately, so ``load_state_dict(strict=True)`` finds every key.
    """

    out = {}
    seen: set[int] = set()
    for key, t in state.items():
        t = t.detach()
        if t.layout != torch.strided:
            raise RegistryError(f"state dict entry {key!r} has layout {t.layout}; only dense "
                                "tensors can be stored")
        t = t.cpu().contiguous()
        if t.numel():
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[key] = t
    return out


def _serialize(tensors: dict[str, Any]) -> bytes:
    try:
        return safetensors.torch.save(tensors, metadata={"format": "pt"})
    except Exception as e:  # noqa: BLE001 - safetensors raises several families
        raise RegistryError(f"cannot serialise the weights as safetensors: {e}") from e


def _check_fits(spec: ModelSpec, tensors: dict[str, Any], *, check_keys: bool) -> int:
    """Rebuild ``spec`` and check the weights fit it; returns the model's embedding dim.

    Catches a wrong spec at publish time, not when serving tries to load the
    version. (A real build, not the meta device: meta kernels cost seconds of
    one-time set-up, more than building the small networks used here.) The
    caller's RNG state is restored, so publishing never perturbs a seeded run.
    """

    with torch.random.fork_rng(devices=[]):
        model = build_model(spec)
    if check_keys:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
            if wrong:
                parts.append("shape mismatch " + ", ".join(
                    f"{k}: {got[k]} vs {expected[k]}" for k in wrong[:5]))
            raise ModelError(f"the weights do not fit the spec {spec.to_dict()}: "
                             + "; ".join(parts) + "; publish the spec the model was built from")
    return int(model.embedding_dim)


def _jsonable(value: Any, what: str) -> Any:
    """A JSON-clean copy (numpy/torch scalars -> numbers, dataclasses -> dicts)."""
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"{type(o).__name__} {o!r} is not JSON-serialisable")

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise RegistryError(f"{what} must be a dict (or a dataclass), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), default=default))
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{what} must be JSON-serialisable: {e}") from None


def _claim_is_ours(claim: Location, token: str) -> bool:
    """Read the claim back: guards against stores whose conditional write is not atomic."""
    try:
        return json.loads(claim.read_bytes()).get("token") == token
    except (StorageError, ValueError, AttributeError):
        return False
