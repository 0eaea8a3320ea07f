"""The Parquet data contract: what a graceful-ray dataset is, as data.

A dataset is a directory (on any ``pyarrow.fs`` filesystem) holding one
sub-directory of Parquet files per split and a ``dataset.json`` that describes
it. ``dataset.json`` is the commit marker: a directory without it is not a
dataset, whatever else it holds. Its ``checksum`` (sha256 over the split
checksums, which are sha256 over the files' sha256) is the dataset's identity:
caches and the model registry key on it, so two datasets with the same checksum
hold the same bytes.

Columns of every split:

- ``id``: int64 or string, unique within the dataset (a *subset* split such as
  ``old_train`` repeats rows of its parent split, with the same ids);
- ``label``: int64 in ``[0, num_classes)``;
- ``features`` (kind ``"features"``): ``pa.list_(pa.float32(), L)`` with
  ``L = prod(feature_shape)``, finite values; or
- ``image`` (kind ``"image"``): binary, an encoded PNG or JPEG whose decoded
  shape is ``feature_shape = (C, H, W)``.

Other columns are allowed and kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Mapping

import pyarrow as pa

from graceful_ray.errors import DatasetError

DATASET_JSON = "dataset.json"
FORMAT = "graceful-ray-dataset"
FORMAT_VERSION = 1
KINDS = ("features", "image")
SCENARIOS = ("data_growth", "class_incremental", "none")
#: The split the old model (v1) trains on, and the split it is a subset of.
OLD_TRAIN, TRAIN = "old_train", "train"

ID, LABEL, FEATURES, IMAGE = "id", "label", "features", "image"


def feature_column(kind: str) -> str:
    """The input column for a dataset kind (``features`` or ``image``)."""
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}: use one of {list(KINDS)}")
    return FEATURES if kind == "features" else IMAGE


def features_type(length: int) -> pa.DataType:
    """The Arrow type of the ``features`` column: a fixed-size list of float32."""
    return pa.list_(pa.float32(), int(length))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SplitInfo:
    """One split: its row count, its files (relative to the dataset root, in
    read order) with their sha256, and the split checksum over them.

    ``subset_of`` names the split this one draws its rows from (``old_train``
    is a subset of ``train``); its ids repeat the parent's on purpose.
    """

    rows: int
    files: list[str]
    sha256: dict[str, str]
    checksum: str = ""
    subset_of: str | None = None

    @staticmethod
    def compute_checksum(rows: int, files: list[str], sha256: Mapping[str, str]) -> str:
        """Over the row count and the files' contents in read order, not their names:
        files are named per publish, and the same rows must keep one identity."""
        payload = json.dumps({"rows": int(rows), "sha256": [sha256[f] for f in files]},
                             separators=(",", ":"))
        return sha256_hex(payload.encode())

    @staticmethod
    def legacy_checksum(rows: int, files: list[str], sha256: Mapping[str, str]) -> str:
        """The checksum of datasets written before files were named per publish
        (names included); still accepted, so their identity does not change."""
        payload = json.dumps({"rows": int(rows), "files": [[f, sha256[f]] for f in files]},
                             sort_keys=True, separators=(",", ":"))
        return sha256_hex(payload.encode())

    def checksum_matches(self) -> bool:
        return self.checksum in (self.compute_checksum(self.rows, self.files, self.sha256),
                                 self.legacy_checksum(self.rows, self.files, self.sha256))

    @classmethod
    def build(cls, rows: int, files: list[str], sha256: Mapping[str, str],
              subset_of: str | None = None) -> "SplitInfo":
        return cls(rows=int(rows), files=list(files), sha256=dict(sha256),
                   checksum=cls.compute_checksum(rows, files, sha256), subset_of=subset_of)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rows": self.rows, "files": list(self.files),
                             "sha256": dict(self.sha256), "checksum": self.checksum}
        if self.subset_of is not None:
            d["subset_of"] = self.subset_of
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SplitInfo":
        return cls(rows=int(d["rows"]), files=[str(f) for f in d["files"]],
                   sha256={str(k): str(v) for k, v in d["sha256"].items()},
                   checksum=str(d.get("checksum", "")), subset_of=d.get("subset_of"))


def dataset_checksum(splits: Mapping[str, SplitInfo]) -> str:
    """sha256 over the split checksums (by split name): the dataset's identity."""
    payload = json.dumps({name: s.checksum for name, s in splits.items()},
                         sort_keys=True, separators=(",", ":"))
    return sha256_hex(payload.encode())


@dataclass(frozen=True)
class DatasetInfo:
    """Everything ``dataset.json`` records. Round-trips through JSON exactly."""

    name: str
    kind: str
    num_classes: int
    class_names: list[str]
    feature_shape: tuple[int, ...]
    splits: dict[str, SplitInfo]
    checksum: str
    scenario: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    seed: int | None = None
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    id_type: str = "int64"
    format_version: int = FORMAT_VERSION

    def __hash__(self) -> int:  # the checksum is the dataset's identity
        return hash(self.checksum)

    # -- derived ------------------------------------------------------------
    @property
    def feature_length(self) -> int:
        """Values per row in ``features`` (``prod(feature_shape)``)."""
        return int(math.prod(self.feature_shape))

    @property
    def input_column(self) -> str:
        return feature_column(self.kind)

    @property
    def old_classes(self) -> list[int] | None:
        """The classes the old model knows (class-incremental scenario), else None."""
        oc = self.scenario.get("old_classes")
        return None if oc is None else [int(c) for c in oc]

    def split(self, name: str) -> SplitInfo:
        try:
            return self.splits[name]
        except KeyError:
            raise DatasetError(
                f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}",
                file=DATASET_JSON) from None

    def with_splits(self, splits: dict[str, SplitInfo]) -> "DatasetInfo":
        return replace(self, splits=dict(splits), checksum=dataset_checksum(splits))

    # -- JSON ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "feature_shape": list(self.feature_shape),
            "id_type": self.id_type,
            "checksum": self.checksum,
            "splits": {k: v.to_dict() for k, v in self.splits.items()},
            "scenario": self.scenario,
            "seed": self.seed,
            "created_at": self.created_at,
            "extra": self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatasetInfo":
        try:
            if d.get("format", FORMAT) != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {FORMAT!r}")
            version = int(d.get("format_version", FORMAT_VERSION))
            if version > FORMAT_VERSION:
                raise ValueError(f"format_version {version} is newer than this "
                                 f"graceful-ray understands ({FORMAT_VERSION}); upgrade it")
            info = cls(
                name=str(d["name"]),
                kind=str(d["kind"]),
                num_classes=int(d["num_classes"]),
                class_names=[str(c) for c in d["class_names"]],
                feature_shape=tuple(int(s) for s in d["feature_shape"]),
                splits={str(k): SplitInfo.from_dict(v) for k, v in d["splits"].items()},
                checksum=str(d["checksum"]),
                scenario=dict(d.get("scenario") or {"kind": "none"}),
                seed=None if d.get("seed") is None else int(d["seed"]),
                created_at=str(d.get("created_at", "")),
                extra=dict(d.get("extra") or {}),
                id_type=str(d.get("id_type", "int64")),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetError(f"invalid dataset.json: {e!r}; re-create the dataset",
                               file=DATASET_JSON) from None
        if info.kind not in KINDS:
            raise DatasetError(f"invalid dataset.json: kind {info.kind!r} is not one of "
                               f"{list(KINDS)}", file=DATASET_JSON)
        return info

    @classmethod
    def from_json(cls, text: str | bytes) -> "DatasetInfo":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise DatasetError(f"dataset.json is not valid JSON: {e}; re-create the dataset",
                               file=DATASET_JSON) from None
        if not isinstance(d, dict):
            raise DatasetError("dataset.json does not hold a JSON object", file=DATASET_JSON)
        return cls.from_dict(d)


@dataclass(frozen=True)
class Expectations:
    """What a table must look like when there is no ``dataset.json`` yet.

    ``None`` fields are inferred from the first table validated and then
    enforced on the rest (:func:`graceful_ray.data.validate.validate_table`
    returns the resolved expectations).
    """

    kind: str | None = None
    num_classes: int | None = None
    feature_shape: tuple[int, ...] | None = None
    id_type: str | None = None  # "int64" | "string"

    @classmethod
    def from_info(cls, info: DatasetInfo) -> "Expectations":
        return cls(kind=info.kind, num_classes=info.num_classes,
                   feature_shape=tuple(info.feature_shape), id_type=info.id_type)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
