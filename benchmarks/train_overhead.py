"""What the training machinery costs, as ratios measured in one run.

1. Cached old outputs: an ``fd`` epoch against a ``plain`` epoch (target <= 1.15x),
   and beside it the online teacher (augmented inputs, old model run per batch)
   against ``plain`` on the same augmented inputs.
2. Ray Train overhead: wall time per epoch under Ray Train (one worker; includes
   the per-epoch validation, checkpoint and report) against a plain PyTorch loop in
   this process doing the same steps and the same validation, same data, threads
   and batch size.

Usage:  python benchmarks/train_overhead.py --samples 20000 --epochs 6
Results: benchmarks/results/train_overhead.md
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import numpy as np
import torch


def plain_pytorch_epochs(data, epochs, batch_size, lr, threads, model_kwargs, seed=0):
    """The loop a user would write by hand: same model, optimizer, data and validation."""
    from graceful_ray.data import read_info, read_split
    from graceful_ray.methods import UpgradeContext, build_method
    from graceful_ray.methods import MethodBatch
    from graceful_ray.models import ModelSpec, build_model
    from graceful_ray.train.batches import inputs_from_arrow

    torch.set_num_threads(threads)
    info = read_info(data)
    tr, va = read_split(data, "train"), read_split(data, "val")
    x = torch.from_numpy(inputs_from_arrow(tr, info.feature_shape))
    y = torch.from_numpy(tr.column("label").to_numpy())
    xv = torch.from_numpy(inputs_from_arrow(va, info.feature_shape))
    yv = torch.from_numpy(va.column("label").to_numpy())
    torch.manual_seed(seed)
    model = build_model(ModelSpec("cnn1d", tuple(info.feature_shape), 10, model_kwargs))
    method = build_method("plain")
    method.setup(UpgradeContext(num_classes=10, new_embedding_dim=model.embedding_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = -(-len(y) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    walls = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(y))
        for step in range(steps):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            emb, logits = model.forward_features(x[idx])
            out = method.loss(MethodBatch(y=y[idx], new_embedding=emb, new_logits=logits))
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(1) == yv).float().mean())
        walls.append(time.perf_counter() - t0)
    return walls, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default="/tmp/graceful-ray-bench/overhead")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_overhead.md"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from graceful_ray.data import dataset_exists, make_mnist1d
    from graceful_ray.raycluster import ensure_ray
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import run_upgrade

    ensure_ray(num_cpus=4)
    ray.data.DataContext.get_current().enable_progress_bars = False
    data = os.path.join(args.root, f"mnist1d-{args.samples}")
    if not dataset_exists(data):
        make_mnist1d(data, samples=args.samples, seed=7, scenario="data_growth", old_fraction=0.5)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = dict(data=data, registry=os.path.join(args.root, "registry"), storage=os.path.join(args.root, "runs"),
                  epochs=args.epochs, batch_size=128, lr=3e-3, model="cnn1d", model_kwargs={"channels": 32},
                  cpus_per_worker=float(args.threads))
    v1 = run_upgrade(UpgradeConfig(**common, train_split="old_train", run_name=f"ovh-v1-{stamp}")).model_ref

    def run(label, **kw):
        r = run_upgrade(UpgradeConfig(**common, run_name=f"ovh-{label}-{stamp}", publish=False, **kw))
        hist = r.history[1:]  # epoch 1 includes warm-up
        train_s = statistics.median(h["epoch_time_s"] for h in hist)
        starts = [h["epoch_start_unix"] for h in r.history]
        walls = list(np.diff(starts))
        return {"train_s": train_s, "wall_s": statistics.median(walls[1:] or walls), "acc": r.metrics["val_accuracy"]}

    aug = dict(augment_noise=0.05, augment_shift=1)
    res = {
        "plain": run("plain", old=v1, method="plain"),
        "fd (cached)": run("fd", old=v1, method="fd"),
        "plain, augmented": run("plain-aug", old=v1, method="plain", **aug),
        "fd, augmented (online teacher)": run("fd-aug", old=v1, method="fd", **aug),
    }
    walls, acc = plain_pytorch_epochs(data, args.epochs, 128, 3e-3, args.threads, {"channels": 32})
    torch_wall = statistics.median(walls[1:])

    base = res["plain"]["train_s"]
    lines = ["# Training overhead", "", f"Command: `python benchmarks/train_overhead.py --samples {args.samples} "
             f"--epochs {args.epochs} --threads {args.threads}` (one Ray Train worker with {args.threads} CPUs; "
             "medians over epochs 2..N; ratios from this one run)", "",
             "| run | train loop s/epoch | ratio to plain | wall s/epoch (incl. val, checkpoint, report) | val acc |",
             "|---|---|---|---|---|"]
    for label, r in res.items():
        ref = res["plain, augmented"]["train_s"] if "augmented" in label else base
        lines.append(f"| {label} | {r['train_s']:.3f} | {r['train_s'] / ref:.2f}x | {r['wall_s']:.3f} | {r['acc']:.4f} |")
    lines += ["", "Ray Train against a plain PyTorch loop (same data, model, optimizer, batch size, threads, "
              "per-epoch validation):", "",
              "| loop | wall s/epoch | ratio |", "|---|---|---|",
              f"| plain PyTorch, in-process | {torch_wall:.3f} | 1.00x |",
              f"| Ray Train (1 worker) | {res['plain']['wall_s']:.3f} | {res['plain']['wall_s'] / torch_wall:.2f}x |", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
