"""The comparison log: Parquet files under the storage path, plus the routing state.

Layout under ``storage`` (local, ``s3://``, ``gs://``)::

    records/part-<ms>-<seq>.parquet   one row per served input (see RECORD_SCHEMA)
    searches/part-<ms>-<seq>.parquet  one row per searched input (see search_schema)
    labels/part-<ms>-<seq>.parquet    every feedback label (request_id, label, time),
                                      for predict and search request ids alike
    state.json                        which model is primary, fraction, gates, history

A record's ``label`` column holds the label if it was known when the record was
written; labels that arrive later are only in ``labels/``. Readers join the two
(:func:`read_log`). Each file is written whole in one atomic operation (a
rename locally, one PUT on object stores), so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from graceful_ray.errors import ConfigError, StorageError
from graceful_ray.storage import Location, resolve

log = logging.getLogger(__name__)

RECORDS_DIR = "records"
SEARCHES_DIR = "searches"
LABELS_DIR = "labels"
STATE_FILE = "state.json"

RECORD_FIELDS = [
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("primary", pa.string(), nullable=False),        # role: baseline | candidate
    pa.field("primary_ref", pa.string(), nullable=False),    # e.g. model@v1
    pa.field("shadow_ref", pa.string()),                     # null when not shadowed
    pa.field("shadowed", pa.bool_(), nullable=False),
    pa.field("baseline_decision", pa.int64()),
    pa.field("candidate_decision", pa.int64()),
    pa.field("baseline_ms", pa.float32()),
    pa.field("candidate_ms", pa.float32()),
    pa.field("agree", pa.bool_()),
    pa.field("shadow_error", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("segment", pa.string()),                        # the request's segment, or null
]
FEATURES_FIELD = pa.field("features", pa.list_(pa.float32()))
LABEL_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
])


def record_schema(with_features: bool) -> pa.Schema:
    return pa.schema(RECORD_FIELDS + ([FEATURES_FIELD] if with_features else []))


def search_schema(id_type: pa.DataType, with_features: bool) -> pa.Schema:
    """One row per searched input: both models' top-k (ids, cosine scores, the hits'
    gallery labels), their overlap, and the query's label when known at write time."""
    fields = [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("primary", pa.string(), nullable=False),
        pa.field("primary_ref", pa.string(), nullable=False),
        pa.field("shadow_ref", pa.string()),
        pa.field("shadowed", pa.bool_(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
        pa.field("snapshot", pa.int64()),                     # the primary's gallery snapshot
    ]
    for role in ("baseline", "candidate"):
        fields += [pa.field(f"{role}_ids", pa.list_(id_type)),
                   pa.field(f"{role}_scores", pa.list_(pa.float32())),
                   pa.field(f"{role}_hit_labels", pa.list_(pa.int64())),
                   pa.field(f"{role}_ms", pa.float32())]
    fields += [
        pa.field("overlap", pa.float32()),                    # |top-k both| / k; null unpaired
        pa.field("shadow_error", pa.string()),
        pa.field("shadow_skipped", pa.string()),              # why the shadow did not search
        pa.field("label", pa.int64()),
    ]
    return pa.schema(fields + ([FEATURES_FIELD] if with_features else []))


class RecordLog:
    """Writes and reads one comparison log."""

    def __init__(self, storage: str, writer: str = "") -> None:
        self.root: Location = resolve(storage)
        self._seq = 0
        # in every file name, so comparator shards writing one log never collide
        self._writer = f"{writer}-" if writer else ""

    # --------------------------------------------------------------- write
    def _name(self) -> str:
        self._seq += 1
        return f"part-{int(time.time() * 1000):013d}-{self._writer}{self._seq:06d}.parquet"

    def write_records(self, rows: dict[str, list], with_features: bool,
                      metadata: dict[str, str]) -> str | None:
        """Write one Parquet file of records (column lists); returns its URI."""
        if not rows["request_id"]:
            return None
        schema = record_schema(with_features).with_metadata(
            {k.encode(): v.encode() for k, v in metadata.items()})
        table = pa.Table.from_pydict({f.name: rows[f.name] for f in schema}, schema=schema)
        return self._write(RECORDS_DIR, table)

    def write_searches(self, rows: dict[str, list], with_features: bool,
                       metadata: dict[str, str]) -> str | None:
        """Write one Parquet file of search records (column lists); returns its URI."""
        if not rows["request_id"]:
            return None
        id_type = pa.int64()
        for col in ("baseline_ids", "candidate_ids"):
            first = next((v for v in rows[col] if v), None)
            if first is not None:
                id_type = pa.int64() if isinstance(first[0], int) else pa.string()
                break
        schema = search_schema(id_type, with_features).with_metadata(
            {k.encode(): v.encode() for k, v in metadata.items()})
        table = pa.Table.from_pydict({f.name: rows[f.name] for f in schema}, schema=schema)
        return self._write(SEARCHES_DIR, table)

    def write_labels(self, request_ids: list[str], labels: list[int],
                     times_ms: list[int]) -> str | None:
        if not request_ids:
            return None
        table = pa.Table.from_pydict(
            {"request_id": request_ids, "label": labels, "time": times_ms}, schema=LABEL_SCHEMA)
        return self._write(LABELS_DIR, table)

    def _write(self, sub: str, table: pa.Table) -> str:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        loc = self.root.join(sub, self._name())
        loc.write_bytes(sink.getvalue())
        log.debug("wrote %d rows to %s", table.num_rows, loc.uri)
        return loc.uri

    def write_state(self, state: dict[str, Any]) -> None:
        self.root.join(STATE_FILE).write_bytes(json.dumps(state, indent=2).encode())

    # ---------------------------------------------------------------- read
    def read_state(self) -> dict[str, Any] | None:
        loc = self.root.join(STATE_FILE)
        if not loc.exists():
            return None
        try:
            return json.loads(loc.read_bytes())
        except ValueError as e:
            raise StorageError(f"{loc.uri} is damaged ({e}); move it away to start a fresh "
                               "comparison log") from None

    def files(self, sub: str) -> list[Location]:
        return sorted((self.root.join(sub, info.base_name) for info in self.root.join(sub).list()
                       if info.base_name.endswith(".parquet")), key=lambda loc: loc.path)

    def read_table(self, sub: str, columns: list[str] | None = None) -> pa.Table | None:
        tables = []
        for loc in self.files(sub):
            try:
                f = pq.ParquetFile(pa.BufferReader(loc.read_buffer()))  # Arrow-owned: see read_buffer
                # A file of an earlier release may lack a newer column (segment):
                # read what it has; concatenation fills the rest with nulls.
                have = None if columns is None else [c for c in columns
                                                     if c in f.schema_arrow.names]
                t = f.read(columns=have)
            except (pa.ArrowInvalid, OSError) as e:
                raise StorageError(f"{loc.uri} is not a readable Parquet file: {e}") from e
            tables.append(t.replace_schema_metadata(None))
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")


def read_log(storage: str, columns: list[str] | None = None) -> pa.Table:
    """Every record of a log with its label, joining late labels from ``labels/``.

    The last label given for a request id wins, as in the live service.
    """
    rl = RecordLog(storage)
    records = rl.read_table(RECORDS_DIR, columns)
    if records is None:
        raise ConfigError(f"no comparison records under {rl.root.uri}/{RECORDS_DIR}: is this the "
                          "storage path the shadow service wrote to?")
    labels = rl.read_table(LABELS_DIR, ["request_id", "label"])
    if labels is None or "label" not in records.column_names:
        return records
    latest = dict(zip(labels.column("request_id").to_pylist(), labels.column("label").to_pylist()))
    ids = records.column("request_id").to_pylist()
    recorded = records.column("label").to_pylist()
    merged = [latest.get(i, r) for i, r in zip(ids, recorded)]
    idx = records.column_names.index("label")
    return records.set_column(idx, "label", pa.array(merged, pa.int64()))
