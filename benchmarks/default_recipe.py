"""The README's v2 recipe against plain, through the product path (Ray Train local
mode, the registry, `interpolate`, `evaluate_upgrade` on the test split).

v1: cnn1d(16) on old_train (30% of train). v2 rows, each on all of train, new seed:
  plain            cnn1d(16) from scratch, cross-entropy
  readme-old       the README's former example: cnn1d(32), bct+fd, fd_kind=lm, fd_beta=5
  warm-bct         cnn1d(16), --init-from-old, bct with bct_kind=cosine (the new recipe's training step)
  warm-bct+interp  the same, then `graceful-ray interpolate` (a chosen on val: lowest NFR at
                   accuracy >= v2's); the recipe the README now shows

Usage (what benchmarks/results/default_recipe.md records):
    nice -n 10 python benchmarks/default_recipe.py --samples 10000 --epochs 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

ROWS = {
    "plain": dict(model_kwargs={"channels": 16}),
    "readme-old": dict(model_kwargs={"channels": 32}, method="bct+fd", hparams={"fd_kind": "lm", "fd_beta": 5}),
    "warm-bct": dict(model_kwargs={"channels": 16}, method="bct", hparams={"bct_kind": "cosine"},
                     init_from_old=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=[*ROWS, "warm-bct+interp"])
    p.add_argument("--root", default="/tmp/graceful-ray-bench/default-recipe")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "default_recipe"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from graceful_ray.data import dataset_exists, make_mnist1d
    from graceful_ray.evaluate import evaluate_upgrade
    from graceful_ray.interpolate import interpolate
    from graceful_ray.raycluster import ensure_ray
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    ensure_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    registry, storage = os.path.join(args.root, "registry"), os.path.join(args.root, "runs")
    data = os.path.join(args.root, f"mnist1d-{args.samples}")
    if not dataset_exists(data):
        make_mnist1d(data, samples=args.samples, seed=1234, scenario="data_growth", old_fraction=0.3)
    results: dict = {"config": vars(args), "runs": {}}

    def train(key, **kw):
        t0 = time.perf_counter()
        cfg = UpgradeConfig(data=data, registry=registry, storage=storage, epochs=args.epochs, model="cnn1d",
                            name="recipe", run_name=f"{key.replace('/', '-')}-{int(time.time())}", workers=0,
                            cpus_per_worker=2.0, **kw)
        r = run_upgrade(cfg)
        print(f"  {key}: {r.model_ref} in {time.perf_counter() - t0:.0f}s", flush=True)
        return r.model_ref, time.perf_counter() - t0

    def record(key, v1, ref, seconds, extra=None):
        rep = evaluate_upgrade(data, v1, ref, registry_root=registry, split="test")
        f = rep["flips"].get("metrics", rep["flips"])
        retr = rep["retrieval"]
        results["runs"][key] = {"ref": ref, "old": v1, "seconds": seconds, "error_old": f["error_rate_old"]["value"],
                                "error_new": f["error_rate_new"]["value"], "nfr": f["nfr"]["value"],
                                "compatible_top1": retr.get("compatible_top1"), **(extra or {})}
        with open(args.out + ".json", "w") as fh:
            json.dump(results, fh, indent=1)

    for seed in args.seeds:
        v1, _ = train(f"v1/s{seed}", train_split="old_train", model_kwargs={"channels": 16}, seed=seed)
        for row in args.rows:
            if row == "warm-bct+interp":
                base = results["runs"].get(f"warm-bct/s{seed}")
                if base is None:
                    continue
                t0 = time.perf_counter()
                res = interpolate(data, v1, base["ref"], registry_root=registry, split="val")
                record(f"{row}/s{seed}", v1, res.published.ref, base["seconds"] + time.perf_counter() - t0,
                       {"alpha": res.alpha})
                continue
            ref, seconds = train(f"{row}/s{seed}", old=v1, seed=seed + 100, **ROWS[row])
            record(f"{row}/s{seed}", v1, ref, seconds)
    write_markdown(results, args)


def _ms(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def write_markdown(results, args) -> None:
    lines = [f"# The README's v2 recipe against plain (MNIST-1D, {args.samples} samples, {args.epochs} epochs)", "",
             f"Command: `nice -n 10 python benchmarks/default_recipe.py {' '.join(sys.argv[1:])}`. Test split, "
             "mean ± sd over seeds, percent; seconds are wall time per v2 on a shared 2-core machine.", "",
             "| v2 | ER_old | ER_new | NFR | compatible (top-1) | seconds | seeds | a |", "|---|---|---|---|---|---|---|---|"]
    runs = results["runs"]
    for row in args.rows:
        rs = [(k, v) for k, v in runs.items() if k.split("/s")[0] == row]
        if not rs:
            continue
        cols = []
        for field in ("error_old", "error_new", "nfr"):
            m, s = _ms([100 * v[field] for _, v in rs])
            cols.append(f"{m:.2f} ± {s:.2f}")
        compat = sum(bool(v["compatible_top1"]) for _, v in rs)
        secs = statistics.fmean(v["seconds"] for _, v in rs)
        alphas = ",".join(f"{v['alpha']:g}" for _, v in rs if "alpha" in v) or "-"
        lines.append(f"| {row} | {' | '.join(cols)} | {compat}/{len(rs)} | {secs:.0f} | "
                     f"{','.join(k.split('/s')[1] for k, _ in rs)} | {alphas} |")
    path = args.out + ".md"
    reading = ""
    if os.path.exists(path):
        old = open(path).read()
        if "\n## Reading" in old:
            reading = old[old.index("\n## Reading") + 1:]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + ("\n" + reading if reading else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
