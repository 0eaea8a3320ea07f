"""Evidence for the edge/cloud search: how small can a model be and still search the cloud gallery?

Through the product commands, on MNIST-1D (the trade-off benchmark's data):

1. the "cloud" model: a large cnn1d (channels 64, depth 3, embedding 64) trained on train;
2. ``graceful-ray tune --search edge --old cloud@v1 --method bct``: small cnn1d
   architectures (channels 4..32, depth 1..3, embedding pinned to the cloud's 64,
   so the last layer is a learned projection into the cloud space), each
   trained with BCT against the cloud model; objectives M(small, large) mAP up
   (queries embedded by the small model, gallery by the cloud model, validation
   split, leave-one-out) and FLOPs per sample down; NSGA-II.
3. The selection: the smallest model with M(small, large) >= M(large, large) - 0.02.

Usage:
    python benchmarks/tune_edge.py --epochs 8 --trials 12
Results: benchmarks/results/tune_edge.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_tradeoff import run, start_ray  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cloud-epochs", type=int, default=10)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--max-concurrent", type=int, default=3)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--root", default="/tmp/graceful-ray-bench/tune")
    p.add_argument("--run-name", default="edge-bct")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tune_edge"))
    args = p.parse_args()

    from graceful_ray.registry import Registry
    from graceful_ray.tune.trials import TrialRecord

    data, registry, runs, tune = (os.path.join(args.root, d) for d in ("data", "registry", "runs", "tune"))
    commands: list[str] = []
    t0 = time.time()
    start_ray()
    if not os.path.exists(data):
        run(["data", "make", "mnist1d", "--out", data, "--samples", str(args.samples), "--seed", "0"], commands)
    if "cloud" not in Registry(registry).list_models():
        run(["train", "--data", data, "--name", "cloud", "--model", "cnn1d", "--model-arg", "channels=64",
             "--model-arg", "depth=3", "--model-arg", "embedding_dim=64", "--epochs", str(args.cloud_epochs),
             "--cpus-per-worker", "1", "--registry", registry, "--storage", runs, "--run-name", "cloud-v1",
             "--alias", "production"], commands)
    run_dir = os.path.join(tune, args.run_name)
    cmd = ["tune", "--search", "edge", "--data", data, "--old", "cloud@v1", "--method", "bct", "--model", "cnn1d",
           "--name", "edge", "--epochs", str(args.epochs), "--trials", str(args.trials),
           "--max-concurrent", str(args.max_concurrent), "--cpus-per-worker", str(args.cpus_per_worker),
           "--map-tolerance", str(args.tolerance), "--registry", registry, "--storage", tune]
    cmd += ["--resume", args.run_name] if os.path.exists(os.path.join(run_dir, "search.json")) \
        else ["--run-name", args.run_name]
    rc = run(cmd, commands)
    wall = time.time() - t0

    summary = json.load(open(os.path.join(run_dir, "pareto.json")))
    records = [TrialRecord.from_dict(t) for t in summary["trials"]]
    ref = summary["reference"]
    front_ids = summary["front"]
    sel = summary["selection"]["trial_id"] if summary["selection"] else None
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    shutil.copyfile(os.path.join(run_dir, "pareto.png"), args.out + ".png")

    def row(r: TrialRecord) -> str:
        gap = ref["m_large_large"] - r.value("cross_map")
        return (f"| {r.trial_id} | {r.status} | {'yes' if r.trial_id in front_ids else ''}"
                f"{' (selected)' if r.trial_id == sel else ''} | {r.params.get('model.channels')} | "
                f"{r.params.get('model.depth')} | {r.value('flops_per_sample'):,.0f} | "
                f"{r.value('parameters'):,.0f} | {r.value('cross_map'):.4f} | {gap * 100:+.2f} | "
                f"{r.value('self_map'):.4f} | {r.value('val_accuracy'):.4f} |")

    header = ["| trial | status | front | channels | depth | FLOPs/sample | parameters | M(small, large) | "
              "gap to M(large, large), points | M(small, small) | accuracy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    front = sorted((r for r in records if r.trial_id in front_ids), key=lambda r: r.value("flops_per_sample"))
    lines = [
        "# Edge/cloud search: small models compatible with a large cloud model (BCT, MNIST-1D)", "",
        f"{len(records)} trials ({summary['counts']}), {args.epochs} epochs each, NSGA-II on "
        f"(M(small, large) mAP up, FLOPs per sample down). Validation split, leave-one-out retrieval. "
        f"Wall time {wall / 60:.1f} min on a shared 2-core machine.", "",
        "Commands:", "", "```", *commands, "```", "",
        f"Cloud model {ref['model']}: M(large, large) = {ref['m_large_large']:.4f}, "
        f"{ref['flops_per_sample']:,.0f} FLOPs/sample, {ref['parameters']:,.0f} parameters. "
        f"Plot: `benchmarks/results/tune_edge.png` (run copy: `{run_dir}/pareto.png`).", "",
        "## Pareto front (cheapest first)", "", *header, *[row(r) for r in front], "",
        f"## Smallest model within {args.tolerance * 100:g} points of M(large, large)", "",
        summary["message"], "",
        "## All trials", "", *header,
        *[row(r) for r in sorted(records, key=lambda r: (r.value("flops_per_sample"), r.trial_id))], "",
    ]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(args.out + ".json", "w") as f:
        json.dump({"commands": commands, "wall_s": wall, "summary": summary}, f, indent=1)
    print("\n".join(lines))
    sys.exit(0 if rc in (0, 3) else rc)


if __name__ == "__main__":
    main()
