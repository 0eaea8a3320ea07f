"""What the training machinery costs, as ratios measured in one run.

1. Cached old outputs: an ``fd`` epoch against a ``plain`` epoch (target <= 1.15x),
   and beside it the online teacher (augmented inputs, old model run per batch)
   against ``plain`` on the same augmented inputs.
2. Ray Train overhead: wall time per epoch under Ray Train (one worker; includes
   the per-epoch validation, checkpoint and report) against a plain PyTorch loop in
   this process doing the same steps and the same validation, same data, threads
   and batch size; with the Train controller polling at our interval
   (graceful_ray.train.trainer.CONTROLLER_POLL_S), at 0.5 s and at 2 s (Ray's
   default), rounds interleaved.
3. Reading the splits: a whole plain run's wall time (start-up, reads, epochs,
   publish) with small reads through Ray Data's V1 Parquet reader (ours,
   graceful_ray.data.reader) and through V2 (Ray 2.60's default).

Usage:  python benchmarks/train_overhead.py --samples 20000 --epochs 10
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
    from graceful_ray.train.step import train_step
    from graceful_ray.models import ModelSpec, build_model
    from graceful_ray.data.tensors import inputs_from_arrow

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
            train_step(x[idx], y[idx], (None, None, None), forward=model.forward_features, method=method,
                       optimizer=opt, scheduler=sched)
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(1) == yv).float().mean())
        walls.append(time.perf_counter() - t0)
    return walls, acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the Ray Train vs PyTorch comparison")
    p.add_argument("--root", default="/tmp/graceful-ray-bench/overhead")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_overhead.md"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from graceful_ray.data import dataset_exists, make_mnist1d
    from graceful_ray.raycluster import ensure_ray
    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.train.trainer import CONTROLLER_POLL_S, run_upgrade

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

    def run(label, env=None, **kw):
        """One run; ``env`` sets environment variables for this run only."""
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            t0 = time.perf_counter()
            r = run_upgrade(UpgradeConfig(**common, run_name=f"ovh-{label}-{stamp}", publish=False, **kw))
            run_s = time.perf_counter() - t0
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        hist = r.history[1:]  # epoch 1 includes warm-up
        train_s = statistics.median(h["epoch_time_s"] for h in hist)
        starts = [h["epoch_start_unix"] for h in r.history]
        walls = list(np.diff(starts))
        return {"train_s": train_s, "wall_s": statistics.median(walls[1:] or walls), "acc": r.metrics["val_accuracy"],
                "run_s": run_s}

    aug = dict(augment_noise=0.05, augment_shift=1)
    run("warmup", old=v1, method="plain")  # the first run after v1 paid for start-up left-overs: not measured
    kinds = {"plain": dict(method="plain"), "fd (cached)": dict(method="fd"),
             "plain, augmented": dict(method="plain", **aug),
             "fd, augmented (online teacher)": dict(method="fd", **aug)}
    rounds: dict[str, list[dict]] = {label: [] for label in kinds}
    for rnd in range(args.rounds):  # interleaved, so machine drift hits every kind alike
        for i, (label, kw) in enumerate(kinds.items()):
            rounds[label].append(run(f"kind{i}-r{rnd}", old=v1, **kw))
    res = {label: {k: statistics.median(r[k] for r in rs) for k in ("train_s", "wall_s", "acc")}
           for label, rs in rounds.items()}
    # Ray Train against plain PyTorch, rounds interleaved so machine drift hits every loop alike.
    polls = {"0.5": "0.5 s", "2": "2 s (Ray's default)"}
    polls[CONTROLLER_POLL_S] = f"{CONTROLLER_POLL_S} s (ours)"  # replaces its twin if ours is one of them
    loops: dict[str, list[dict]] = {label: [] for label in ["plain PyTorch, in-process", *polls.values()]}
    for rnd in range(args.rounds):
        walls, _ = plain_pytorch_epochs(data, args.epochs, 128, 3e-3, args.threads, {"channels": 32})
        loops["plain PyTorch, in-process"].append({"wall_s": statistics.median(walls[1:])})
        for poll, label in polls.items():
            loops[label].append(run(f"plain-poll{poll}-r{rnd}", env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll},
                                    old=v1, method="plain"))
    # back to back, so start-up conditions match
    reader_v1 = run("plain-v1", old=v1, method="plain")
    ctx = ray.data.DataContext.get_current()
    saved_v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, True  # V2, whatever the shell exported
    reader_v2 = run("plain-v2", env={"RAY_DATA_USE_DATASOURCE_V2": "1"}, old=v1, method="plain")
    ctx.use_datasource_v2 = saved_v2
    torch_wall = statistics.median(r["wall_s"] for r in loops["plain PyTorch, in-process"])

    base = res["plain"]["train_s"]
    lines = ["# Training overhead", "", f"Command: `python benchmarks/train_overhead.py --samples {args.samples} "
             f"--epochs {args.epochs} --threads {args.threads} --rounds {args.rounds}` (one Ray Train worker with {args.threads} CPUs; "
             f"medians over epochs 2..N, then over {args.rounds} interleaved rounds; ratios from this one run)", "",
             "| run | train loop s/epoch | ratio to plain | wall s/epoch (incl. val, checkpoint, report) | val acc |",
             "|---|---|---|---|---|"]
    for label, r in res.items():
        ref = res["plain, augmented"]["train_s"] if "augmented" in label else base
        lines.append(f"| {label} | {r['train_s']:.3f} | {r['train_s'] / ref:.2f}x | {r['wall_s']:.3f} | {r['acc']:.4f} |")
    lines += ["", "Ray Train against a plain PyTorch loop (same data, model, optimizer, batch size, threads, "
              "per-epoch validation):", "",
              f"Median over {args.rounds} interleaved rounds. Beyond the wall time, what Ray Train adds to the epoch "
              "itself: wall minus the training loop's own time (validation, checkpoint, report, and the wait "
              "for the controller's poll).", "",
              "| loop | wall s/epoch | ratio | wall - train loop, s/epoch |", "|---|---|---|---|",
              f"| plain PyTorch, in-process | {torch_wall:.3f} | 1.00x | |"]
    for label, rs in loops.items():
        if not label.startswith("plain PyTorch"):
            wall = statistics.median(r["wall_s"] for r in rs)
            extra = statistics.median(r["wall_s"] - r["train_s"] for r in rs)
            lines.append(f"| Ray Train (1 worker), controller poll {label} | {wall:.3f} | {wall / torch_wall:.2f}x | "
                         f"{extra:.3f} |")
    lines += ["",
              f"A whole plain run of {args.epochs} epochs (start-up, reading both splits, training, checkpoints):", "",
              "| Parquet reader for the splits | run wall s | ratio |", "|---|---|---|",
              f"| V1 for small reads (ours) | {reader_v1['run_s']:.1f} | 1.00x |",
              f"| V2 (Ray 2.60's default) | {reader_v2['run_s']:.1f} | {reader_v2['run_s'] / reader_v1['run_s']:.2f}x |",
              ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
