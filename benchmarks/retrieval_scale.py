"""Retrieval at scale: faiss exact vs IVF vs HNSW, and how long a user waits for a new model.

    python benchmarks/retrieval_scale.py faiss --sizes 100000,1000000 \
        --out benchmarks/results/retrieval_faiss.json
    python benchmarks/retrieval_scale.py wait --work /tmp/retrieval-bench --rows 1000000 \
        --out benchmarks/results/retrieval_wait.json

``faiss``: synthetic 64-d embeddings (a mixture of 1,000 Gaussian clusters on
the unit sphere plus noise of twice the centres' norm, so approximate indexes
meet cluster structure but not trivially separable clusters; uniform noise would
be their worst case), 1,000 held-out queries from the same mixture. For each size and index kind: build time, recall@10 against exact
search, batch throughput (1,000 queries per call) and single-query latency.
IVF's ``nprobe`` and HNSW's ``efSearch`` are tuned by the library to recall@10 >= 0.95.

``wait``: the time between "the new model is published" and "the new model
answers searches over the whole gallery", on a gallery of ``--rows`` items:

- no backfill (BCT): the new model lives in the gallery's space; a searcher
  with the new query model loads the existing snapshot and answers;
- full backfill (plain new model): every gallery item is re-embedded by a
  Ray Data job (``run_backfill``, staged mode: the old model keeps serving
  until the gallery switches spaces), the index is rebuilt and published.

MNIST-1D has no million-item gallery, so the gallery's *inputs* are synthetic:
the real MNIST-1D test signals tiled with small Gaussian noise to ``--rows``
rows (ids unique). The models are the real MNIST-1D models of
``retrieval_backfill.py`` (run it first: it trains them under ``--work``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("retrieval_scale")


def synthetic(n: int, d: int, clusters: int, seed: int, spread: float = 2.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    for s in range(0, n, 200_000):
        lab = labels[s:s + 200_000]
        out[s:s + len(lab)] = centers[lab] + spread / np.sqrt(d) * rng.normal(size=(len(lab), d)).astype(np.float32)
    return out, labels, centers


def bench_faiss(args) -> dict:
    import faiss

    from graceful_ray.retrieval.index import IndexConfig, build_index, l2_normalize, recall_at_k

    if args.threads:
        # On an oversubscribed machine OpenMP's spinning threads make every call slower.
        faiss.omp_set_num_threads(args.threads)

    results = {"command": "python " + " ".join(sys.argv), "dim": args.dim, "clusters": args.clusters,
               "spread": args.spread,
               "queries": args.queries, "faiss_threads": faiss.omp_get_max_threads(),
               "load_average": os.getloadavg(), "runs": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        x, _, centers = synthetic(n, args.dim, args.clusters, seed=n, spread=args.spread)
        q, _, _ = synthetic(args.queries, args.dim, args.clusters, seed=n + 1)
        # queries from the same mixture: re-draw around the same centres
        rng = np.random.default_rng(7)
        lab = rng.integers(0, args.clusters, args.queries)
        q = centers[lab] + args.spread / np.sqrt(args.dim) * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
        for kind in args.kinds.split(","):
            cfg = IndexConfig(kind=kind, recall_k=10, recall_queries=500, target_recall=0.95,
                              hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
            t0 = time.perf_counter()
            index, report = build_index(x, cfg, queries=q)
            build_s = time.perf_counter() - t0
            qn = l2_normalize(q)
            index.search(qn[:10], 10)  # warm
            t0 = time.perf_counter()
            reps = 0
            while True:
                index.search(qn, 10)
                reps += 1
                if time.perf_counter() - t0 > 2.0:
                    break
            batch_qps = reps * len(qn) / (time.perf_counter() - t0)
            lat = []
            for i in range(min(200, len(qn))):
                t1 = time.perf_counter()
                index.search(qn[i:i + 1], 10)
                lat.append(time.perf_counter() - t1)
            recall = 1.0 if kind == "flat" else recall_at_k(index, x, q, 10)
            run = {"rows": n, "kind": report.kind, "params": report.params, "build_s": build_s,
                   "recall_at_10": recall, "batch_qps": batch_qps,
                   "single_query_p50_ms": 1000 * float(np.median(lat)),
                   "single_query_p99_ms": 1000 * float(np.percentile(lat, 99)),
                   "tuning": report.tuning}
            log.info("%s", run)
            results["runs"].append(run)
            if args.out:  # partial results survive a run cut short
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1, default=float)
            del index
    return results


def faiss_report(r: dict) -> str:
    L = ["# faiss: exact vs approximate (synthetic 64-d embeddings)", "", f"`{r['command']}`", "",
         f"{r['clusters']} clusters, noise norm {r.get('spread', 2.0)} x the centres', {r['queries']} held-out "
         f"queries, faiss threads {r['faiss_threads']}, "
         f"load average at start {tuple(round(v, 1) for v in r['load_average'])} (shared 2-core machine)", "",
         "| rows | index | params | build s | recall@10 | batch queries/s | 1-query p50 ms | p99 ms |",
         "|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        p = ", ".join(f"{k}={v}" for k, v in x["params"].items())
        L.append(f"| {x['rows']:,} | {x['kind']} | {p} | {x['build_s']:.1f} | {x['recall_at_10']:.4f} | "
                 f"{x['batch_qps']:,.0f} | {x['single_query_p50_ms']:.3f} | {x['single_query_p99_ms']:.3f} |")
    return "\n".join(L)


def bench_wait(args) -> dict:
    import ray
    import torch

    from graceful_ray.data import dataset_exists, read_info, read_split, write_dataset
    from graceful_ray.data import load_split
    from graceful_ray.retrieval import (BackfillConfig, Gallery, GallerySearcher, IndexConfig, build_gallery,
                                        run_backfill)

    torch.set_num_threads(1)
    work = args.work
    models = {k: json.load(open(f"{work}/models/{f}.json"))["ref"]
              for k, f in (("v1", "v1"), ("v2", "v2-bct"), ("v2p", "v2-plain"))}
    reg_root = f"{work}/registry"
    big = f"{work}/data-{args.rows}"
    t0 = time.perf_counter()
    if not dataset_exists(big):
        import pyarrow as pa

        x, y, info = load_split(f"{work}/data", "test")
        rng = np.random.default_rng(0)
        reps = -(-args.rows // len(x))
        idx = np.tile(np.arange(len(x)), reps)[: args.rows]
        feats = (x[idx] + 0.05 * rng.normal(size=(args.rows, x.shape[1])).astype(np.float32)).astype(np.float32)
        table = pa.table({"id": pa.array(np.arange(args.rows, dtype=np.int64)),
                          "label": pa.array(y[idx].astype(np.int64)),
                          "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), x.shape[1])})
        write_dataset(big, {"gallery": table}, name="mnist1d-tiled", num_classes=10,
                      class_names=[str(i) for i in range(10)], feature_shape=(x.shape[1],), subsets={},
                      extra={"source": "MNIST-1D test split tiled with N(0, 0.05) noise (synthetic inputs)"})
    t_data = time.perf_counter() - t0
    _ray_init()
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {"command": "python " + " ".join(sys.argv), "rows": args.rows, "models": models,
           "inputs": "synthetic: MNIST-1D test signals tiled with N(0, 0.05) noise",
           "load_average": os.getloadavg(), "data_s": t_data}
    g = f"{work}/gallery-{args.rows}"
    import shutil

    shutil.rmtree(g, ignore_errors=True)
    t0 = time.perf_counter()
    snap = build_gallery(g, big, "gallery", registry=reg_root, model=models["v1"], batch_size=8192,
                         num_cpus=1.0, index=IndexConfig(kind="auto"))
    out["build_v1_gallery_s"] = time.perf_counter() - t0
    out["index"] = snap.index_report.summary()

    # No backfill: the BCT model serves as soon as a searcher with it is up.
    q_inputs = read_split(big, "gallery").slice(0, 16)
    from graceful_ray.data.tensors import inputs_from_arrow

    xq = inputs_from_arrow(q_inputs, read_info(big).feature_shape)
    t0 = time.perf_counter()
    s = GallerySearcher(g, registry=reg_root, query_model=models["v2"], reload="off")
    res = s.embed_and_search(xq, k=10)
    out["bct_no_backfill_wait_s"] = time.perf_counter() - t0
    out["bct_first_answer_snapshot"] = res.snapshot
    s.close()

    # Full backfill: a plain model (own space) must re-embed every item first.
    t0 = time.perf_counter()
    res_b = run_backfill(BackfillConfig(gallery=g, model=models["v2p"], registry=reg_root, run_name="full",
                                        order="random", chunks=args.chunks, mode="staged", batch_size=8192,
                                        num_cpus=1.0))
    t_backfill = time.perf_counter() - t0
    t1 = time.perf_counter()
    s = GallerySearcher(g, registry=reg_root, query_model=models["v2p"], reload="off")
    s.embed_and_search(xq, k=10)
    out["full_backfill_s"] = t_backfill
    out["full_backfill_searcher_s"] = time.perf_counter() - t1
    out["full_backfill_wait_s"] = t_backfill + out["full_backfill_searcher_s"]
    out["full_backfill_chunks"] = res_b.timings
    out["embed_rows_per_s"] = args.rows / sum(c["embed_s"] for c in res_b.timings)
    out["final_snapshot"] = Gallery(g).head().summary()
    s.close()
    return out


def wait_report(o: dict) -> str:
    return "\n".join([
        f"# Time until a new model serves a {o['rows']:,}-item gallery", "", f"`{o['command']}`", "",
        f"Inputs: {o['inputs']} (say so: synthetic for scale); models: {o['models']}; load average at start "
        f"{tuple(round(v, 1) for v in o['load_average'])} on a shared 2-core machine.", "",
        "| path | user waits |", "|---|---|",
        f"| no backfill (BCT {o['models']['v2']}): searcher up + first answer | {o['bct_no_backfill_wait_s']:.1f} s |",
        f"| full backfill (plain {o['models']['v2p']}): re-embed {o['rows']:,} items on Ray Data, index, publish, searcher up | "
        f"{o['full_backfill_wait_s']:.1f} s |", "",
        f"Re-embedding throughput {o['embed_rows_per_s']:,.0f} rows/s (1 actor, 1 CPU); building the v1 gallery "
        f"took {o['build_v1_gallery_s']:.1f} s ({o['index']}).", "", "Final snapshot:", "", "```",
        o["final_snapshot"], "```"])


def _ray_init() -> None:
    """A local Ray; on a heavily shared machine the raylet can miss Ray's 30 s start-up
    window, so try a few times."""
    import ray

    for attempt in range(10):
        try:
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            return
        except Exception as e:  # noqa: BLE001 - ray raises a bare Exception here
            log.warning("ray.init failed (%s); retrying", e)
            ray.shutdown()
            time.sleep(20)
    raise RuntimeError("could not start a local Ray")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["faiss", "wait"])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--kinds", default="flat,ivf,hnsw")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=2.0,
                   help="noise norm relative to the cluster centres' (1: well clustered, 2: weakly)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--work", default="/tmp/retrieval-bench")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunks", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.data", "ray.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = bench_faiss(args) if args.what == "faiss" else bench_wait(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    text = faiss_report(result) if args.what == "faiss" else wait_report(result)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
