"""`graceful-ray demo`: a whole model upgrade on a built-in dataset, on a local Ray.

The first thing a new user runs. Each step says what it does and why; a second
run reuses what the first one built (the dataset, and every model whose run
already finished and was published), so it is quick to re-run after a change.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

MODEL_NAME = "mnist1d-classifier"


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def _published_for_run(registry, name: str, run_name: str):
    """The version a finished run already published, so a re-run reuses it."""
    try:
        versions = registry.versions(name)
    except Exception:  # no such model yet
        return None
    for manifest in versions:
        if manifest.extra.get("run_name") == run_name:
            return manifest
    return None


def _train(registry, cfg, label: str):
    from graceful_ray.train.trainer import run_upgrade

    done = _published_for_run(registry, cfg.name, cfg.run_name)
    if done is not None:
        print(f"    {label}: reusing {done.name}@v{done.version} from run {cfg.run_name}")
        return f"{done.name}@v{done.version}", done.metrics
    t0 = time.perf_counter()
    result = run_upgrade(cfg)
    m = result.metrics
    print(f"    {label}: {result.model_ref} in {time.perf_counter() - t0:.0f}s, "
          f"val accuracy {m['val_accuracy']:.4f}"
          + (f", val NFR {m['val_nfr']:.4f}" if "val_nfr" in m else ""))
    return result.model_ref, m


def run_demo(args: argparse.Namespace) -> int:
    from graceful_ray.data import make_mnist1d, read_info
    from graceful_ray.evaluate import evaluate_upgrade
    from graceful_ray.raycluster import ensure_ray
    from graceful_ray.registry import Registry
    from graceful_ray.train.config import UpgradeConfig

    started = time.perf_counter()
    root = os.path.abspath(args.root)
    data = os.path.join(root, "data", f"mnist1d-{args.samples}-s{args.seed}")
    registry_root = os.path.join(root, "registry")
    storage = os.path.join(root, "runs")
    os.makedirs(root, exist_ok=True)
    print(f"graceful-ray demo: everything goes under {root}")

    _step(1, f"MNIST-1D, {args.samples} samples, generated locally (v1 sees 30% of the training data)")
    if os.path.exists(os.path.join(data, "dataset.json")):
        info = read_info(data)
        print(f"    reusing {data} (checksum {info.checksum[:12]})")
    else:
        info = make_mnist1d(data, samples=args.samples, seed=args.seed, scenario="data_growth", old_fraction=0.3)
        print(f"    wrote {data}: " + ", ".join(f"{s} {i.rows}" for s, i in sorted(info.splits.items())))

    ensure_ray(args.address)
    registry = Registry(registry_root)
    common = dict(data=data, registry=registry_root, storage=storage, name=MODEL_NAME, epochs=args.epochs,
                  cpus_per_worker=1.0, workers=1, max_failures=1)

    _step(2, "train v1 (the model in production): a small 1-D CNN on the old training data")
    v1, _ = _train(registry, UpgradeConfig(**common, model="cnn1d", model_kwargs={"channels": 16},
                                           train_split="old_train", seed=args.seed, run_name="demo-v1"), "v1")
    registry.set_alias(MODEL_NAME, "production", v1)

    _step(3, "train v2 on all the data, a wider CNN: once plain, once with focal distillation + BCT")
    v2_common = dict(common, model="cnn1d", model_kwargs={"channels": 32}, old=v1, seed=args.seed + 1)
    v2_plain, _ = _train(registry, UpgradeConfig(**v2_common, method="plain", run_name="demo-v2-plain"), "v2 plain")
    v2_compat, _ = _train(registry, UpgradeConfig(**v2_common, method="bct+fd",
                                                  hparams={"fd_kind": "lm", "fd_alpha": 1, "fd_beta": 5},
                                                  run_name="demo-v2-bct-fd"), "v2 bct+fd")

    _step(4, "the upgrade report on the test split: flips and cross-model retrieval")
    reports = {}
    for label, ref in (("plain", v2_plain), ("bct+fd", v2_compat)):
        reports[label] = evaluate_upgrade(data, v1, ref, registry_root=registry_root, split="test",
                                          out_dir=os.path.join(root, "reports", label))
    print(side_by_side(reports))
    for label, r in reports.items():
        print(f"    {label}: {r['json']}, {r['png']}")
    registry.set_alias(MODEL_NAME, "candidate", v2_compat)

    print(f"\ndone in {time.perf_counter() - started:.0f}s. Registry: {registry_root} "
          f"(production -> {v1}, candidate -> {v2_compat}).")
    print("next: `graceful-ray evaluate --data ... --old ... --new ...` on your own models; see README.md.")
    return 0


def side_by_side(reports: dict[str, dict[str, Any]]) -> str:
    labels = list(reports)
    lines = [f"    {'':<22}" + "".join(f"{l:>16}" for l in labels)]

    def row(name: str, get) -> None:
        vals = []
        for label in labels:
            try:
                vals.append(get(reports[label]))
            except (KeyError, TypeError):
                vals.append("-")
        lines.append(f"    {name:<22}" + "".join(f"{v:>16}" for v in vals))

    def rate(key):
        return lambda r: f"{100 * r['flips']['metrics'][key]['value']:.2f}%"

    row("error rate old", rate("error_rate_old"))
    row("error rate new", rate("error_rate_new"))
    row("NFR", rate("nfr"))
    row("NFR 95% upper", lambda r: f"{100 * r['flips']['metrics']['nfr']['high']:.2f}%")
    row("PFR", rate("pfr"))
    row("M(new,old) top-1", lambda r: f"{r['retrieval']['m_new_old']['top1']:.4f}")
    row("M(old,old) top-1", lambda r: f"{r['retrieval']['m_old_old']['top1']:.4f}")
    row("compatible", lambda r: str(r["retrieval"]["compatible_top1"]))
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="a whole upgrade on MNIST-1D on a local Ray (the first thing to run)",
        description="Generate MNIST-1D, train and register v1, train v2 plain and compatible on Ray Train, "
                    "and print the flip and compatibility report side by side.")
    p.add_argument("--root", default=os.environ.get("GRACEFUL_RAY_ROOT", ".graceful-ray"),
                   help="where data, registry, runs and reports go")
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="Ray address (default: a local Ray)")
    p.set_defaults(func=run_demo)
