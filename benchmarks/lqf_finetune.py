"""LQF vs standard fine-tuning on MNIST-1D, with little and with more target data.

Setup (data-growth upgrade, classes match):

* Data: ``make_mnist1d(samples=12000, scenario="data_growth", old_fraction=0.3)``.
  The *source* task is the ``old_train`` split (30% of train); the *target*
  set is the rest of ``train`` (rows not in ``old_train``), of which we keep
  1%, 10% or 100% (one fixed random subset per fraction). Accuracy and flips
  are measured on ``test``.
* Two source models, pretrained once on ``old_train`` with cross-entropy and
  AdamW: a ReLU cnn1d (for standard fine-tuning, the usual recipe) and a
  leaky-ReLU cnn1d (for LQF, which needs non-zero Jacobians).
* Fine-tuning, the same number of steps for every method and fraction:
  - ``ft``: standard fine-tuning of the ReLU network, cross-entropy, AdamW;
  - ``lqf-sgd``: LQF (linearized, squared loss) with SGD + momentum;
  - ``lqf-kfac``: LQF with K-FAC preconditioning;
  - ``ft-leaky``: standard fine-tuning of the leaky network (a control: is a
    difference due to the activation or to LQF?);
  - ``ls-head`` (diagnostic, ``--methods ...,ls-head``): the leaky network's
    frozen backbone with a closed-form least-squares head: how far the
    squared loss alone gets on the pretrained features.
  The methods are the package's own objects (``build_method("lqf", ...)``
  with its ``wrap_model``/``make_optimizer`` hooks, ``build_method("plain")``);
  the loop is a plain in-process PyTorch loop (Ray Train start-up would
  dominate at this size; tests/test_lqf.py runs ``lqf`` through
  ``run_upgrade`` on Ray Train).
* Seeds change the training run only (batch order, K-FAC's Monte-Carlo
  vectors), not the target subset: the spread over seeds is
  training-to-training variance. ``churn`` is the mean pairwise fraction of
  test predictions on which two seeds' models disagree.

Run: ``python benchmarks/lqf_finetune.py`` (writes benchmarks/results/lqf.json
and lqf.md). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from graceful_ray.methods import UpgradeContext, build_method
from graceful_ray.train.step import train_step
from graceful_ray.methods.lqf import load_pretrained
from graceful_ray.models import ModelSpec, build_model

HERE = os.path.dirname(os.path.abspath(__file__))


SCENARIOS = {
    # source: 30% of train, all classes; target: the other 70% of train
    "data_growth": {"old_fraction": 0.3},
    # source: classes 0-4; target: all of train, all 10 classes (new head rows for 5-9)
    "class_incremental": {"old_classes": [0, 1, 2, 3, 4]},
}


def load_data(root: str, samples: int, scenario: str):
    from graceful_ray.data import make_mnist1d, read_split
    from graceful_ray.data import load_split

    if not os.path.exists(os.path.join(root, "dataset.json")):
        make_mnist1d(root, samples=samples, seed=0, scenario=scenario, **SCENARIOS[scenario])
    out = {}
    for split in ("old_train", "train", "val", "test"):
        x, y, _ = load_split(root, split)
        out[split] = (torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(np.array(y)).long())
    x, y = out["train"]
    if scenario == "data_growth":  # the rows the source did not see
        old_ids = set(read_split(root, "old_train", columns=["id"]).column("id").to_numpy().tolist())
        train_ids = read_split(root, "train", columns=["id"]).column("id").to_numpy()
        mask = torch.from_numpy(np.array([i not in old_ids for i in train_ids]))
        out["target"] = (x[mask], y[mask])
    else:
        out["target"] = (x, y)
    out["source_classes"] = sorted(int(c) for c in out["old_train"][1].unique())
    return out


def spec(activation: str, channels: int, num_classes: int = 10) -> ModelSpec:
    return ModelSpec("cnn1d", (40,), num_classes, {"channels": channels, "activation": activation})


def pretrain(x, y, activation: str, channels: int, epochs: int, num_classes: int, seed: int = 0):
    """A source model whose head covers the source classes (positions = class ids 0..k-1)."""
    torch.manual_seed(seed)
    model = build_model(spec(activation, channels, num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 127) // 128))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model, x) -> torch.Tensor:
    model.eval()
    return torch.cat([model.forward_features(x[i:i + 2048])[1].argmax(1) for i in range(0, len(x), 2048)])


def finetune(kind: str, source, x, y, *, steps: int, batch: int, seed: int, hp: dict) -> torch.nn.Module:
    """One fine-tuning run; returns the trained module (network or LinearizedModel)."""
    torch.manual_seed(seed)
    net = build_model(spec(source["activation"], source["channels"]))
    ctx = UpgradeContext(num_classes=10, new_embedding_dim=net.embedding_dim,
                         old_classes=list(source["classes"]))
    load_pretrained(net, source["model"].state_dict(), ctx)  # new classes keep a fresh head row
    if kind == "ls-head":
        return ls_head(net.eval(), x, y, hp.get("ridge", 1e-2))
    if kind.startswith("lqf"):
        method = build_method("lqf", lqf_kfac=(kind == "lqf-kfac"), lqf_init="model",
                              lqf_target_scale=hp["target_scale"], lqf_damping=hp.get("damping", 1e-2),
                              lqf_update_every=hp.get("update_every", 10), lqf_momentum=hp.get("momentum", 0.9),
                              lqf_layers=hp.get("layers", "all"))
        method.setup(ctx)
        model = method.wrap_model(net)
        opt = method.make_optimizer(model, lr=hp["lr"], weight_decay=hp.get("wd", 0.0))
    else:
        method = build_method("plain")
        method.setup(UpgradeContext(num_classes=10, new_embedding_dim=net.embedding_dim))
        model = net
        opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp.get("wd", 1e-4))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    b = min(batch, len(x))
    perm, pos = torch.randperm(len(x), generator=g), 0
    model.train()
    for _ in range(steps):
        if pos + b > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos:pos + b]
        pos += b
        train_step(x[idx], y[idx], (None, None, None), forward=model.forward_features, method=method,
                   optimizer=opt, scheduler=sched)
    return model.eval()


@torch.no_grad()
def ls_head(net, x, y, ridge: float):
    """Diagnostic: the frozen backbone with a least-squares head (closed-form ridge
    regression of one-hot targets on the embeddings): what the squared loss can do
    with the pretrained features alone, without LQF's linearized backbone."""
    z = torch.cat([net.embed(x).double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    t = F.one_hot(y, 10).double()
    w = torch.linalg.solve(z.T @ z + ridge * len(x) * torch.eye(z.shape[1], dtype=torch.float64), z.T @ t)
    net.head.weight.copy_(w[:-1].T.float())
    net.head.bias.copy_(w[-1].float())
    return net


# Chosen on the validation split of the data-growth scenario at 10% (a few runs
# each; see the note in results/lqf.md), then fixed for every fraction and scenario.
HP = {
    "ft": {"lr": 1e-3, "wd": 1e-4},
    "ft-leaky": {"lr": 1e-3, "wd": 1e-4},
    "ls-head": {"ridge": 1e-2},
    "lqf-sgd": {"lr": 1e-3, "wd": 1e-4, "target_scale": 1.0, "momentum": 0.9},
    "lqf-kfac": {"lr": 0.05, "wd": 1e-4, "target_scale": 1.0, "damping": 1e-2, "update_every": 10,
                 "momentum": 0.9},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/lqf-bench", help="where datasets and source models are cached")
    ap.add_argument("--scenarios", default="data_growth,class_incremental")
    ap.add_argument("--samples", type=int, default=12000)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--methods", default="ft,lqf-sgd,lqf-kfac,ft-leaky")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--hp", default="", help="JSON overrides, e.g. '{\"lqf-kfac\": {\"lr\": 0.1}}'")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lqf"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.steps, args.seeds, args.pretrain_epochs = 4000, 30, 2, 3
    torch.set_num_threads(1)
    hp = {k: dict(v) for k, v in HP.items()}
    for k, v in (json.loads(args.hp) if args.hp else {}).items():
        hp.setdefault(k, {}).update(v)

    t0 = time.time()
    result = {"args": vars(args), "hp": hp, "torch": torch.__version__, "scenarios": {}}
    if os.path.exists(args.out + ".json"):  # keep the other scenarios of an earlier run
        with open(args.out + ".json") as f:
            result["scenarios"] = json.load(f).get("scenarios", {})
    for scenario in args.scenarios.split(","):
        new = run_scenario(scenario, args, hp, t0)
        old = result["scenarios"].get(scenario)
        if old:  # keep an earlier run's rows for the methods not re-run now
            ran = set(args.methods.split(","))
            kept = [r for r in old["rows"] if r["method"] not in ran]
            order = {f: i for i, f in enumerate(sorted({r["fraction"] for r in kept + new["rows"]}))}
            new["rows"] = sorted(kept + new["rows"], key=lambda r: order[r["fraction"]])
        result["scenarios"][scenario] = new
        write(result, args.out)
    result["seconds"] = time.time() - t0
    write(result, args.out)
    print(f"wrote {args.out}.json/.md in {time.time() - t0:.0f}s")


def run_scenario(scenario: str, args, hp: dict, t0: float) -> dict:
    root = os.path.join(args.data, f"mnist1d-{scenario}-{args.samples}")
    data = load_data(root, args.samples, scenario)
    xs, ys = data["old_train"]
    xe, ye = data[args.eval_split]
    classes = data["source_classes"]
    shared = torch.isin(ye, torch.tensor(classes))  # rows whose class the source knows
    sources = {}
    for act in ("relu", "leaky_relu"):
        cache = os.path.join(root, f"source-{act}-c{args.channels}-e{args.pretrain_epochs}.pt")
        if os.path.exists(cache):
            m = build_model(spec(act, args.channels, len(classes)))
            m.load_state_dict(torch.load(cache, weights_only=True))
            m.eval()
        else:
            m = pretrain(xs, ys, act, args.channels, args.pretrain_epochs, len(classes))
            torch.save(m.state_dict(), cache)
        pred = torch.tensor(classes)[predict(m, xe)]
        sources[act] = {"model": m, "activation": act, "channels": args.channels, "pred": pred,
                        "classes": classes, "acc": float((pred == ye).float().mean()),
                        "acc_shared": float((pred == ye)[shared].float().mean())}
        print(f"[{scenario}] source {act}: {args.eval_split} acc {sources[act]['acc']:.4f} "
              f"(on its classes {sources[act]['acc_shared']:.4f}) ({time.time() - t0:.0f}s)", flush=True)

    xt, yt = data["target"]
    g = torch.Generator().manual_seed(12345)
    order = torch.randperm(len(xt), generator=g)
    rows = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        n = max(10, int(round(frac * len(xt))))
        x, y = xt[order[:n]], yt[order[:n]]
        for kind in args.methods.split(","):
            src = sources["relu" if kind == "ft" else "leaky_relu"]
            preds, accs, acc_sh, nfrs, secs = [], [], [], [], []
            for seed in range(args.seeds):
                ts = time.time()
                model = finetune(kind, src, x, y, steps=args.steps, batch=args.batch, seed=seed, hp=hp[kind])
                secs.append(time.time() - ts)
                p = predict(model, xe)
                ok, old_ok = p == ye, src["pred"] == ye
                preds.append(p)
                accs.append(float(ok.float().mean()))
                acc_sh.append(float(ok[shared].float().mean()))
                nfrs.append(float((old_ok & ~ok)[shared].float().mean()))  # where classes match
            churn = [float((a != b).float().mean()) for a, b in itertools.combinations(preds, 2)]
            sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            row = {"fraction": frac, "n_target": n, "method": kind, "source_acc": src["acc"],
                   "source_acc_shared": src["acc_shared"],
                   "acc_mean": float(np.mean(accs)), "acc_std": sd(accs),
                   "acc_shared_mean": float(np.mean(acc_sh)),
                   "nfr_mean": float(np.mean(nfrs)), "nfr_std": sd(nfrs),
                   "churn": float(np.mean(churn)) if churn else 0.0,
                   "accs": accs, "nfrs": nfrs, "sec_per_run": float(np.mean(secs))}
            rows.append(row)
            print(f"[{scenario}] {frac:>5} n={n:<5} {kind:<9} acc {row['acc_mean']:.4f}±{row['acc_std']:.4f} "
                  f"nfr {row['nfr_mean']:.4f}±{row['nfr_std']:.4f} churn {row['churn']:.4f} "
                  f"({row['sec_per_run']:.0f}s/run, {time.time() - t0:.0f}s)", flush=True)
    return {"sources": {k: {"acc": v["acc"], "acc_shared": v["acc_shared"]} for k, v in sources.items()},
            "source_classes": classes, "eval_rows": int(len(ye)), "eval_rows_shared": int(shared.sum()),
            "rows": rows}


def write(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = []
    for scenario, res in result["scenarios"].items():
        src = res["sources"]
        lines += [f"### {scenario}", "",
                  f"Source models ({res['eval_rows']} {result['args']['eval_split']} rows; "
                  f"classes {res['source_classes']}): ReLU acc {src['relu']['acc']:.4f}, "
                  f"leaky-ReLU acc {src['leaky_relu']['acc']:.4f}. NFR is over the "
                  f"{res['eval_rows_shared']} rows of the source's classes.", "",
                  "| target | n | method | acc (mean ± sd) | acc, source classes | NFR vs source (mean ± sd) "
                  "| churn between seeds | s/run |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['fraction']:.0%} | {r['n_target']} | {r['method']} | "
                         f"{r['acc_mean']:.4f} ± {r['acc_std']:.4f} | {r['acc_shared_mean']:.4f} | "
                         f"{r['nfr_mean']:.4f} ± {r['nfr_std']:.4f} | {r['churn']:.4f} | {r['sec_per_run']:.0f} |")
        lines.append("")
    with open(out + ".table.md", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
