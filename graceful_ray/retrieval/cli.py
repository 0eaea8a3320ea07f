"""`graceful-ray gallery build | search | backfill | transform | status | compat`."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from graceful_ray.data import read_info, read_split
from graceful_ray.data.tensors import inputs_from_arrow
from graceful_ray.errors import ConfigError
from graceful_ray.paths import registry_root
from graceful_ray.raycluster import runtime_env
from graceful_ray.retrieval.backfill import BackfillConfig, run_backfill
from graceful_ray.retrieval.compat import generations_report
from graceful_ray.retrieval.errors import QueryError
from graceful_ray.retrieval.gallery import Gallery, build_gallery
from graceful_ray.retrieval.index import IndexConfig
from graceful_ray.retrieval.searcher import GallerySearcher
from graceful_ray.retrieval.transform import TransformConfig, apply_transform, load_transform, train_transform

# Lazy imports: Ray loads only when a command needs a cluster, after its arguments are checked.


def _registry(args: argparse.Namespace) -> str:
    return registry_root(args.registry)


def _index_config(args: argparse.Namespace):
    return IndexConfig(kind=args.index, target_recall=args.target_recall,
                       exact_max_rows=args.exact_max_rows)


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Joins the cluster of a `ray job submit` (RAY_ADDRESS) or starts a local one.
        ray.init(configure_logging=False, log_to_driver=False, runtime_env=runtime_env())
    ray.data.DataContext.get_current().enable_progress_bars = False


def run_build(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        _init_ray()
    snap = build_gallery(args.gallery, args.data, args.split, registry=_registry(args), model=args.model,
                         index=_index_config(args), batch_size=args.batch_size, num_cpus=args.num_cpus,
                         concurrency=args.concurrency, replace=args.replace, engine=args.engine)
    print(f"gallery {args.gallery}")
    print(snap.summary())
    return 0


def run_status(args: argparse.Namespace) -> int:
    g = Gallery(args.gallery)
    snap = g.require_head()
    if args.json:
        print(json.dumps(asdict(snap), indent=1, default=str))
        return 0
    print(f"gallery {g.uri}")
    print(snap.summary())
    if snap.pending:
        print(f"  pending (staged backfill {snap.pending['run']}, not searchable yet): "
              f"{sum(s['rows'] for s in snap.pending['segments'])} rows in space "
              f"{snap.pending['embedding_space']!r}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    searcher = GallerySearcher(args.gallery, registry=_registry(args), query_model=args.model, reload="off")
    info = read_info(args.data)
    table = read_split(args.data, args.split)
    if args.ids:
        wanted = [int(i) if info.id_type == "int64" else i for i in args.ids.split(",")]
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(wanted)))
        if table.num_rows == 0:
            raise QueryError(f"none of the ids {args.ids} is in {args.data}/{args.split}")
    elif args.limit:
        table = table.slice(0, args.limit)
    x = inputs_from_arrow(table, info.feature_shape)
    qids = table.column("id").to_numpy(zero_copy_only=False)
    k = args.k + (1 if args.exclude_self else 0)
    res = searcher.embed_and_search(x, k=k)
    ids, scores, versions, labels = res.ids, res.scores, res.model_versions, res.labels
    if args.exclude_self:  # the query's own item is in the gallery: leave it out
        keep = ids != qids[:, None]
        keep[keep.sum(1) > args.k, -1] = False  # self was not among the k+1: drop the last
        rows = keep.shape[0]
        ids, scores, versions = (a[keep].reshape(rows, -1)[:, : args.k] for a in (ids, scores, versions))
        labels = None if labels is None else labels[keep].reshape(rows, -1)[:, : args.k]
    out: dict[str, Any] = {"gallery": args.gallery, "model": args.model, "snapshot": res.snapshot,
                           "embedding_space": res.embedding_space, "queries": int(len(qids))}
    if labels is not None and "label" in table.column_names:
        y = table.column("label").to_numpy()
        hits = labels == y[:, None]
        out["hit@1"] = float(hits[:, 0].mean())
        out[f"hit@{ids.shape[1]}"] = float(hits.any(axis=1).mean())
    if args.json:
        out["results"] = [{"query": _py(q), "ids": [_py(i) for i in ids[r]],
                           "scores": [round(float(s), 6) for s in scores[r]],
                           "model_versions": list(versions[r])} for r, q in enumerate(qids)]
        print(json.dumps(out, indent=1))
        return 0
    print(f"{out['queries']} queries by {args.model} against snapshot {res.snapshot} of {args.gallery} "
          f"(space {res.embedding_space!r})")
    for r in range(min(len(qids), args.show)):
        hits = ", ".join(f"{_py(i)} ({s:.3f}, {v})" for i, s, v in zip(ids[r], scores[r], versions[r]))
        print(f"  query {_py(qids[r])}: {hits}")
    for key in [k for k in out if k.startswith("hit@")]:
        print(f"{key} (gallery label = query label): {out[key]:.4f}")
    return 0


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def run_backfill_cmd(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        _init_ray()
    index = None
    if args.index is not None:
        index = _index_config(args)
    cfg = BackfillConfig(gallery=args.gallery, model=args.model, registry=_registry(args), data=args.data,
                         split=args.split, run_name=args.run_name, order=args.order, chunks=args.chunks,
                         chunk_rows=args.chunk_rows, mode=args.mode, seed=args.seed, index=index,
                         batch_size=args.batch_size, num_cpus=args.num_cpus, concurrency=args.concurrency,
                         engine=args.engine)

    def progress(snap, p) -> None:
        print(f"  chunk {p['chunks_done']}/{p['chunks']} committed as snapshot {snap.seq} "
              f"({p['rows_done']}/{p['rows_total']} rows)", flush=True)

    res = run_backfill(cfg, on_chunk=progress)
    state = "complete" if res.done else "stopped"
    print(f"backfill {res.run_name} ({res.mode}, {res.order} order, {res.model}): {state}, "
          f"{res.chunks_done}/{res.chunks} chunks, {res.rows_done}/{res.rows_total} rows"
          + (" (resumed)" if res.resumed else "") + f" in {res.seconds:.1f}s")
    return 0


def run_transform(args: argparse.Namespace) -> int:
    if args.transform:
        tf = load_transform(args.transform)
    else:
        if not (args.old and args.new and args.data):
            raise ConfigError("training a transformation needs --old, --new and --data (or give "
                              "--transform URI to apply an existing one)")
        _init_ray()
        out = args.out or (os.path.join(args.gallery, "transforms", args.run_name) if args.gallery and args.run_name
                           else None)
        tf = train_transform(TransformConfig(
            data=args.data, old=args.old, new=args.new, registry=_registry(args), out=out,
            train_split=args.train_split, val_split=args.val_split, hidden=args.hidden,
            epochs=args.epochs, lr=args.lr, run_name=args.run_name, storage=args.storage,
            workers=args.workers))
        m = tf.meta["metrics"]
        print(f"transformation {tf.meta['old']} -> {tf.meta['new']} trained on Ray Train: validation "
              f"cosine {m.get('val_cosine', float('nan')):.4f}, relative MSE {m.get('val_rel_mse', float('nan')):.4f}")
    if args.gallery and not args.no_apply:
        snap = apply_transform(args.gallery, tf, registry=_registry(args))
        print(f"gallery {args.gallery} transformed:")
        print(snap.summary())
    return 0


def run_compat(args: argparse.Namespace) -> int:
    rep = generations_report(args.data, args.split, args.models.split(","), registry=_registry(args),
                             metric=args.metric)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep.table())
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gallery", help="faiss retrieval galleries: build, search, backfill, transform",
        description="Build a faiss gallery with a registered embedding model, search it with any model "
                    "the registry places in its embedding space, and move it to a new model: no "
                    "backfill (a compatible model), a progressive backfill (most uncertain first), "
                    "or a learned transformation of the stored embeddings.")
    sub = p.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--gallery", required=True, help="gallery directory or URI (s3://...)")
        q.add_argument("--registry", help="model registry root (default $GRACEFUL_RAY_ROOT/registry)")

    def index_args(q: argparse.ArgumentParser, default: str | None = "auto") -> None:
        q.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default=default,
                       help="auto: exact up to --exact-max-rows, IVF above")
        q.add_argument("--target-recall", type=float, default=0.95,
                       help="approximate indexes are tuned to this recall@10 vs exact")
        q.add_argument("--exact-max-rows", type=int, default=200_000)

    def job_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--batch-size", type=int, default=1024)
        q.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per embedding actor")
        q.add_argument("--concurrency", type=int, default=1, help="embedding actors")
        q.add_argument("--engine", choices=["ray", "local"], default="ray",
                       help="ray: a Ray Data job; local: embed in this process (small galleries)")

    b = sub.add_parser("build", help="embed a dataset split and publish it as a gallery")
    common(b)
    b.add_argument("--data", required=True)
    b.add_argument("--split", required=True, help="e.g. test, or gallery")
    b.add_argument("--model", required=True, help="NAME@VERSION that embeds the gallery")
    b.add_argument("--replace", action="store_true", help="rebuild an existing gallery")
    index_args(b)
    job_args(b)
    b.set_defaults(func=run_build)

    s = sub.add_parser("search", help="embed dataset rows with a model and search the gallery")
    common(s)
    s.add_argument("--model", required=True, help="query model; must live in the gallery's space")
    s.add_argument("--data", required=True)
    s.add_argument("--split", required=True)
    s.add_argument("--ids", help="comma-separated ids of the query rows (default: the first --limit)")
    s.add_argument("--limit", type=int, default=10)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--exclude-self", action="store_true",
                   help="leave each query's own id out of its results (query split = gallery split)")
    s.add_argument("--show", type=int, default=5, help="queries to print")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_search)

    f = sub.add_parser("backfill", help="re-embed the gallery with a new model, chunk by chunk, resumably")
    common(f)
    f.add_argument("--model", required=True, help="the new model NAME@VERSION")
    f.add_argument("--run-name", required=True, help="names the run; the same name resumes it")
    f.add_argument("--order", choices=["uncertainty", "entropy", "margin", "random"], default="uncertainty")
    f.add_argument("--chunks", type=int, default=10)
    f.add_argument("--chunk-rows", type=int)
    f.add_argument("--mode", choices=["auto", "progressive", "staged"], default="auto",
                   help="auto: progressive when the model lives in the gallery's space, else staged")
    f.add_argument("--data", help="raw inputs (default: the dataset the gallery was built from)")
    f.add_argument("--split")
    f.add_argument("--seed", type=int, default=0)
    index_args(f, default=None)
    job_args(f)
    f.set_defaults(func=run_backfill_cmd)

    t = sub.add_parser("transform", help="learn old -> new embedding map (Ray Train) and apply it")
    t.add_argument("--gallery", help="gallery to transform (omit to only train)")
    t.add_argument("--registry")
    t.add_argument("--transform", help="apply this trained transformation instead of training one")
    t.add_argument("--old", help="model that embedded the gallery")
    t.add_argument("--new", help="model whose space the gallery moves to")
    t.add_argument("--data", help="dataset with raw inputs to learn the map on")
    t.add_argument("--train-split", default="train")
    t.add_argument("--val-split", default="val")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--run-name", help="Ray Train run name (re-using it resumes)")
    t.add_argument("--storage", help="Ray Train run storage")
    t.add_argument("--out", help="where to save the transformation")
    t.add_argument("--no-apply", action="store_true", help="train only")
    t.set_defaults(func=run_transform)

    st = sub.add_parser("status", help="the current snapshot, its index and backfill progress")
    common(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=run_status)

    c = sub.add_parser("compat", help="compatibility matrix M(v_i, v_j) with AC/AM over generations")
    c.add_argument("--data", required=True)
    c.add_argument("--split", default="test")
    c.add_argument("--models", required=True, help="comma-separated refs, oldest first")
    c.add_argument("--metric", default="top1")
    c.add_argument("--registry")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run_compat)
