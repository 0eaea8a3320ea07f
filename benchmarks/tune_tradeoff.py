"""Evidence for the trade-off search: NFR falls as distillation grows, accuracy pays at the extreme.

Everything runs through the product commands (``graceful-ray data make``,
``graceful-ray train`` for v1, ``graceful-ray tune``), on MNIST-1D generated
locally:

1. MNIST-1D, data-growth scenario: v1 sees ``old_train`` (30% of train);
2. v1 = cnn1d trained plainly on ``old_train``;
3. ``graceful-ray tune --method fd`` over fd_lambda (log 0.01..10), fd_beta
   (0..10) and lr, NSGA-II on (accuracy up, NFR down), flip budget B.

The report adds what the search itself does not need but a reader does: how
NFR and accuracy move with fd_lambda (Spearman rank correlation over complete
trials, and the trials grouped by decade of fd_lambda), and what the
selection rule would pick at several budgets.

Usage:
    python benchmarks/tune_tradeoff.py --samples 20000 --epochs 8 --trials 16
    # PCT's regime (v1 on 90% of train, close to v2), distillation on standardized logits:
    python benchmarks/tune_tradeoff.py --samples 20000 --epochs 8 --v1-epochs 15 --trials 16 \
        --old-fraction 0.9 --hp fd_kind=lm-std --flip-budget 0.015 --root /tmp/graceful-ray-bench/tune-retrain \
        --out benchmarks/results/tune_tradeoff_retrain
Results: benchmarks/results/tune_tradeoff.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    if len(xs) < 3:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def start_ray(num_cpus: int = 4) -> None:
    """A local Ray, retried: on a loaded shared machine the raylet can miss Ray's 30 s start window."""
    import ray

    for attempt in range(5):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a start timeout
            print(f"Ray did not start ({e}); retrying", flush=True)
            ray.shutdown()
            time.sleep(15 * (attempt + 1))
    raise SystemExit("Ray would not start")


def run(cmd: list[str], log: list[str]) -> int:
    from graceful_ray.cli import main as cli

    line = "graceful-ray " + " ".join(cmd)
    print(f"$ {line}", flush=True)
    t = time.time()
    rc = cli(cmd)
    log.append(f"{line}    # exit {rc}, {time.time() - t:.0f} s")
    return rc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--v1-epochs", type=int, default=30, help="a converged v1: its accuracy near v2's")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--max-concurrent", type=int, default=3)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--flip-budget", type=float, default=0.03)
    p.add_argument("--old-fraction", type=float, default=0.3, help="share of train v1 sees (old_train)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="v1's and every trial's learning-rate schedule")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed method hyperparameter for every trial, e.g. fd_kind=lm-std")
    p.add_argument("--space", action="append", default=[], metavar="NAME=RANGE",
                   help="search range override, as `graceful-ray tune --space`")
    p.add_argument("--root", default="/tmp/graceful-ray-bench/tune")
    p.add_argument("--data", help="an existing MNIST-1D dataset (default <root>/data, generated)")
    p.add_argument("--run-name", default="tradeoff-fd")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "tune_tradeoff"))
    args = p.parse_args()

    from graceful_ray.tune.trials import TrialRecord
    from graceful_ray.tune.selection import most_accurate_under_budget

    data, registry, runs, tune = (os.path.join(args.root, d) for d in ("data", "registry", "runs", "tune"))
    data = args.data or data
    commands: list[str] = []
    t0 = time.time()
    start_ray()
    if not os.path.exists(data):
        run(["data", "make", "mnist1d", "--out", data, "--samples", str(args.samples), "--seed", "0",
             "--old-fraction", str(args.old_fraction)], commands)
    from graceful_ray.data import read_info
    from graceful_ray.registry import Registry

    old_fraction = read_info(data).scenario.get("old_fraction")  # what the data has, whoever made it
    if "mnist1d" not in Registry(registry).list_models():
        run(["train", "--data", data, "--train-split", "old_train", "--name", "mnist1d", "--model", "cnn1d",
             "--model-arg", f"channels={args.channels}", "--epochs", str(args.v1_epochs),
             "--cpus-per-worker", "1", "--registry", registry, "--storage", runs, "--run-name", "v1",
             "--alias", "production", "--lr-schedule", args.lr_schedule], commands)
    run_dir = os.path.join(tune, args.run_name)
    tune_cmd = ["tune", "--data", data, "--old", "mnist1d@v1", "--method", "fd", "--name", "mnist1d",
                "--model", "cnn1d", "--model-arg", f"channels={args.channels}", "--epochs", str(args.epochs),
                "--trials", str(args.trials), "--max-concurrent", str(args.max_concurrent),
                "--cpus-per-worker", str(args.cpus_per_worker), "--flip-budget", str(args.flip_budget),
                "--registry", registry, "--storage", tune]
    tune_cmd += ["--lr-schedule", args.lr_schedule]
    for hp in args.hp:
        tune_cmd += ["--hp", hp]
    for space in args.space:
        tune_cmd += ["--space", space]
    if os.path.exists(os.path.join(run_dir, "search.json")):
        tune_cmd += ["--resume", args.run_name]
    else:
        tune_cmd += ["--run-name", args.run_name]
    rc = run(tune_cmd, commands)
    wall = time.time() - t0

    summary = json.load(open(os.path.join(run_dir, "pareto.json")))
    records = [TrialRecord.from_dict(t) for t in summary["trials"]]
    complete = [r for r in records if r.complete]
    lam = [r.params["fd_lambda"] for r in complete]
    rho_nfr = spearman(lam, [r.value("val_nfr") for r in complete])
    rho_acc = spearman(lam, [r.value("val_accuracy") for r in complete])
    decades = {}
    for r in complete:
        d = math.floor(math.log10(r.params["fd_lambda"]))
        decades.setdefault(d, []).append(r)
    front = [r for r in records if r.trial_id in set(summary["front"])]

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    shutil.copyfile(os.path.join(run_dir, "pareto.png"), args.out + ".png")
    old_acc = summary["reference"]["old_accuracy"]
    lines = [
        "# Trade-off search: focal distillation on MNIST-1D (Ray Tune + Optuna NSGA-II)", "",
        f"{len(records)} trials ({summary['counts']}), {args.epochs} epochs each, cnn1d(channels={args.channels}), "
        f"{args.samples} MNIST-1D samples, v1 trained on old_train ({round(100 * old_fraction)}% of train) "
        f"for {args.v1_epochs} epochs, learning-rate schedule {args.lr_schedule}. "
        f"Fixed hyperparameters: {', '.join(args.hp) or 'none'}. "
        f"Validation rows: {int(complete[0].value('val_rows')) if complete else 'n/a'}. "
        f"Wall time {wall / 60:.1f} min on a shared 2-core machine (Ray with 4 logical CPUs, "
        f"{args.max_concurrent} trials at a time, {args.cpus_per_worker} CPU per Train worker).", "",
        "Commands:", "", "```", *commands, "```", "",
        f"Old model (v1) validation accuracy: {old_acc:.4f}. Plot: `benchmarks/results/{os.path.basename(args.out)}.png` "
        f"(run copy: `{run_dir}/pareto.png`).", "",
        "## Pareto front (accuracy up, NFR down)", "",
        "| trial | fd_lambda | fd_beta | lr | accuracy | NFR | NFR upper 95% | PFR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(front, key=lambda r: r.params["fd_lambda"]):
        lines.append(f"| {r.trial_id} | {r.params['fd_lambda']:.3g} | {r.params['fd_beta']:.2f} | "
                     f"{r.params['lr']:.2e} | {r.value('val_accuracy'):.4f} | {r.value('val_nfr'):.4f} | "
                     f"{r.value('nfr_upper'):.4f} | {r.value('val_pfr'):.4f} |")
    lines += ["", "## All trials by fd_lambda", "",
              "| trial | status | front | fd_lambda | fd_beta | lr | accuracy | NFR | NFR upper 95% |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r.params.get("fd_lambda", 0)):
        lines.append(f"| {r.trial_id} | {r.status} | {'yes' if r in front else ''} | "
                     f"{r.params.get('fd_lambda', float('nan')):.3g} | {r.params.get('fd_beta', float('nan')):.2f} | "
                     f"{r.params.get('lr', float('nan')):.2e} | {r.value('val_accuracy'):.4f} | "
                     f"{r.value('val_nfr'):.4f} | {r.value('nfr_upper'):.4f} |")
    lines += ["", "## NFR and accuracy against the distillation weight", "",
              f"Spearman rank correlation over complete trials: fd_lambda vs NFR {rho_nfr:+.2f}, "
              f"fd_lambda vs accuracy {rho_acc:+.2f}.", "",
              "| fd_lambda decade | trials | mean accuracy | mean NFR | best accuracy | lowest NFR |",
              "|---|---|---|---|---|---|"]
    for d in sorted(decades):
        rs = decades[d]
        accs = [r.value("val_accuracy") for r in rs]
        nfrs = [r.value("val_nfr") for r in rs]
        lines.append(f"| [{10.0 ** d:g}, {10.0 ** (d + 1):g}) | {len(rs)} | {sum(accs) / len(accs):.4f} | "
                     f"{sum(nfrs) / len(nfrs):.4f} | {max(accs):.4f} | {min(nfrs):.4f} |")
    lines += ["", "## Selection under a flip budget (most accurate with NFR upper 95% bound <= B)", "",
              "| B | selected | fd_lambda | accuracy | NFR [95% CI] |", "|---|---|---|---|---|"]
    for b in (0.01, 0.015, 0.02, 0.03, 0.05):
        sel = most_accurate_under_budget(records, b)
        if sel is None:
            lines.append(f"| {b:g} | none: nothing would be published | | | |")
        else:
            lines.append(f"| {b:g} | {sel.record.trial_id} | {sel.record.params['fd_lambda']:.3g} | "
                         f"{sel.record.value('val_accuracy'):.4f} | {sel.nfr} |")
    lines += ["", f"The command's own outcome (budget {args.flip_budget:g}): {summary['message']}", ""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(args.out + ".json", "w") as f:
        json.dump({"commands": commands, "wall_s": wall, "spearman_lambda_nfr": rho_nfr,
                   "spearman_lambda_accuracy": rho_acc, "summary": summary}, f, indent=1)
    print("\n".join(lines))
    sys.exit(0 if rc in (0, 3) else rc)


if __name__ == "__main__":
    main()
