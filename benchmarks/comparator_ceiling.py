"""How many events one comparator pairs, counts and writes per second, on one core.

Every router replica sends every event to the comparator actor (see
``graceful_ray/serve/comparator.py``), so the comparator's own rate bounds the
whole service: past it, events queue at the comparator and routers keep them
in memory. This measures that rate without Ray's transport, which is the part
that does not move with the comparator's code: what one replica's
``Comparator.ingest`` does per call, and what its flush does.

Each step is one router flush as the router sends it: ``--requests`` predict
requests of ``--rows`` rows, each a :class:`PrimaryEvent` and a
:class:`ShadowEvent`, pickled as Ray would ship them. The comparator's side is
timed in CPU seconds of this (single) thread: unpickle, ``ingest`` (pair,
count), then every ``--flush-records`` records ``take_pending`` + ``write``
(Parquet, zstd, to local disk), as its flush loop does.

    python benchmarks/comparator_ceiling.py --records 200000 --out benchmarks/results/comparator_ceiling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from graceful_ray.serve.comparator import ComparatorCore  # noqa: E402
from graceful_ray.serve.heap import LongLivedHeap  # noqa: E402
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, ShadowConfig  # noqa: E402
from graceful_ray.serve.kinds import PrimaryEvent, ShadowEvent  # noqa: E402

REFS = {BASELINE: "m@v1", CANDIDATE: "m@v2"}


def router_flushes(n_records: int, requests: int, rows: int, features: int, seed: int = 0):
    """Pickled event batches, as one router replica would send them."""
    rng = np.random.default_rng(seed)
    made, batches = 0, []
    while made < n_records:
        events = []
        for _ in range(requests):
            ids = [f"{made + i:012d}" for i in range(rows)]
            made += rows
            dec = rng.integers(0, 10, rows)
            x = rng.normal(size=(rows, features)).astype(np.float32) if features else None
            events.append(PrimaryEvent("predict", ids, 0, 0, BASELINE, dec, 1.0, True, x))
            events.append(ShadowEvent("predict", ids, CANDIDATE, (dec + (rng.random(rows) < 0.05))
                                      % 10, 2.0))
        batches.append(pickle.dumps(events, protocol=5))
    return batches, made


class GcTimer:
    """CPU seconds spent in the cyclic garbage collector (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.cpu_s, self._t0 = 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.process_time()
        else:
            self.cpu_s += time.process_time() - self._t0


def measure(n_records: int, requests: int, rows: int, features: int, flush_records: int,
            freeze: bool = False, max_tracked: int = 1_000_000) -> dict:
    batches, made = router_flushes(n_records, requests, rows, features)
    # the comparator actor calls settle() after every flush; a flush stands for the
    # actor's 10 s flush interval, so the 600 s refresh comes every 60 flushes here
    flushes = [0]
    heap = LongLivedHeap(clock=lambda: 10.0 * flushes[0]) if freeze else None
    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ShadowConfig(registry=os.path.join(tmp, "reg"), baseline=REFS[BASELINE],
                           candidate=REFS[CANDIDATE], storage=os.path.join(tmp, "log"),
                           log_inputs=bool(features), flush_records=flush_records,
                           max_tracked_records=max_tracked)
        core = ComparatorCore(cfg, REFS, list(range(10)))
        cpu = {"unpickle": 0.0, "ingest": 0.0, "write": 0.0}
        wall0 = time.perf_counter()
        since_flush = 0
        for raw in batches:
            t0 = time.process_time()
            events = pickle.loads(raw)
            t1 = time.process_time()
            core.ingest(events)
            t2 = time.process_time()
            cpu["unpickle"] += t1 - t0
            cpu["ingest"] += t2 - t1
            since_flush += requests * rows
            if since_flush >= flush_records:
                t3 = time.process_time()
                core.write(*core.take_pending())
                if heap is not None:
                    flushes[0] += 1
                    heap.settle()
                cpu["write"] += time.process_time() - t3
                since_flush = 0
        t3 = time.process_time()
        core.write(*core.take_pending())
        cpu["write"] += time.process_time() - t3
        wall = time.perf_counter() - wall0
        assert core.stats.requests == made and core.stats.compared == made
        assert core.books["predict"].written == made and core.duplicates == 0
        del core
    gc.callbacks.remove(gc_timer)
    if heap is not None:
        gc.unfreeze()
    gc.collect()  # the next measurement starts from the same heap
    total = sum(cpu.values())
    return {"records": made, "events": 2 * made // rows,  # a primary and a shadow per request
            "rows_per_event": rows, "features": features, "gc_freeze": freeze,
            "gc_cpu_s": gc_timer.cpu_s, "cpu_s": cpu, "cpu_total_s": total,
            "wall_s": wall, "records_per_cpu_s": made / total,
            "events_per_cpu_s": (2 * made / rows) / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--requests", type=int, default=32, help="requests per router flush")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="rows per request")
    p.add_argument("--features", type=int, nargs="+", default=[40, 0],
                   help="logged features per row (0: log_inputs off)")
    p.add_argument("--flush-records", type=int, default=5000)
    p.add_argument("--max-tracked", type=int, default=1_000_000,
                   help="records the comparator keeps for late feedback (its default)")
    p.add_argument("--gc", choices=["default", "freeze", "both"], default="freeze",
                   help="freeze: as the comparator actor runs (serve/heap.py), default: "
                        "CPython's collector untouched, both: one after the other")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    load_before = os.getloadavg()
    runs = []
    modes = {"default": [False], "freeze": [True], "both": [False, True]}[args.gc]
    for features in args.features:
        for rows in args.rows:
            for freeze in modes:
                r = measure(args.records, args.requests, rows, features, args.flush_records,
                            freeze, args.max_tracked)
                runs.append(r)
                print(f"rows/request {rows:3d}  features {features:3d}  gc "
                      f"{'freeze ' if freeze else 'default'} (gc {r['gc_cpu_s']:.2f} s): "
                      f"{r['events_per_cpu_s']:10.0f} events/s  {r['records_per_cpu_s']:10.0f} "
                      f"records/s per CPU-second (ingest {r['cpu_s']['ingest']:.2f} s, write "
                      f"{r['cpu_s']['write']:.2f} s, unpickle {r['cpu_s']['unpickle']:.2f} s; "
                      f"wall {r['wall_s']:.2f} s)", flush=True)
    out = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(),
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
           "requests_per_flush": args.requests, "flush_records": args.flush_records,
           "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
