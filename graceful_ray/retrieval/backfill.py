"""Progressive backfill: re-embed a gallery with a new model, chunk by chunk, resumably.

The order matters (FastFill, Jaeckle et al. ICLR 2023): re-embedding the items
whose *old* embedding is least reliable first moves retrieval quality up
faster than a random order. Without the raw inputs at planning time, the old
model's uncertainty comes from the stored vectors themselves: the old model's
linear head applied to a stored embedding gives the old logits, so

- ``uncertainty`` (least confidence): ``1 - max softmax``,
- ``entropy``: the entropy of that softmax,
- ``margin``: ``1 - (p_top1 - p_top2)``,

rank the gallery most-uncertain first; ``random`` is the seeded baseline. (A
transformed row is scored with the head of the model it was transformed to.)

**Two modes**, chosen by the registry:

- ``progressive`` (the new model lives in the gallery's space: a BCT model, or
  the gallery was transformed to its space): every chunk is published at once,
  so searches see a mixed gallery that keeps improving and never stop answering;
- ``staged`` (the new model opens a new space): a mixed gallery would compare
  vectors of two spaces, so the chunks accumulate as *pending* segments while
  searches keep being answered from the old rows, and the gallery switches to
  the new space in one commit when the last chunk is done. This is the full
  backfill a user waits for.

**Resume, nothing lost or duplicated.** The plan (order and chunk boundaries)
is written once per run name (``backfill/<run>/``), before any chunk. Each
chunk's progress record travels *inside* the snapshot that publishes the
chunk, so the rows and the record that says they are done are committed by the
same atomic pointer write. Killed anywhere, a re-run with the same run name
reads the head's record and continues with the first chunk not committed; a
chunk whose segment was written but not committed is simply re-embedded (the
orphan segment is never referenced). Ids are keyed, so a row can never appear
twice in a snapshot.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from graceful_ray.errors import ConfigError
from graceful_ray.paths import registry_root
from graceful_ray.retrieval.embed import embed_split
from graceful_ray.retrieval.embedding_space import check_snapshot
from graceful_ray.retrieval.errors import BackfillError, EmbeddingSpaceError, SimulatedCrash
from graceful_ray.retrieval.gallery import (Gallery, Snapshot, _read_optional,
                                            embeddings_array, make_rows, merge_rows, update_rows,
                                            utc_now)
from graceful_ray.retrieval.index import IndexConfig

# Lazy imports: the registry (torch) loads only when a backfill runs, not when the CLI checks its arguments.

log = logging.getLogger(__name__)

ORDERS = ("uncertainty", "entropy", "margin", "random")
MODES = ("auto", "progressive", "staged")
PLAN_FILE = "plan.json"
ORDER_FILE = "order.parquet"


@dataclass
class BackfillConfig:
    """One backfill run. ``run_name`` identifies it: running the same name again resumes it."""

    gallery: str
    model: str  # the new model, name@vN
    registry: str | None = None  # default <root>/registry
    data: str | None = None  # the raw inputs; default: the dataset the gallery was built from
    split: str | None = None
    run_name: str | None = None
    order: str = "uncertainty"
    chunks: int = 10
    chunk_rows: int | None = None  # overrides ``chunks``
    mode: str = "auto"
    seed: int = 0
    index: IndexConfig | None = None  # default: the gallery's current index config
    batch_size: int = 1024
    num_cpus: float = 0.5
    concurrency: int = 1
    engine: str = "ray"  # "local": embed in this process (small galleries, tests)
    max_segments: int = 16
    compact_at_end: bool = True
    keep_snapshots: int = 3
    # Test hooks: stand in for a killed job. Never set in production.
    fail_after_chunks: int | None = None  # raise after committing this many chunks in this call
    fail_before_commit: int | None = None  # raise after writing chunk N's (1-based) segment, before its commit

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"unknown backfill order {self.order!r}: use one of {list(ORDERS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown backfill mode {self.mode!r}: use one of {list(MODES)}")
        if self.chunks < 1:
            raise ConfigError(f"chunks must be >= 1, got {self.chunks}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.engine not in ("ray", "local"):
            raise ConfigError(f"engine must be 'ray' or 'local', not {self.engine!r}")
        if self.num_cpus <= 0 or self.batch_size < 1:
            raise ConfigError("num_cpus must be > 0 and batch_size >= 1")

    def resolved(self) -> "BackfillConfig":

        d = asdict(self)
        d["registry"] = registry_root(self.registry)
        d["run_name"] = self.run_name or f"backfill-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        d["index"] = self.index
        return BackfillConfig(**d)


@dataclass
class BackfillResult:
    run_name: str
    model: str
    mode: str
    order: str
    chunks: int
    chunks_done: int
    rows_total: int
    rows_done: int
    done: bool
    resumed: bool
    chunks_this_call: int
    snapshots: list[int] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------- ordering
def uncertainty_scores(embeddings: np.ndarray, head_weight: np.ndarray, head_bias: np.ndarray,
                       kind: str = "uncertainty") -> np.ndarray:
    """Per-row uncertainty of a classifier head on stored embeddings (higher = less sure)."""
    logits = embeddings.astype(np.float64) @ head_weight.T.astype(np.float64) + head_bias
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    if kind == "uncertainty":
        return 1.0 - p.max(axis=1)
    if kind == "entropy":
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    if kind == "margin":
        top2 = np.sort(p, axis=1)[:, -2:] if p.shape[1] > 1 else np.concatenate([np.zeros_like(p), p], 1)
        return 1.0 - (top2[:, 1] - top2[:, 0])
    raise ConfigError(f"unknown uncertainty kind {kind!r}")


def order_rows(rows: pa.Table, *, order: str, registry: str, transforms: dict[str, Any],
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(positions into rows, score)``: the backfill order, first = re-embedded first.

    Ties (and ``random``) are broken by a seeded permutation, so a plan is
    reproducible from its arguments.
    """
    n = rows.num_rows
    rng = np.random.default_rng(seed)
    tiebreak = rng.permutation(n)
    if order == "random":
        return tiebreak.astype(np.int64), np.zeros(n)
    from graceful_ray.registry import Registry, load_model

    reg = Registry(registry)
    emb = embeddings_array(rows)
    mv = np.asarray(rows.column("model_version").to_pylist(), dtype=object)
    tf = rows.column("transform").to_pylist() if "transform" in rows.column_names else [None] * n
    head_of = np.asarray([transforms[t]["new"] if t else m for m, t in zip(mv, tf)], dtype=object)
    scores = np.zeros(n)
    for ref in np.unique(head_of):
        _, model = load_model(reg, str(ref))
        sel = head_of == ref
        scores[sel] = uncertainty_scores(emb[sel], model.head.weight.detach().numpy(),
                                         model.head.bias.detach().numpy(), order)
    # Descending score; ties by the seeded permutation.
    pos = np.lexsort((tiebreak, -scores))
    return pos.astype(np.int64), scores[pos]


# ------------------------------------------------------------------- the plan
def _plan_dir(g: Gallery, run: str):
    return g.loc.join("backfill", run)


def load_plan(g: Gallery, run: str) -> tuple[dict[str, Any], pa.Table] | None:
    data = _read_optional(_plan_dir(g, run).join(PLAN_FILE))
    if data is None:
        return None
    plan = json.loads(data)
    order = pq.read_table(pa.BufferReader(_plan_dir(g, run).join(plan["order_file"]).read_buffer()))
    return plan, order


def _make_plan(g: Gallery, cfg: BackfillConfig, head: Snapshot, new: Any, mode: str,
               data: str, split: str) -> tuple[dict[str, Any], pa.Table]:
    rows = g.read_rows(head, ["embedding", "model_version", "transform"])
    todo_mask = ~np.asarray([m == new.ref and t is None for m, t in zip(
        rows.column("model_version").to_pylist(), rows.column("transform").to_pylist())])
    if mode == "staged":
        todo_mask[:] = True  # every row must be re-embedded into the new space
    todo = rows.filter(pa.array(todo_mask))
    if todo.num_rows == 0:
        raise BackfillError(f"nothing to backfill: every row of {g.uri} is already embedded by {new.ref}")
    pos, score = order_rows(todo, order=cfg.order, registry=cfg.registry, transforms=head.transforms,
                            seed=cfg.seed)
    n = len(pos)
    n_chunks = min(n, -(-n // cfg.chunk_rows) if cfg.chunk_rows else cfg.chunks)
    bounds = np.linspace(0, n, n_chunks + 1).round().astype(np.int64)
    chunk = np.searchsorted(bounds, np.arange(n), side="right") - 1
    order = pa.table({"id": todo.column("id").take(pa.array(pos)), "chunk": pa.array(chunk.astype(np.int32)),
                      "score": pa.array(score)})
    sink = pa.BufferOutputStream()
    pq.write_table(order, sink, compression="zstd")
    order_file = f"order-{uuid.uuid4().hex[:8]}.parquet"
    pdir = _plan_dir(g, cfg.run_name)
    pdir.join(order_file).write_bytes(sink.getvalue().to_pybytes())
    plan = {"run": cfg.run_name, "model": new.ref, "embedding_space": new.embedding_space,
            "mode": mode, "order": cfg.order, "seed": cfg.seed, "chunks": int(n_chunks),
            "chunk_rows": np.diff(bounds).astype(int).tolist(), "rows_total": int(n),
            "base_snapshot": head.seq, "base_space": head.embedding_space, "data": data,
            "split": split, "order_file": order_file, "created_at": utc_now()}
    if not pdir.join(PLAN_FILE).create_exclusive(json.dumps(plan, indent=1).encode()):
        pdir.join(order_file).delete_file()  # another process planned this run first: use theirs
        loaded = load_plan(g, cfg.run_name)
        assert loaded is not None
        return loaded
    log.info("backfill %s: planned %d rows in %d chunks (%s order, %s mode)", cfg.run_name, n,
             n_chunks, cfg.order, mode)
    return plan, order


def _check_plan(plan: dict[str, Any], cfg: BackfillConfig, new: Any) -> None:
    mismatch = {k: (plan[k], v) for k, v in (("model", new.ref), ("order", cfg.order))
                if plan[k] != v}
    if cfg.mode != "auto" and plan["mode"] != cfg.mode:
        mismatch["mode"] = (plan["mode"], cfg.mode)
    if mismatch:
        what = ", ".join(f"{k} {a!r} (asked: {b!r})" for k, (a, b) in mismatch.items())
        raise BackfillError(f"backfill run {cfg.run_name!r} already exists with {what}; resume it with "
                            "the same arguments, or start a new run with another --run-name")


# -------------------------------------------------------------------- the run
def run_backfill(cfg: BackfillConfig,
                 on_chunk: Callable[[Snapshot, dict[str, Any]], None] | None = None) -> BackfillResult:
    """Run (or resume) a backfill until every planned chunk is committed."""
    from graceful_ray.registry import Registry

    t_start = time.perf_counter()
    cfg = cfg.resolved()
    g = Gallery(cfg.gallery)
    head = g.require_head()
    reg = Registry(cfg.registry)
    new = reg.get(cfg.model)

    loaded = load_plan(g, cfg.run_name)
    resumed = loaded is not None
    if loaded is not None:
        plan, order = loaded
        _check_plan(plan, cfg, new)
    else:
        same_space = new.embedding_space == head.embedding_space
        if cfg.mode == "progressive" and not same_space:
            try:
                check_snapshot(reg, new.ref, head, g.uri)
            except EmbeddingSpaceError as e:
                raise EmbeddingSpaceError(
                    f"a progressive backfill publishes a mixed gallery, so the new model must live in "
                    f"the gallery's space; {e} -- or run the backfill with mode 'staged' (the gallery "
                    "switches spaces when it completes)", query=e.query,
                    gallery_models=e.gallery_models, remedies=e.remedies) from None
        if head.pending and head.pending.get("run") not in (None, cfg.run_name):
            raise BackfillError(f"staged backfill {head.pending['run']!r} is in progress on {g.uri}; "
                                "resume it (same --run-name) before starting another")
        mode = cfg.mode if cfg.mode != "auto" else ("progressive" if same_space else "staged")
        source = head.source or {}
        data, split = cfg.data or source.get("data"), cfg.split or source.get("split")
        if not data or not split:
            raise BackfillError(f"the gallery {g.uri} does not record the dataset it was built from; "
                                "pass data= and split= (--data/--split) with the raw inputs of its ids")
        plan, order = _make_plan(g, cfg, head, new, mode, data, split)

    mode, n_chunks = plan["mode"], int(plan["chunks"])
    progress = dict(head.backfills.get(cfg.run_name) or {})
    done = int(progress.get("chunks_done", 0))
    result = BackfillResult(run_name=cfg.run_name, model=new.ref, mode=mode, order=plan["order"],
                            chunks=n_chunks, chunks_done=done, rows_total=int(plan["rows_total"]),
                            rows_done=int(progress.get("rows_done", 0)), done=bool(progress.get("done")),
                            resumed=resumed, chunks_this_call=0)
    if progress.get("done"):
        log.info("backfill %s is already complete", cfg.run_name)
        result.seconds = time.perf_counter() - t_start
        return result
    if resumed:
        log.info("backfill %s: resuming at chunk %d of %d", cfg.run_name, done + 1, n_chunks)
    if not progress:
        progress = {"run": cfg.run_name, "model": new.ref, "mode": mode, "order": plan["order"],
                    "chunks": n_chunks, "chunks_done": 0, "rows_done": 0,
                    "rows_total": int(plan["rows_total"]), "done": False, "started_at": utc_now(),
                    "log": []}

    index_cfg = cfg.index or IndexConfig.from_dict(head.index.get("config"))
    rows = g.read_rows(head)  # the visible merged rows, kept current in memory
    index = g.read_index(head) if head.index_report.kind == "ivf" or mode == "staged" else None
    pending_segments = list((head.pending or {}).get("segments", []))
    chunk_col = order.column("chunk").to_numpy()
    order_ids = order.column("id")

    for c in range(done, n_chunks):
        t0 = time.perf_counter()
        ids = order_ids.filter(pa.array(chunk_col == c))
        table = embed_split(plan["data"], plan["split"], registry_root=cfg.registry, model_ref=new.ref,
                            ids=ids.to_numpy(zero_copy_only=False), batch_size=cfg.batch_size,
                            num_cpus=cfg.num_cpus, concurrency=cfg.concurrency, engine=cfg.engine)
        t_embed = time.perf_counter() - t0
        _check_chunk_ids(ids, table, c, plan)
        labels = _labels_for(rows, table)
        chunk_rows = merge_rows([make_rows(table.column("id"), embeddings_array(table),
                                           model_version=new.ref, embedding_space=new.embedding_space,
                                           labels=labels)])
        last = c == n_chunks - 1
        new_progress = dict(progress, chunks_done=c + 1, rows_done=int(progress["rows_done"]) + len(ids),
                            done=last, updated_at=utc_now(),
                            log=list(progress["log"]) + [{"chunk": c, "rows": len(ids), "seq": head.seq + 1}])
        backfills = {**head.backfills, cfg.run_name: new_progress}
        written: list[dict[str, Any]] = []
        try:
            if mode == "progressive":
                merged = update_rows(rows, chunk_rows)
                if (last and cfg.compact_at_end) or len(head.segments) + 1 > cfg.max_segments:
                    segments = [g.write_segment(merged)]
                    written += segments
                else:
                    seg = g.write_segment(chunk_rows)
                    written.append(seg)
                    segments = head.segments + [seg]
                _maybe_crash_before_commit(cfg, c)
                snap, index = g.publish(
                    merged, parent=head, segments=segments, index_config=index_cfg,
                    index_like=None if last else index, backfills=backfills,
                    note=f"backfill {cfg.run_name}: chunk {c + 1}/{n_chunks} re-embedded with {new.ref}",
                    keep=cfg.keep_snapshots)
                rows = merged
            else:
                seg = g.write_segment(chunk_rows)
                written.append(seg)
                pend = pending_segments + [seg]
                _maybe_crash_before_commit(cfg, c)
                if not last:
                    snap, index = g.publish(
                        rows, parent=head, segments=head.segments, reuse_index=True, index=index,
                        pending={"run": cfg.run_name, "model": new.ref,
                                 "embedding_space": new.embedding_space, "segments": pend},
                        backfills=backfills, keep=cfg.keep_snapshots,
                        note=f"staged backfill {cfg.run_name}: chunk {c + 1}/{n_chunks} embedded with "
                             f"{new.ref} (not visible until the last chunk)")
                else:
                    merged = g.read_rows(head, segments=pend[:-1]) if len(pend) > 1 else None
                    merged = chunk_rows if merged is None else update_rows(merged, chunk_rows)
                    _check_covers(rows, merged, cfg.run_name)
                    segments = [g.write_segment(merged)] if cfg.compact_at_end and len(pend) > 1 else pend
                    written += segments if segments is not pend else []
                    snap, index = g.publish(
                        merged, parent=head, segments=segments, index_config=index_cfg,
                        pending=None, backfills=backfills, transforms={}, keep=cfg.keep_snapshots,
                        note=f"staged backfill {cfg.run_name} complete: the gallery is now in space "
                             f"{new.embedding_space!r} ({new.ref})")
                    rows = merged
                pending_segments = pend
        except BaseException:
            g.discard_segments(written)
            raise
        head, progress = snap, new_progress
        result.chunks_done, result.rows_done, result.done = c + 1, int(new_progress["rows_done"]), last
        result.chunks_this_call += 1
        result.snapshots.append(snap.seq)
        result.timings.append({"chunk": c, "rows": len(ids), "embed_s": t_embed,
                               "total_s": time.perf_counter() - t0})
        log.info("backfill %s: chunk %d/%d committed as snapshot %d (%d rows, %.1fs)", cfg.run_name,
                 c + 1, n_chunks, snap.seq, len(ids), time.perf_counter() - t0)
        if on_chunk is not None:
            on_chunk(snap, new_progress)
        if cfg.fail_after_chunks is not None and result.chunks_this_call >= cfg.fail_after_chunks and not last:
            raise SimulatedCrash(f"test hook: backfill {cfg.run_name} stopped after chunk {c + 1}")
    result.seconds = time.perf_counter() - t_start
    return result


def _maybe_crash_before_commit(cfg: BackfillConfig, c: int) -> None:
    if cfg.fail_before_commit is not None and c + 1 == cfg.fail_before_commit:
        raise SimulatedCrash(f"test hook: backfill {cfg.run_name} stopped before committing chunk {c + 1}")


def _check_chunk_ids(ids: pa.Array, table: pa.Table, c: int, plan: dict[str, Any]) -> None:
    got = table.column("id").to_numpy(zero_copy_only=False)
    want = ids.to_numpy(zero_copy_only=False)
    if len(got) != len(np.unique(got)):
        raise BackfillError(f"the dataset {plan['data']}/{plan['split']} holds some ids more than once; "
                            "gallery ids must be unique")
    missing = np.setdiff1d(want, got)
    if len(missing):
        raise BackfillError(
            f"chunk {c + 1}: {len(missing)} gallery id(s) have no input row in {plan['data']}/"
            f"{plan['split']} (first: {missing[:5].tolist()}); the backfill needs the raw inputs of "
            "every gallery item -- without them, upgrade the stored embeddings with a transformation")


def _labels_for(rows: pa.Table, table: pa.Table) -> np.ndarray | None:
    """Gallery labels are kept as they were; new rows take the dataset's labels."""
    if "label" in table.column_names:
        return table.column("label").to_numpy(zero_copy_only=False)
    return None


def _check_covers(old: pa.Table, new: pa.Table, run: str) -> None:
    a = old.column("id").to_numpy(zero_copy_only=False)
    b = new.column("id").to_numpy(zero_copy_only=False)
    if len(a) != len(b) or not np.array_equal(a, b):
        raise BackfillError(f"staged backfill {run}: the re-embedded rows ({len(b)}) do not cover the "
                            f"gallery ({len(a)}); the gallery changed during the backfill -- start a new run")


def backfill_status(gallery: str) -> dict[str, Any]:
    """Progress of every backfill recorded in the current snapshot."""
    snap = Gallery(gallery).require_head()
    return {"snapshot": snap.seq, "embedding_space": snap.embedding_space, "models": snap.models,
            "backfills": snap.backfills, "pending": None if not snap.pending else
            {k: v for k, v in snap.pending.items() if k != "segments"} | {"segments": len(snap.pending["segments"])}}
