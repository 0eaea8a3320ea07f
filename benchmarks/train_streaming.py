"""Streaming the training data through Ray Data: worker memory and speed.

1. Memory: peak RSS of the (one) Ray Train worker training one epoch on N, 4N
   and 16N rows of synthetic 32x32 RGB PNGs (decoded by Ray Data tasks), with the
   worker always streaming (``cache_budget_mb=0``). Target: RSS at 16N <= 1.2x
   RSS at N. The worker reports its own ``ru_maxrss`` (metric
   ``worker_peak_rss_mb``) and the peaks of its parts (``worker_peak_anon_mb``:
   its own memory; ``worker_peak_shmem_mb``: object-store pages it mapped). The
   driver samples Ray's object store (the raylet's ``ObjectStoreStats``, what
   ``ray memory --stats-only`` prints) twice a second: peak bytes used, bytes
   spilled, bytes created.
1b. A memory limit: one epoch on a training split whose decoded size is larger
   than the memory the worker may use (``memory_per_worker_mb``: Ray's
   ``memory`` resource, enforced by the worker's own watchdog, which kills it
   past the limit). It must train to the end.
2. Speed on the small case (MNIST-1D): training samples/s of the streamed loop
   (``cache_budget_mb=0``) against the loop that holds the split in memory:
   today's default (cached after the first pass) and the previous materialized
   loop (the code at --baseline-tree, e.g. the main branch, which read the whole
   shard into tensors before the first step). Target: streamed >= 0.9x. Epoch 1
   is left out (every variant streams it or reads it).

Every run is its own process with its own local Ray, so the variants do not share
a Ray or an import.

Usage:  nice -n 5 python benchmarks/train_streaming.py --rows 1000 --capped-rows 80000 --cap-mb 900 \
            --samples 4000 --baseline-tree /work/main
Results: benchmarks/results/train_streaming.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def make_images(out: str, rows: int, seed: int = 0) -> str:
    """Synthetic 32x32 RGB PNGs: a class-coloured square on noise (10 classes)."""
    import pyarrow as pa

    from graceful_ray.data import write_dataset
    from graceful_ray.data.images import encode_png

    if os.path.exists(os.path.join(out, "dataset.json")):
        return out
    rng = np.random.default_rng(seed)
    tables = {}
    for split, n, offset in (("train", rows, 0), ("val", max(200, rows // 10), rows)):
        labels = rng.integers(0, 10, n)
        blobs = []
        for c in labels:
            img = rng.integers(0, 96, (32, 32, 3), dtype=np.uint8)
            img[8:24, 8:24, c % 3] = 128 + 12 * int(c)
            blobs.append(encode_png(img))
        tables[split] = pa.table({"id": pa.array(np.arange(offset, offset + n, dtype=np.int64)),
                                  "label": pa.array(labels.astype(np.int64)),
                                  "image": pa.array(blobs, type=pa.binary())})
    write_dataset(out, tables, name="synthetic-png", num_classes=10, class_names=[str(i) for i in range(10)])
    return out


class ObjectStoreSampler:
    """Samples the local raylet's object-store stats (used, spilled, created bytes)."""

    def __init__(self, interval_s: float = 0.5):
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address
        import ray

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._reply = get_memory_info_reply
        self.interval_s = interval_s
        self.peak_used = 0
        self.last = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        stats = self._reply(self._state).store_stats
        self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
        self.last = stats

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # a slow raylet under load: skip the sample
                pass

    def start(self) -> "ObjectStoreSampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        mib = 2**20
        return {"peak_used_mb": self.peak_used / mib, "spilled_mb": self.last.spilled_bytes_total / mib,
                "created_mb": self.last.cumulative_created_bytes / mib,
                "capacity_mb": (self.last.object_store_bytes_avail) / mib}


def one_run(spec: dict) -> dict:
    """Child process: one training run on a fresh local Ray; prints its history as JSON."""
    import ray

    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    cpus, store = spec.pop("ray_cpus"), spec.pop("object_store_mb") * 2**20
    for attempt in range(6):  # Ray waits a fixed 30 s for its raylet, which a loaded machine can miss
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=store)
            break
        except Exception as e:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(e) or attempt == 5:
                raise
            ray.shutdown()
            time.sleep(10)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sampler = ObjectStoreSampler().start()
    try:
        result = run_upgrade(UpgradeConfig(**spec))
        out = {"history": result.history, "ok": True}
    except Exception as e:  # e.g. the worker stopped at its memory limit
        out = {"history": [], "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    out["object_store"] = sampler.stop()
    ray.shutdown()
    return out


def run(spec: dict, tree: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({tree}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="N for the memory part (runs N, 4N, 16N)")
    p.add_argument("--factors", default="1,4,16", help="multiples of N the memory part runs (ratios are to the first)")
    p.add_argument("--samples", type=int, default=8000, help="MNIST-1D samples for the speed part")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the speed part")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the speed part")
    p.add_argument("--baseline-tree", help="a checkout whose loop materializes the split (e.g. /work/main)")
    p.add_argument("--root", default="/tmp/graceful-ray-bench/streaming")
    p.add_argument("--capped-rows", type=int, default=80_000,
                   help="training rows of the run under a memory limit (0: skip it)")
    p.add_argument("--cap-mb", type=float, default=900.0, help="memory_per_worker_mb of that run")
    p.add_argument("--capped-cache-budget-mb", type=float,
                   help="cache_budget_mb of that run (default: the config's, within a quarter of the limit)")
    p.add_argument("--object-store-mb", type=int, default=2048, help="object store of each run's local Ray")
    p.add_argument("--stream-buffer-mb", type=float,
                   help="stream_buffer_mb of the image runs (default: the config's)")
    p.add_argument("--shuffle-buffer-rows", type=int,
                   help="shuffle_buffer_rows of the image runs (default: the config's)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = dict(workers=1, cpus_per_worker=1.0, publish=False, ray_cpus=4, lr=3e-3,
                  object_store_mb=args.object_store_mb)
    images = dict(common, model="mlp", model_kwargs={"width": 64}, epochs=1, batch_size=256, decode_cpus=1.0,
                  storage=os.path.join(args.root, "runs"), registry=os.path.join(args.root, "registry"))
    if args.stream_buffer_mb is not None:
        images["stream_buffer_mb"] = args.stream_buffer_mb
    if args.shuffle_buffer_rows is not None:
        images["shuffle_buffer_rows"] = args.shuffle_buffer_rows
    if not args.skip_memory:
        print("## Worker memory, streaming (cache_budget_mb=0), one epoch of 32x32 RGB PNGs\n")
        print("| train rows | worker peak RSS (MiB) | of it: own (anon) | object-store pages (shmem) "
              "| object store peak used (MiB) | created (MiB) | samples/s |\n|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for k in (int(f) for f in args.factors.split(",")):
            rows = k * args.rows
            data = make_images(os.path.join(args.root, f"png-{rows}"), rows)
            out = run(dict(images, data=data, cache_budget_mb=0, run_name=f"mem-{rows}"), here)
            h, st = out["history"][-1], out["object_store"]
            base = base or h["worker_peak_rss_mb"]
            print(f"| {rows} ({k}N) | {h['worker_peak_rss_mb']:.0f} ({h['worker_peak_rss_mb'] / base:.2f}x) "
                  f"| {h['worker_peak_anon_mb']:.0f} | {h['worker_peak_shmem_mb']:.0f} | {st['peak_used_mb']:.0f} "
                  f"| {st['created_mb']:.0f} | {h['samples_per_s']:.0f} |", flush=True)

    if args.capped_rows:
        rows = args.capped_rows
        decoded_mb = rows * 3 * 32 * 32 * 4 / 2**20
        data = make_images(os.path.join(args.root, f"png-{rows}"), rows)
        budget = {} if args.capped_cache_budget_mb is None else {"cache_budget_mb": args.capped_cache_budget_mb}
        out = run(dict(images, data=data, memory_per_worker_mb=args.cap_mb, run_name=f"capped-{rows}", **budget), here)
        print(f"\n## Under a memory limit: memory_per_worker_mb={args.cap_mb:.0f}, train split {rows} rows "
              f"= {decoded_mb:.0f} MiB decoded ({decoded_mb / args.cap_mb:.2f}x the limit), "
              f"cache_budget_mb={budget.get('cache_budget_mb', 'default')}\n")
        st = out["object_store"]
        if not out["ok"]:
            print(f"FAILED: {out['error']}\n\nobject store peak {st['peak_used_mb']:.0f} MiB", flush=True)
        else:
            h = out["history"][-1]
            trained = h["samples_per_s"] * h["epoch_time_s"]
            print("| rows trained | worker peak RSS (MiB) | own (anon) | shmem | object store peak used (MiB) "
                  "| spilled (MiB) | samples/s |\n|---:|---:|---:|---:|---:|---:|---:|")
            print(f"| {trained:.0f} of {rows} | {h['worker_peak_rss_mb']:.0f} | {h['worker_peak_anon_mb']:.0f} "
                  f"| {h['worker_peak_shmem_mb']:.0f} | {st['peak_used_mb']:.0f} | {st['spilled_mb']:.0f} "
                  f"| {h['samples_per_s']:.0f} |", flush=True)

    if args.skip_speed:
        return
    from graceful_ray.data import make_mnist1d

    data = os.path.join(args.root, f"mnist1d-{args.samples}")
    if not os.path.exists(os.path.join(data, "dataset.json")):
        make_mnist1d(data, samples=args.samples, seed=0)
    speed = dict(common, data=data, model="cnn1d", model_kwargs={"channels": 16}, epochs=args.epochs,
                 batch_size=128, storage=os.path.join(args.root, "runs"),
                 registry=os.path.join(args.root, "registry"))
    variants = {"streamed (cache_budget_mb=0)": (dict(cache_budget_mb=0), here),
                "cached after epoch 1 (default)": ({}, here)}
    if args.baseline_tree:
        variants["materialized (--baseline-tree)"] = ({}, args.baseline_tree)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    per_round: list[dict[str, float]] = []  # median of each variant's epochs in each round
    for r in range(args.rounds):
        this: dict[str, float] = {}
        for name, (extra, tree) in variants.items():
            hist = run(dict(speed, **extra, run_name=f"speed-{r}-{len(rates[name])}-{abs(hash(name)) % 10**6}"),
                       tree)["history"]
            rates[name] += [h["samples_per_s"] for h in hist[1:]]
            this[name] = statistics.median(h["samples_per_s"] for h in hist[1:])
        per_round.append(dict(this, load=os.getloadavg()[0]))
    print(f"\n## Training samples/s, MNIST-1D {args.samples}, cnn1d channels=16, batch 128, "
          f"epochs 2-{args.epochs}, {args.rounds} rounds\n")
    names = list(variants)
    ref = statistics.median(rates[names[-1]])
    print("| loop | median samples/s | vs last row |\n|---|---:|---:|")
    for name, v in rates.items():
        print(f"| {name} | {statistics.median(v):.0f} | {statistics.median(v) / ref:.2f}x |")
    print("\nPer round (each variant's median over its epochs; ratios to the last row of that round; "
          "load: 1-minute load average at the round's end)\n")
    print("| round | " + " | ".join(names) + " | " + " | ".join(f"{n} / last" for n in names[:-1])
          + " | load |\n|" + "---:|" * (2 * len(names)) + "---:|")
    for r, row in enumerate(per_round):
        print(f"| {r + 1} | " + " | ".join(f"{row[n]:.0f}" for n in names) + " | "
              + " | ".join(f"{row[n] / row[names[-1]]:.2f}x" for n in names[:-1]) + f" | {row['load']:.1f} |")


if __name__ == "__main__":
    main()
