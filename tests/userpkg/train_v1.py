"""The team's own training script (plain PyTorch; it does not import graceful-ray).

Writes what a team arrives with: its data as a CSV table (``item_id``, the
string label ``category``, feature columns ``f_0 ... f_11`` and the team's fixed
``split``: train, val or test), the weights
of the model in production as a ``state_dict`` saved with ``torch.save``, and
the ids of the rows v1 was trained on (the first third; the rest arrived later),
one per line.

    python train_v1.py --out team/
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np
import torch
from torch import nn

from shopnet.model import build

CATEGORIES = ["boots", "heels", "sandals", "slippers", "sneakers"]
FEATURES = 12


def make_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.0, size=(len(CATEGORIES), FEATURES))
    y = rng.integers(0, len(CATEGORIES), size=n)
    x = centers[y] + rng.normal(scale=1.3, size=(n, FEATURES))
    return x.astype(np.float32), y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    x, y = make_rows(args.rows, args.seed)
    seen = slice(0, args.rows // 3)  # v1 saw the first third (training rows)
    later = np.random.default_rng(args.seed + 1).choice(["train", "val", "test"], p=[0.4, 0.3, 0.3],
                                                         size=args.rows - args.rows // 3)
    split = ["train"] * (args.rows // 3) + later.tolist()
    with open(os.path.join(args.out, "shop.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "category", *[f"f_{i}" for i in range(FEATURES)], "split"])
        for i, (row, label) in enumerate(zip(x, y)):
            w.writerow([1000 + i, CATEGORIES[label], *[f"{v:.5f}" for v in row], split[i]])

    torch.manual_seed(args.seed)
    model = build(in_features=FEATURES, num_classes=len(CATEGORIES), hidden=32, embedding_dim=16)
    xt, yt = torch.from_numpy(x[seen]), torch.from_numpy(y[seen])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        test = np.asarray(split) == "test"
        acc = (model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean()
    torch.save(model.state_dict(), os.path.join(args.out, "v1.pt"))
    with open(os.path.join(args.out, "v1_ids.txt"), "w") as f:
        f.writelines(f"{1000 + i}\n" for i in range(args.rows)[seen])
    print(f"wrote {args.out}/shop.csv ({args.rows} rows), {args.out}/v1.pt (test accuracy "
          f"{acc:.3f}) and {args.out}/v1_ids.txt")


if __name__ == "__main__":
    main()
