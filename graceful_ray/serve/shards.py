"""Comparator shards: which comparator replica owns a request id.

One comparator pairs, counts and logs every event of every router replica; its
ceiling is measured in ``benchmarks/results/comparator_ceiling.md``. Past it,
``comparator_shards`` splits the records by request id over several comparator
deployments: shard 0 (``comparator``) also owns the routing state and the gates,
and answers the report over every shard (their statistics add up, see
:func:`graceful_ray.serve.stats.merged`); shards 1.. (``comparator-shard-<k>``)
only pair, count, label and log their part. All shards write into the one log
under ``storage`` (file names carry the shard), so offline readers see one log.

A request id's shard is a hash of the id, so a router needs no shared table: the
router that served a row and the one that later takes its label agree on it.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import replace

import numpy as np

from graceful_ray.serve.kinds import KINDS, PrimaryEvent, ShadowEvent


def shard_of(request_id: str, shards: int) -> int:
    """The shard that owns ``request_id`` (0 when there is one)."""
    return zlib.crc32(request_id.encode()) % shards if shards > 1 else 0


def split_event(ev: PrimaryEvent | ShadowEvent, shards: int
                ) -> dict[int, PrimaryEvent | ShadowEvent]:
    """``ev`` as one event per shard that owns some of its rows."""
    owners = [shard_of(rid, shards) for rid in ev.ids]
    if len(set(owners)) == 1:
        return {owners[0]: ev}
    rows: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(owners):
        rows[s].append(i)
    kind = KINDS[ev.kind]
    out = {}
    for s, idx in rows.items():
        take = np.asarray(idx)
        ids = [ev.ids[i] for i in idx]
        answer = None if ev.answer is None else kind.take(ev.answer, take)
        if isinstance(ev, PrimaryEvent):
            features = None if ev.features is None else ev.features[take]
            out[s] = replace(ev, ids=ids, answer=answer, features=features)
        else:
            out[s] = replace(ev, ids=ids, answer=answer)
    return out
