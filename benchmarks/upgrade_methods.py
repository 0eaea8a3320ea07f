"""Reproduce the papers' findings at small scale: which objective lowers flips,
which one makes embeddings compatible.

Everything runs through the product path (Ray Train via ``run_upgrade``, the
registry, ``evaluate_upgrade`` on the test split), on MNIST-1D generated locally.

Part 1 (PCT, Yan et al. CVPR 2021, Table 2a): rows plain, kd, fd-kl, fd-lm, bct;
columns ER_old, ER_new, NFR, relative NFR; three scenarios:
  same-arch  v1 cnn1d(32) on the old half of the training data -> v2 cnn1d(32) on all of it, new seed
  arch-up    v1 cnn1d(16) on the old half                       -> v2 cnn1d(64) on all of it
  retrain    v1 cnn1d(32) on 90% of the training data           -> v2 cnn1d(32) on all of it, new seed
             (PCT's regime: old and new of similar accuracy, so their errors differ mostly by chance)
  retrain-const  the same with a constant learning rate (the default recipe decays it to 0)
Part 2 (BCT, Shen et al. CVPR 2020): class-incremental split (v1 sees classes 0-4);
M(new, old) vs M(old, old) for plain, l2, bct and bct with the cosine influence loss, and the
update gain.

Part 3 (peers, ``--parts peers``, results in upgrade_peers.{json,md}): every method of the
product side by side, on MNIST-1D (--samples) and scikit-learn digits, data-growth split
(v1 cnn1d(16) on old_train), each method at its best setting of the fixed grid PEER_GRID,
chosen on the *validation* split (lowest val NFR with val error <= plain's val error + 0.5
points; plain itself if none qualifies), reported on the test split. Warm start and its
interpolation (`graceful-ray interpolate`, a chosen on val) are rows of their own.

Part 4 (fronts, ``--parts fronts``, results in upgrade_fronts.{json,md,png}): issue 14's
measurement. Every method's front (test error vs NFR) over the fixed search FRONT_SEARCH (written
before the part's first run), with BCWI interpolation between v1 and v2 as fronts of their own,
on MNIST-1D at 6k and 20k samples, digits and a generated 30-class problem, PCT's data-growth
regime (v1 on half of train); NFR read off each front at plain's error + 0.5 points, beside the
setting chosen on validation, and a control (FRONT_CONTROLS: plain at twice the epochs, in no
front). No Ray: trained in this process through the product's own
``graceful_ray.train.step.run_epoch``. Seeds are the outer loop, so a run stopped early has every
dataset for the seeds it finished.

The results JSON doubles as a resume log: a run already recorded (and still in the
registry) is not trained again. --scenarios and --methods pick a subset.

Usage:
    python benchmarks/upgrade_methods.py --samples 20000 --epochs 15 --seeds 0 1 2
    python benchmarks/upgrade_methods.py --samples 20000 --epochs 15 --seeds 0 1 2 3 4 \
        --parts pct --scenarios retrain --methods plain kd fd-kl fd-lm bct fd-lm-std-0.3 kd-lm-std-1.7
    nice -n 19 python benchmarks/upgrade_methods.py --parts fronts --seeds 0 1 2 3 4
Results: benchmarks/results/upgrade_methods.{json,md} (the hand-written reading at the end of
the .md, from its first "## Reading" heading on, is kept when the tables are rewritten)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

METHODS = {
    "plain": ("plain", {}),
    "kd": ("kd", {"kd_kind": "lm", "kd_lambda": 1.0}),  # focal distillation with beta = 0
    "fd-kl": ("fd", {"fd_kind": "kl", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 1.0, "fd_temperature": 100.0}),
    "fd-lm": ("fd", {"fd_kind": "lm", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 1.0}),
    "bct": ("bct", {"bct_lambda": 1.0}),
    # The paper's lambda = 1 ties a from-scratch student to its teacher too tightly
    # at this scale (see results); a lighter weight is the point the Tune search finds.
    "fd-lm-0.1": ("fd", {"fd_kind": "lm", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 0.1}),
    "fd-lm-0.01": ("fd", {"fd_kind": "lm", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 0.01}),
    # Logit matching on standardized logits (fd_kind="lm-std", see methods/focal_distillation.py):
    # the shape of the old model's class preferences without its scale. kd-lm-std gives every
    # sample the weight fd gives on average (1 + 5 * old accuracy ~ 5.6), so the two rows differ
    # only in where the weight goes.
    "fd-lm-std": ("fd", {"fd_kind": "lm-std", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 0.03}),
    "kd-lm-std": ("kd", {"kd_kind": "lm-std", "kd_lambda": 0.17}),
    # The retrain scenario's weight (from a one-seed probe at 0.1 and 0.3), and kd with the
    # same average weight (1 + 5 * old accuracy ~ 5.8 times lambda).
    "fd-lm-std-0.3": ("fd", {"fd_kind": "lm-std", "fd_alpha": 1.0, "fd_beta": 5.0, "fd_lambda": 0.3}),
    "kd-lm-std-1.7": ("kd", {"kd_kind": "lm-std", "kd_lambda": 1.74}),
}
# scenario: (v1 model kwargs, v2 model kwargs, share of the training data v1 saw, training kwargs
# of both v1 and v2)
SCENARIOS = {
    "same-arch": ({"channels": 32}, {"channels": 32}, 0.5, {}),
    "arch-up": ({"channels": 16}, {"channels": 64}, 0.5, {}),
    "retrain": ({"channels": 32}, {"channels": 32}, 0.9, {}),
    # the same, with a constant learning rate instead of the cosine decay (a team's other recipe)
    "retrain-const": ({"channels": 32}, {"channels": 32}, 0.9, {"lr_schedule": "constant"}),
}
# Part 3: the fixed, pre-registered grid per method (label -> (method, hparams, config extras)).
PEER_GRID = {
    "plain": [("plain", {}, {})],
    "fd-lm-std": [("fd", {"fd_kind": "lm-std", "fd_lambda": lam}, {}) for lam in (0.1, 0.3)],
    "new-error": [("new-error", {"ne_kind": "weighted", "ne_lambda": 2.0}, {})],
    "strict": [("new-error", {"ne_kind": "strict", "ne_lambda": 2.0}, {})],
    "elodi": [("elodi", {"elodi_lambda": 1.0}, {})],
    # ELODI with an ensemble reference: v1 and two models trained like it (old_train, other seeds);
    # ENSEMBLE below fills in elodi_refs per seed
    "elodi-ens": [("elodi", {"elodi_lambda": 1.0}, {})],
    "warm": [("plain", {}, {"init_from_old": True})],
}
ENSEMBLE = "elodi-ens"
# mnist1d: --samples rows; mnist1d-20k: 20,000; digits: scikit-learn's 1,797; many30: a generated
# 30-class problem (make_classification, 9,000 rows, 64 features, 5% label noise)
PEER_DATASETS = ("mnist1d", "mnist1d-20k", "digits", "many30")


def make_many_classes(out: str, *, classes: int = 30, rows: int = 9000, seed: int = 1234,
                      old_fraction: float = 0.3) -> None:
    """A generated many-class problem in the data contract, data-growth split (v1 sees ``old_fraction``)."""
    from sklearn.datasets import make_classification

    from graceful_ray.data import write_dataset
    from graceful_ray.data.builtin import _features_tables, scenario_dict, split_indices

    x, y = make_classification(n_samples=rows, n_features=64, n_informative=24, n_redundant=0, n_classes=classes,
                               n_clusters_per_class=1, class_sep=1.5, flip_y=0.05, random_state=seed)
    scen = scenario_dict("data_growth", classes, old_fraction, None)
    splits = split_indices(y, seed=seed, scenario=scen, val_fraction=0.1, test_fraction=0.2)
    write_dataset(out, _features_tables(x.astype("float32"), y.astype("int64"), splits), name="many30",
                  num_classes=classes, class_names=[str(i) for i in range(classes)], feature_shape=(64,),
                  scenario=scen, seed=seed)
CI_METHODS = {"plain": ("plain", {}), "l2": ("l2", {}), "bct": ("bct", {}),
              "bct-cos": ("bct", {"bct_kind": "cosine"})}


def _mean_sd(values):
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, pct=True):
    m, s = _mean_sd(values)
    k = 100 if pct else 1
    return f"{k * m:.2f} ± {k * s:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default="/tmp/graceful-ray-bench/upgrade")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "upgrade_methods"))
    p.add_argument("--parts", default="pct,bct")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--datasets", nargs="+", default=None, choices=sorted({*PEER_DATASETS, *FRONT_DATASETS}),
                   help="parts peers and fronts: the datasets (default: all of the part's)")
    p.add_argument("--report", action="store_true",
                   help="part fronts: write the tables and the plot from the results JSON, train nothing")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray Train workers per run; 0 = Ray Train local mode (same loop, no actor start-up)")
    args = p.parse_args()
    if args.datasets is None:
        args.datasets = list(FRONT_DATASETS if args.parts == "fronts" else PEER_DATASETS)
    logging.basicConfig(level=logging.WARNING)
    if args.parts == "fronts":  # no Ray: in this process
        if args.out == p.get_default("out"):
            args.out = os.path.join(os.path.dirname(__file__), "results", "upgrade_fronts")
        return run_fronts(args)

    import ray

    from graceful_ray.data import dataset_exists, make_mnist1d
    from graceful_ray.evaluate import evaluate_upgrade
    from graceful_ray.raycluster import ensure_ray
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    ensure_ray(num_cpus=4)
    if args.parts == "peers":
        if args.out == p.get_default("out"):
            args.out = os.path.join(os.path.dirname(__file__), "results", "upgrade_peers")
        return run_peers(args)
    ray.data.DataContext.get_current().enable_progress_bars = False
    registry, storage = os.path.join(args.root, "registry"), os.path.join(args.root, "runs")
    results_path = args.out + ".json"
    results = json.load(open(results_path)) if os.path.exists(results_path) else {"runs": {}}
    results["config"] = {"samples": args.samples, "epochs": args.epochs}
    from graceful_ray.registry import Registry

    def registered(ref):
        try:
            Registry(registry).get(ref)
            return True
        except Exception:  # noqa: BLE001 - any failure to load means: train it again
            return False

    def save():
        os.makedirs(os.path.dirname(results_path), exist_ok=True)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)

    def train(key, **kw):
        """Train once per key (the JSON doubles as a resume log for this script)."""
        run = results["runs"].get(key, {})
        if registered(run.get("ref", "")) and run.get("old") == kw.get("old"):
            return run["ref"]  # trained against the same parent, and still in the registry
        t0 = time.perf_counter()
        cfg = UpgradeConfig(registry=registry, storage=storage, epochs=args.epochs, batch_size=128, lr=3e-3,
                            name=key.split("/")[0], run_name=key.replace("/", "-"), cpus_per_worker=2.0,
                            workers=args.workers, max_failures=1, **kw)
        r = run_upgrade(cfg)
        results["runs"][key] = {"ref": r.model_ref, "old": kw.get("old"), "train_s": time.perf_counter() - t0,
                                "val": r.metrics}
        save()
        print(f"  trained {key} -> {r.model_ref} in {time.perf_counter() - t0:.0f}s "
              f"(val acc {r.metrics['val_accuracy']:.4f})", flush=True)
        return r.model_ref

    def evaluate(key, data, old, new, reference=None):
        run = results["runs"].get(key, {})
        if "eval" not in run or run["eval"].get("against") != [old, new, reference]:
            rep = evaluate_upgrade(data, old, new, registry_root=registry, split="test", reference_ref=reference)
            results["runs"][key]["eval"] = {"flips": rep["flips"]["metrics"] if "metrics" in rep["flips"] else rep["flips"],
                                            "retrieval": rep["retrieval"], "against": [old, new, reference]}
            save()
        return results["runs"][key]["eval"]

    if "pct" in args.parts:
        for scen in args.scenarios:
            old_kw, new_kw, old_fraction, train_kw = SCENARIOS[scen]
            suffix = "" if old_fraction == 0.5 else f"-old{round(100 * old_fraction)}"
            data = os.path.join(args.root, f"mnist1d-{args.samples}{suffix}")
            if not dataset_exists(data):
                make_mnist1d(data, samples=args.samples, seed=1234, scenario="data_growth",
                             old_fraction=old_fraction)
            for seed in args.seeds:
                v1 = train(f"{scen}-v1/s{seed}", data=data, model="cnn1d", model_kwargs=old_kw,
                           train_split="old_train", seed=seed, **train_kw)
                for label in args.methods:
                    method, hp = METHODS[label]
                    key = f"{scen}-{label}/s{seed}"
                    new = train(key, data=data, model="cnn1d", model_kwargs=new_kw, method=method, hparams=hp,
                                old=v1, seed=seed + 100, **train_kw)
                    evaluate(key, data, v1, new)

    if "bct" in args.parts:
        data = os.path.join(args.root, f"mnist1d-{args.samples}-classinc")
        if not dataset_exists(data):
            make_mnist1d(data, samples=args.samples, seed=1234, scenario="class_incremental",
                         old_classes=[0, 1, 2, 3, 4])
        for seed in args.seeds:
            v1 = train(f"ci-v1/s{seed}", data=data, model="cnn1d", model_kwargs={"channels": 32},
                       train_split="old_train", seed=seed)
            plain = train(f"ci-plain/s{seed}", data=data, model="cnn1d", model_kwargs={"channels": 32},
                          old=v1, seed=seed + 100)
            for label, (method, hp) in CI_METHODS.items():
                key = f"ci-{label}/s{seed}"
                new = plain if label == "plain" else train(key, data=data, model="cnn1d",
                                                           model_kwargs={"channels": 32}, method=method,
                                                           hparams=hp, old=v1, seed=seed + 100)
                evaluate(key, data, v1, new, reference=plain)

    write_markdown(results, args)


def run_peers(args) -> None:
    """Part 3: every method side by side at its best grid setting (chosen on val), on test."""
    from graceful_ray.data import dataset_exists, make_digits, make_mnist1d
    from graceful_ray.evaluate import evaluate_upgrade
    from graceful_ray.interpolate import interpolate
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    registry, storage = os.path.join(args.root, "registry"), os.path.join(args.root, "runs")
    path = args.out + ".json"
    results = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    results["config"] = {"samples": args.samples, "epochs": args.epochs, "seeds": args.seeds,
                         "grid": {k: [[m, hp, ex] for m, hp, ex in v] for k, v in PEER_GRID.items()}}

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    def flips(data, old, new, split):
        rep = evaluate_upgrade(data, old, new, registry_root=registry, split=split)
        f = rep["flips"].get("metrics", rep["flips"])
        return {"error": f["error_rate_new"]["value"], "error_old": f["error_rate_old"]["value"],
                "nfr": f["nfr"]["value"]}

    for ds in args.datasets:
        data = os.path.join(args.root, f"{ds}-{args.samples}" if ds == "mnist1d" else ds)
        if not dataset_exists(data):
            if ds.startswith("mnist1d"):
                make_mnist1d(data, samples=args.samples if ds == "mnist1d" else 20000, seed=1234,
                             scenario="data_growth", old_fraction=0.3)
            elif ds == "digits":
                make_digits(data, seed=1234, scenario="data_growth", old_fraction=0.3)
            else:
                make_many_classes(data)
        for seed in args.seeds:
            def train(key, **kw):
                if key in results["runs"]:
                    return results["runs"][key]["ref"]
                t0 = time.perf_counter()
                cfg = UpgradeConfig(data=data, registry=registry, storage=storage, epochs=args.epochs,
                                    model="cnn1d", model_kwargs={"channels": 16}, name=ds,
                                    run_name=f"peers-{key.replace('/', '-')}", workers=0, cpus_per_worker=2.0, **kw)
                r = run_upgrade(cfg)
                results["runs"][key] = {"ref": r.model_ref, "seconds": time.perf_counter() - t0}
                save()
                print(f"  {key}: {r.model_ref} in {time.perf_counter() - t0:.0f}s", flush=True)
                return r.model_ref

            v1 = train(f"{ds}/v1/s{seed}", train_split="old_train", seed=seed)
            for label, grid in PEER_GRID.items():
                if label == ENSEMBLE:
                    refs = [v1] + [train(f"{ds}/v1-ref{j}/s{seed}", train_split="old_train", seed=seed + 1000 * j)
                                   for j in (1, 2)]
                    grid = [(m, {**hp, "elodi_refs": ",".join(refs)}, ex) for m, hp, ex in grid]
                for i, (method, hp, extra) in enumerate(grid):
                    key = f"{ds}/{label}-{i}/s{seed}"
                    ref = train(key, old=v1, method=method, hparams=hp, seed=seed + 100, **extra)
                    run = results["runs"][key]
                    if "val" not in run:
                        run.update(val=flips(data, v1, ref, "val"), test=flips(data, v1, ref, "test"),
                                   method=method, hparams=hp, extra=extra)
                        save()
            warm = results["runs"][f"{ds}/warm-0/s{seed}"]
            key = f"{ds}/warm+interp-0/s{seed}"
            if key not in results["runs"]:
                t0 = time.perf_counter()
                res = interpolate(data, v1, warm["ref"], registry_root=registry, split="val")
                results["runs"][key] = {"ref": res.published.ref, "alpha": res.alpha,
                                        "seconds": warm["seconds"] + time.perf_counter() - t0,
                                        "val": flips(data, v1, res.published.ref, "val"),
                                        "test": flips(data, v1, res.published.ref, "test")}
                save()
    write_peers_markdown(results, args)


def write_peers_markdown(results, args) -> None:
    runs = results["runs"]
    labels = [*PEER_GRID, "warm+interp"]  # keys are <dataset>/<label>-<grid index>/s<seed>
    datasets = [d for d in PEER_DATASETS if any(k.split("/")[0] == d for k in runs)]
    lines = [f"# Upgrade methods side by side ({', '.join(datasets)}; mnist1d = MNIST-1D {args.samples} samples; "
             f"{args.epochs} epochs)", "",
             f"Command: `nice -n 10 python benchmarks/upgrade_methods.py {' '.join(sys.argv[1:])}`. v1 cnn1d(16) "
             "on old_train (30% of train), v2 cnn1d(16) on all of train, seed + 100. Per method and seed the "
             "grid setting with the lowest *validation* NFR at validation error <= plain's + 0.5 points "
             "(none qualifying: its lowest-error setting, marked *); the table is its *test* split. Mean ± sd "
             "over seeds, percent. 'vs plain' is the relative change of the mean NFR.", ""]
    for ds in datasets:
        lines += [f"## {ds}", "", "| method | setting(s) chosen | ER_old | ER_new | NFR | vs plain | seeds |",
                  "|---|---|---|---|---|---|---|"]
        plain_nfr = None
        # the seeds every row has (a seed still training is left out, so the rows stay paired)
        seeds = sorted(s for s in {int(k.rsplit("/s", 1)[1]) for k in runs if k.split("/")[0] == ds}
                       if all(any(k.split("/")[0] == ds and k.split("/")[1].rsplit("-", 1)[0] == label
                                  and k.endswith(f"/s{s}") and "val" in v for k, v in runs.items())
                              for label in labels))
        for label in labels:
            chosen = []
            for seed in seeds:
                cands = [(k, v) for k, v in runs.items() if k.split("/")[0] == ds
                         and k.split("/")[1].rsplit("-", 1)[0] == label and k.endswith(f"/s{seed}") and "val" in v]
                base = runs.get(f"{ds}/plain-0/s{seed}")
                if not cands or base is None or "val" not in base:
                    continue
                ok = [c for c in cands if c[1]["val"]["error"] <= base["val"]["error"] + 0.005]
                if ok:
                    k, v = min(ok, key=lambda c: c[1]["val"]["nfr"])
                    tag = ""
                else:
                    k, v = min(cands, key=lambda c: c[1]["val"]["error"])
                    tag = "*"
                setting = v.get("hparams") or ({"a": v["alpha"]} if "alpha" in v else {})
                chosen.append((seed, v, f"{_short(setting)}{tag}"))
            if not chosen:
                continue
            nfr = [100 * v["test"]["nfr"] for _, v, _ in chosen]
            m_nfr, _ = _mean_sd(nfr)
            if label == "plain":
                plain_nfr = m_nfr
            rel = f"{100 * (m_nfr / plain_nfr - 1):+.0f}%" if plain_nfr else "-"
            lines.append(f"| {label} | {'; '.join(s for _, _, s in chosen)} | "
                         f"{fmt([v['test']['error_old'] for _, v, _ in chosen])} | "
                         f"{fmt([v['test']['error'] for _, v, _ in chosen])} | {fmt([v['test']['nfr'] for _, v, _ in chosen])} | "
                         f"{rel} | {','.join(str(s) for s, _, _ in chosen)} |")
        lines.append("")
    write_with_reading(args.out + ".md", lines)


def write_with_reading(path: str, lines: list[str]) -> None:
    """Write the tables to ``path``, keeping the hand-written reading (from its first "## Reading" on)."""
    reading = ""
    if os.path.exists(path):
        old = open(path).read()
        if "\n## Reading" in old:
            reading = old[old.index("\n## Reading") + 1:]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + ("\n" + reading if reading else ""))
    print("\n".join(lines))


def _short(hp) -> str:
    return ",".join(f"{k.split('_', 1)[-1]}={v}" for k, v in hp.items()
                    if k not in ("fd_kind", "ne_kind", "elodi_refs")) or "-"


def _evals(runs, prefix):
    """The recorded evaluations of ``prefix/s<seed>`` for every seed, by seed."""
    out = {}
    for key, run in runs.items():
        head, _, seed = key.partition("/s")
        if head == prefix and "eval" in run:
            out[int(seed)] = run["eval"]
    return [out[s] for s in sorted(out)], sorted(out)


def write_markdown(results, args) -> None:
    runs = results["runs"]
    lines = [f"# Upgrade methods on MNIST-1D ({args.samples} samples, {args.epochs} epochs)", "",
             "Commands: `python benchmarks/upgrade_methods.py --samples 20000 --epochs 15 --workers 0 "
             "--seeds 0 1 2` (same-arch, arch-up, class-incremental); the retrain scenario with "
             "`--seeds 0 1 2 3 4 --parts pct --scenarios retrain --methods plain kd fd-kl fd-lm bct "
             "fd-lm-std-0.3 kd-lm-std-1.7`. The rows are what the results JSON holds (the seeds "
             "column says which); the last invocation was `python benchmarks/upgrade_methods.py "
             f"{' '.join(sys.argv[1:])}`.", "",
             "Test split, mean ± standard deviation over seeds, in percent.", ""]
    for scen, (old_kw, new_kw, old_fraction, train_kw) in SCENARIOS.items():
        rows = []
        for label in METHODS:
            evs, seeds = _evals(runs, f"{scen}-{label}")
            if not evs:
                continue
            f = [e["flips"] for e in evs]
            rows.append(f"| {label} | {fmt([x['error_rate_old']['value'] for x in f])} | "
                        f"{fmt([x['error_rate_new']['value'] for x in f])} | {fmt([x['nfr']['value'] for x in f])} | "
                        f"{fmt([x['relative_nfr'] for x in f], pct=False)} | {','.join(map(str, seeds))} |")
        if rows:
            recipe = f", {train_kw}" if train_kw else ""
            lines += [f"## {scen}: v1 {old_kw} on {round(100 * old_fraction)}% of train -> v2 {new_kw} on all of it"
                      f"{recipe}",
                      "", "| method | ER_old | ER_new | NFR | relative NFR | seeds |", "|---|---|---|---|---|---|",
                      *rows, ""]
    rows = []
    for label in CI_METHODS:
        evs, seeds = _evals(runs, f"ci-{label}")
        if not evs:
            continue
        r = [e["retrieval"] for e in evs]
        rows.append(f"| {label} | {fmt([x['m_old_old']['top1'] for x in r])} | {fmt([x['m_new_old']['top1'] for x in r])} | "
                    f"{fmt([x['m_new_new']['top1'] for x in r])} | {sum(x['compatible_top1'] for x in r)}/{len(r)} | "
                    f"{fmt([x['m_old_old']['map'] for x in r])} | {fmt([x['m_new_old']['map'] for x in r])} | "
                    f"{sum(x['compatible_map'] for x in r)}/{len(r)} | {fmt([x['update_gain_top1'] for x in r], pct=False)} |")
    if rows:
        lines += ["## Class-incremental (v1 sees classes 0-4): compatibility, leave-one-out retrieval on test", "",
                  "| method | M(old,old) top-1 | M(new,old) top-1 | M(new,new) top-1 | compatible (top-1) | "
                  "M(old,old) mAP | M(new,old) mAP | compatible (mAP) | update gain (top-1) |",
                  "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    write_with_reading(args.out + ".md", lines)


# Part 4 (``--parts fronts``, results in upgrade_fronts.{json,md,png}): every method's front (test
# error vs NFR) from a fixed search written here before any run of this part, in this process
# through graceful_ray.train.step.run_epoch (the loop's own step, no Ray: the search is ~100
# trainings per seed on a shared 2-core machine). Regime: PCT's data growth (v1 cnn1d(16) on
# old_train = 50% of train; v2 cnn1d(16) on all of train, seed + 100), the same epochs, batch,
# lr, AdamW and cosine schedule (unless the row says constant) for every method.
# label -> list of (method spec, hparams, extras); extras: warm (init from v1), schedule, refs
FRONT_SEARCH = {
    "plain": [("plain", {}, {})],
    "fd-lm-std": [("fd", {"fd_kind": "lm-std", "fd_lambda": lam}, {}) for lam in (0.03, 0.1, 0.3)],
    # PCT's own form and weight (KL at T = 100, lambda 1)
    "fd-kl": [("fd", {"fd_kind": "kl", "fd_lambda": 1.0, "fd_temperature": 100.0}, {})],
    "new-error": [("new-error", {"ne_kind": "weighted", "ne_lambda": lam}, {}) for lam in (0.5, 1.0, 2.0, 4.0)],
    "strict": [("new-error", {"ne_kind": "strict", "ne_lambda": 1.0}, {})],
    "elodi": [("elodi", {"elodi_lambda": lam}, {}) for lam in (0.1, 1.0)],
    # reference: the mean of v1 and two models trained like it (old_train, other seeds)
    "elodi-ens": [("elodi", {"elodi_lambda": 1.0}, {"refs": 3})],
    "warm": [("plain", {}, {"warm": True})],
    "warm+fd": [("fd", {"fd_kind": "lm-std", "fd_lambda": 0.1}, {"warm": True})],
}
# Added after the search's first two seeds, as a control and not a candidate (it is in no front):
# plain with twice the epochs. A warm-started v2 has had v1's training as well as its own, so
# part of what warm start buys may be training time that plain, at one budget, did not get.
FRONT_CONTROLS = {"plain-2x": [("plain", {}, {"epochs_factor": 2})]}
# BCWI (graceful_ray.interpolate.interpolate_state) along a = 0, 0.1, ..., 1 of these rows' v2s:
# each a is a point of the row "<label>+interp" (a = 1 is the row itself, a = 0 is v1)
FRONT_INTERPOLATE = ("plain", "warm", "warm+fd")
FRONT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
# dataset -> (builder, kwargs, epochs); many30 is make_many_classes with old_fraction 0.5. Epochs
# per dataset so that each run takes a few hundred steps or more (digits' 900 training rows
# need more passes than MNIST-1D 20k's 14,000); the same for every method and for v1.
FRONT_DATASETS = {
    "mnist1d-6k": ("mnist1d", {"samples": 6000}, 15),
    "mnist1d-20k": ("mnist1d", {"samples": 20000}, 8),
    "digits": ("digits", {}, 40),
    "many30": ("many", {}, 15),
}
FRONT_OLD_FRACTION = 0.5
FRONT_MARGIN = 0.005  # the accuracy the issue asks for: plain's error + 0.5 points


def _front_data(root: str, ds: str) -> str:
    from graceful_ray.data import dataset_exists, make_digits, make_mnist1d

    kind, kw, _ = FRONT_DATASETS[ds]
    data = os.path.join(root, f"fronts-{ds}")
    if not dataset_exists(data):
        if kind == "mnist1d":
            make_mnist1d(data, seed=1234, scenario="data_growth", old_fraction=FRONT_OLD_FRACTION, **kw)
        elif kind == "digits":
            make_digits(data, seed=1234, scenario="data_growth", old_fraction=FRONT_OLD_FRACTION)
        else:
            make_many_classes(data, old_fraction=FRONT_OLD_FRACTION)
    return data


def _tensors(data: str):
    import torch

    from graceful_ray.data import read_info, read_split
    from graceful_ray.train.batches import inputs_from_arrow

    info = read_info(data)
    out = {}
    for split in ("old_train", "train", "val", "test"):
        t = read_split(data, split)
        out[split] = (torch.from_numpy(inputs_from_arrow(t, info.feature_shape)),
                      torch.tensor(t.column("label").to_numpy(), dtype=torch.long))
    return info, out


def train_in_process(xy, *, num_classes, feature_shape, seed, epochs, method="plain", hparams=None, old=None,
                     warm=False, schedule="cosine", refs=(), batch_size=128, lr=3e-3, weight_decay=1e-4):
    """One model trained like the product's loop does (AdamW, cosine or constant lr, cached old outputs),
    through :func:`graceful_ray.train.step.run_epoch`; ``old``: v1 (the old outputs' source)."""
    import torch

    from graceful_ray.methods import UpgradeContext, build_method
    from graceful_ray.models import ModelSpec, build_model
    from graceful_ray.train.pipeline import INPUT
    from graceful_ray.train.step import CachedOldOutputs, run_epoch

    x, y = xy
    torch.manual_seed(seed)
    model = build_model(ModelSpec("cnn1d", tuple(feature_shape), num_classes, {"channels": 16}))
    classes = list(range(num_classes))
    m = build_method(method, **(hparams or {}))
    if old is None:
        m.setup(UpgradeContext(num_classes=num_classes, new_embedding_dim=model.embedding_dim))
        cols = {}
    else:
        m.setup(UpgradeContext(num_classes=num_classes, old_classes=classes,
                               old_head_weight=old.head.weight.detach().clone(),
                               old_head_bias=old.head.bias.detach().clone(),
                               old_embedding_dim=old.embedding_dim, new_embedding_dim=model.embedding_dim,
                               classes=classes))
        with torch.no_grad():
            emb, logits = old.eval().forward_features(x)
        cols = {"old_embedding": emb, "old_logits": logits, "old_correct": logits.argmax(1) == y}
        if warm:
            model.load_state_dict(old.state_dict())
    if refs:  # ELODI's ensemble reference, the models themselves (no registry in this process)
        for r in refs:
            r.eval()
        (elodi,) = m.methods  # build_method's Composite of one
        elodi.set_references(list(refs), [classes] * len(refs), classes, classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = -(-len(y) // batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps) if schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    gen = torch.Generator().manual_seed(seed)

    def batches():
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            yield {INPUT: x[idx], "label": y[idx], **{k: v[idx] for k, v in cols.items()}}

    for _ in range(epochs):
        model.train()
        run_epoch(batches(), device=torch.device("cpu"), forward=model.forward_features, method=m,
                  optimizer=opt, scheduler=sched, old=CachedOldOutputs(torch.device("cpu")) if cols else None)
    return model.eval()


def _flip_stats(model, old, xy) -> dict:
    import torch

    x, y = xy
    with torch.no_grad():
        new_ok = model(x).argmax(1) == y
        old_ok = old(x).argmax(1) == y
    return {"error": float(1 - new_ok.float().mean()), "error_old": float(1 - old_ok.float().mean()),
            "nfr": float((old_ok & ~new_ok).float().mean())}


def pareto_front(points):
    """The (error, nfr) points no other point beats on both, sorted by error."""
    front = []
    for e, n in sorted(points):
        if not front or n < front[-1][1]:
            front.append((e, n))
    return front


def nfr_at(front, error):
    """NFR along the front (linear between its points) at ``error``; None when the front never gets there."""
    if not front or front[0][0] > error:
        return None
    for (e0, n0), (e1, n1) in zip(front, front[1:]):
        if e0 <= error <= e1:
            return n0 + (n1 - n0) * (error - e0) / (e1 - e0) if e1 > e0 else min(n0, n1)
    return front[-1][1]


def run_fronts(args) -> None:
    import copy

    import torch

    from graceful_ray.interpolate import interpolate_state

    torch.set_num_threads(1)  # a shared 2-core machine: one core, niced
    path = args.out + ".json"
    results = json.load(open(path)) if os.path.exists(path) else {"points": {}}
    command = " ".join(sys.argv[1:]) if not args.report else results.get("config", {}).get("command", "")
    results["config"] = {"command": command, "datasets": FRONT_DATASETS, "seeds": args.seeds, "old_fraction": FRONT_OLD_FRACTION,
                         "search": {k: [[m, hp, ex] for m, hp, ex in v] for k, v in FRONT_SEARCH.items()},
                         "interpolate": list(FRONT_INTERPOLATE), "alphas": list(FRONT_ALPHAS)}

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    search = {**FRONT_SEARCH, **FRONT_CONTROLS}
    for seed in [] if args.report else args.seeds:  # seeds outermost: a stopped run has every dataset
        for ds in args.datasets:
            if all(f"{ds}/{label}/{i}/s{seed}" in results["points"] for label, g in search.items()
                   for i in range(len(g))):
                continue
            info, xy = _tensors(_front_data(args.root, ds))
            common = dict(num_classes=info.num_classes, feature_shape=info.feature_shape,
                          epochs=FRONT_DATASETS[ds][2])
            t0 = time.perf_counter()
            v1 = train_in_process(xy["old_train"], seed=seed, **common)
            refs: list = []  # ELODI's ensemble, trained when a setting first needs it
            for label, grid in search.items():
                for i, (method, hp, extra) in enumerate(grid):
                    key = f"{ds}/{label}/{i}/s{seed}"
                    if key in results["points"]:
                        continue
                    t1 = time.perf_counter()
                    if extra.get("refs") and not refs:
                        refs = [v1] + [train_in_process(xy["old_train"], seed=seed + 1000 * j, **common)
                                       for j in (1, 2)]
                    v2 = train_in_process(xy["train"], seed=seed + 100, method=method, hparams=hp, old=v1,
                                          warm=extra.get("warm", False),
                                          schedule=extra.get("schedule", "cosine"),
                                          refs=refs[:extra.get("refs", 0)],
                                          **{**common, "epochs": common["epochs"] * extra.get("epochs_factor", 1)})
                    results["points"][key] = {"setting": _short({**hp, **extra}), "seconds": time.perf_counter() - t1,
                                              "val": _flip_stats(v2, v1, xy["val"]),
                                              "test": _flip_stats(v2, v1, xy["test"])}
                    if label in FRONT_INTERPOLATE:
                        for a in FRONT_ALPHAS:
                            blend = copy.deepcopy(v2)
                            blend.load_state_dict(interpolate_state(v1.state_dict(), v2.state_dict(), a,
                                                                    list(range(info.num_classes)),
                                                                    list(range(info.num_classes))))
                            results["points"][f"{ds}/{label}+interp/{i}-a{a}/s{seed}"] = {
                                "setting": f"{_short(hp) if hp else label},a={a}",
                                "val": _flip_stats(blend.eval(), v1, xy["val"]),
                                "test": _flip_stats(blend.eval(), v1, xy["test"])}
                    save()
            print(f"  {ds} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)
    write_fronts(results, args)


def _front_rows(points, ds):
    """label -> setting -> seed -> point, for dataset ``ds``."""
    rows: dict = {}
    for key, p in points.items():
        d, label, setting, seed = key.split("/")
        if d == ds and not setting.endswith("-a0.0"):  # a = 0 is v1 itself (NFR 0), not an upgrade
            rows.setdefault(label, {}).setdefault(setting, {})[int(seed[1:])] = p
    return rows


def write_fronts(results, args) -> None:
    rows_all = {ds: _front_rows(results["points"], ds) for ds in FRONT_DATASETS}
    datasets = [ds for ds in FRONT_DATASETS if rows_all[ds].get("plain")]
    labels = [*FRONT_SEARCH, *(f"{lab}+interp" for lab in FRONT_INTERPOLATE)]
    lines = ["# Upgrade methods' fronts: NFR at plain's error + 0.5 points", "",
             f"Command: `nice -n 19 python benchmarks/upgrade_methods.py {results['config']['command']}` (in-process "
             "through `graceful_ray.train.step.run_epoch`, one thread). Regime: data growth, v1 cnn1d(16) on "
             f"old_train ({round(100 * FRONT_OLD_FRACTION)}% of train), v2 cnn1d(16) on all of train (seed + 100), "
             "the epochs of `FRONT_DATASETS` (mnist1d-6k 15, mnist1d-20k 8, digits 40, many30 15), batch 128, AdamW lr 3e-3, cosine unless 'const'. The search is "
             "`FRONT_SEARCH` in the script, fixed before this part's first run; every setting trained once "
             "per seed.", "",
             "Per dataset: each setting's test (error, NFR) averaged over the seeds; a method's front is the "
             "settings no other setting of it beats on both; **NFR @ target** is read off the front "
             "(linear between its points) at plain's mean test error + 0.5 points ('-': the front never "
             "gets that accurate). Interpolation rows leave out a = 0 (v1 itself: NFR 0 by definition). *per seed*: the same per seed against that seed's plain, mean ± sd "
             "(n = seeds where the front reaches the target). *val-chosen*: per seed the setting with the "
             "lowest validation NFR among those within plain's validation error + 0.5 points (the honest, "
             "no-test-tuning pick; * = no setting qualified on val in some seed, its most accurate used), "
             "reported on test. Percent.", ""]
    summary = {}
    for ds in datasets:
        rows = rows_all[ds]
        seeds = sorted(s for s in rows["plain"]["0"] if all(
            s in by_seed for label, lab in rows.items() if label in labels for by_seed in lab.values()))
        if not seeds:
            continue
        plain = [rows["plain"]["0"][s]["test"] for s in seeds]
        target = statistics.fmean(p["error"] for p in plain) + FRONT_MARGIN
        plain_nfr = statistics.fmean(p["nfr"] for p in plain)
        lines += [f"## {ds} (seeds {','.join(map(str, seeds))}; v1 test error "
                  f"{fmt([p['error_old'] for p in plain])}, plain {fmt([p['error'] for p in plain])}, "
                  f"NFR {fmt([p['nfr'] for p in plain])}; target error {100 * target:.2f})", "",
                  "| method | settings | NFR @ target | vs plain | per seed | val-chosen error | val-chosen NFR "
                  "| vs plain |", "|---|---|---|---|---|---|---|---|"]
        summary[ds] = {"target": target, "plain_nfr": plain_nfr, "seeds": seeds, "fronts": {}, "means": {}}
        for label in labels:
            settings = rows.get(label)
            if not settings:
                continue
            means = {st: (statistics.fmean(by[s]["test"]["error"] for s in seeds),
                          statistics.fmean(by[s]["test"]["nfr"] for s in seeds)) for st, by in settings.items()}
            front = pareto_front(list(means.values()))
            at = nfr_at(front, target)
            per_seed = []
            for s in seeds:
                f = pareto_front([(by[s]["test"]["error"], by[s]["test"]["nfr"]) for by in settings.values()])
                v = nfr_at(f, rows["plain"]["0"][s]["test"]["error"] + FRONT_MARGIN)
                if v is not None:
                    per_seed.append(v)
            chosen, starred = [], False
            for s in seeds:
                base = rows["plain"]["0"][s]["val"]["error"] + FRONT_MARGIN
                ok = [by[s] for by in settings.values() if by[s]["val"]["error"] <= base]
                if ok:
                    chosen.append(min(ok, key=lambda p: p["val"]["nfr"])["test"])
                else:
                    starred = True
                    chosen.append(min((by[s] for by in settings.values()), key=lambda p: p["val"]["error"])["test"])
            ch_nfr = statistics.fmean(c["nfr"] for c in chosen)
            summary[ds]["fronts"][label] = front
            summary[ds]["means"][label] = list(means.values())
            summary[ds].setdefault("at", {})[label] = at
            lines.append(
                f"| {label} | {len(settings)} | {'-' if at is None else f'{100 * at:.2f}'} | "
                f"{'-' if at is None else f'{100 * (at / plain_nfr - 1):+.0f}%'} | "
                f"{fmt(per_seed) if per_seed else '-'} (n={len(per_seed)}) | "
                f"{fmt([c['error'] for c in chosen])}{'*' if starred else ''} | {fmt([c['nfr'] for c in chosen])} | "
                f"{100 * (ch_nfr / plain_nfr - 1):+.0f}% |")
        for label in FRONT_CONTROLS:
            ctl = [by[s]["test"] for by in rows.get(label, {}).values() for s in seeds if s in by]
            if ctl:
                lines.append(f"| *control: {label}* | - | - | - | - | {fmt([c['error'] for c in ctl])} | "
                             f"{fmt([c['nfr'] for c in ctl])} (n={len(ctl)}) | "
                             f"{100 * (statistics.fmean(c['nfr'] for c in ctl) / plain_nfr - 1):+.0f}% |")
        best = min(((v, k) for k, v in summary[ds]["at"].items() if v is not None and k != "plain"), default=None)
        if best:
            lines += ["", f"Best at the target: **{best[1]}**, NFR {100 * best[0]:.2f}% against plain's "
                      f"{100 * plain_nfr:.2f}% ({100 * (best[0] / plain_nfr - 1):+.0f}%; issue target -40%: "
                      f"{'met' if best[0] <= 0.6 * plain_nfr else 'missed'})."]
        lines.append("")
    plot = args.out + ".png"
    _plot_fronts(summary, plot)
    lines += [f"Fronts: `{os.path.basename(plot)}` (per dataset: every method's settings, averaged over the seeds, "
              "and its front; the dotted line is the target error; zoomed to the region around it).", ""]
    write_with_reading(args.out + ".md", lines)


def _plot_fronts(summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not summary:
        return
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.5), squeeze=False)
    for ax, (ds, s) in zip(axes[0], summary.items()):
        for i, (label, front) in enumerate(s["fronts"].items()):
            color, style = plt.cm.tab10(i % 10), ("-", "--")[i // 10 % 2]
            pts = s["means"][label]
            ax.scatter([100 * e for e, _ in pts], [100 * n for _, n in pts], s=8, color=color, alpha=0.35)
            ax.plot([100 * e for e, _ in front], [100 * n for _, n in front], style, marker="*" if label == "plain"
                    else "o", ms=9 if label == "plain" else 3, color=color, label=label)
        ax.axvline(100 * s["target"], ls=":", color="k", lw=0.8)
        # the region that matters: around the target accuracy, up to well above plain's NFR
        lo = min(e for f in s["fronts"].values() for e, _ in f)
        ax.set_xlim(100 * lo - 1, 100 * s["target"] * 1.6 + 2)
        ax.set_ylim(0, 100 * s["plain_nfr"] * 2.5)
        ax.set_title(f"{ds} (seeds {','.join(map(str, s['seeds']))})")
        ax.set_xlabel("test error (%)")
        ax.set_ylabel("NFR (%)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
