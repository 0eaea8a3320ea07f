"""Are the zoo models sound? MNIST-1D's paper: about 68% test accuracy for an MLP
and about 94% for a CNN. Plain PyTorch on one thread, so it runs anywhere.

Usage:   python benchmarks/zoo_sanity.py --samples 10000 --epochs 60
Results: benchmarks/results/zoo_sanity.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zoo_sanity.md"))
    args = p.parse_args()
    torch.set_num_threads(1)

    from graceful_ray.data import make_mnist1d, read_info, read_split
    from graceful_ray.models import ModelSpec, build_model, model_cost
    from graceful_ray.data.tensors import inputs_from_arrow

    root = os.path.join(tempfile.gettempdir(), f"zoo-sanity-{args.samples}")
    if not os.path.exists(os.path.join(root, "dataset.json")):
        make_mnist1d(root, samples=args.samples, seed=0, scenario="none")
    info = read_info(root)

    def load(split):
        t = read_split(root, split)
        return torch.from_numpy(inputs_from_arrow(t, info.feature_shape)), torch.from_numpy(t.column("label").to_numpy())

    (x, y), (xt, yt) = load("train"), load("test")
    rows = []
    for name, kwargs in (("mlp", {"width": 100, "depth": 2}), ("cnn1d", {"channels": 32})):
        torch.manual_seed(0)
        model = build_model(ModelSpec(name, tuple(info.feature_shape), info.num_classes, kwargs))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        steps = -(-len(y) // 128)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            perm = torch.randperm(len(y))
            for i in range(steps):
                idx = perm[i * 128:(i + 1) * 128]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        cost = model_cost(model)
        rows.append(f"| {name} {kwargs} | {acc:.4f} | {cost.parameters} | {cost.flops_per_sample} | "
                    f"{time.perf_counter() - t0:.0f} |")
    lines = ["# Zoo sanity on MNIST-1D", "",
             f"Command: `python benchmarks/zoo_sanity.py --samples {args.samples} --epochs {args.epochs}` "
             f"(train {len(y)}, test {len(yt)}; reference: MLP ~68%, CNN ~94%)", "",
             "| model | test accuracy | parameters | FLOPs/sample | train s |", "|---|---|---|---|---|", *rows]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
