"""Benchmark: the NFR gate under continuous monitoring, Wilson vs the confidence sequence.

Simulates streams of labelled pairs whose negative flips are Bernoulli(p) and
checks the ``max_nfr`` gate every ``--every`` labels from ``--first`` to
``--last`` (an operator who keeps refreshing and cuts over the first time the
gate passes).

* False cutover: the true NFR equals the budget. The fixed-sample 95% Wilson
  upper bound (``wilson_interval``, the gate before this change) against the
  95% confidence sequence's upper end (``graceful_ray.metrics.sequential``,
  one-sided 2.5%, the same level as the Wilson upper end), both with many
  looks, and Wilson with one look at the end.
* The price: the true NFR is half the budget (and 3/4, 1/10 of it). Median labels until the sequence
  gate first passes, against the fixed-sample Wilson gate's own median: the
  smallest n at which one Wilson check at n passes with probability >= 1/2
  (exact binomial, no simulation); and the floor: Wald's SPRT told the true
  rate, which no anytime-valid test beats on average.

    python benchmarks/gate_sequential.py --runs 4000 --out benchmarks/results/gate_sequential.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import binom

from graceful_ray.metrics.intervals import wilson_interval
from graceful_ray.metrics.sequential import MIXTURE_KAPPA, MIXTURE_RHO, rejects_above


def streams(rng: np.random.Generator, p: float, runs: int, looks: np.ndarray) -> np.ndarray:
    """Cumulative negative flips at every look, ``(runs, len(looks))``."""
    steps = np.diff(looks, prepend=0)
    return rng.binomial(np.broadcast_to(steps, (runs, looks.size)), p).cumsum(axis=1)


def wilson_passes(flips: np.ndarray, looks: np.ndarray, budget: float) -> np.ndarray:
    """The project's own ``wilson_interval`` upper bound <= budget, at every look."""
    out = np.zeros(flips.shape, dtype=bool)
    for j, n in enumerate(looks):
        col = flips[:, j]
        for s in np.unique(col):
            out[col == s, j] = wilson_interval(int(s), int(n), 0.95)[1] <= budget
    return out


def sequence_passes(flips: np.ndarray, looks: np.ndarray, budget: float) -> np.ndarray:
    """The sequence's upper end (one-sided 2.5%) <= budget, at every look."""
    out = np.zeros(flips.shape, dtype=bool)
    for j, n in enumerate(looks):  # one look at a time: (runs, mixture points) in memory
        col = flips[:, j]
        values = np.unique(col)
        ok = rejects_above(values, np.full(values.shape, n), budget, 0.025)
        out[:, j] = ok[np.searchsorted(values, col)]
    return out


def oracle_passes(flips: np.ndarray, looks: np.ndarray, budget: float, p: float) -> np.ndarray:
    """Wald's one-sided SPRT that knows the true rate: the likelihood ratio of
    ``p`` against the budget crosses ``1/alpha``. No test that may stop at any
    time does better on average (Wald & Wolfowitz), so its labels are the
    floor of the price of anytime validity."""
    f = looks[None, :] - flips
    llr = flips * np.log(p / budget) + f * np.log((1 - p) / (1 - budget))
    return llr >= np.log(1 / 0.025)


def first_pass(passes: np.ndarray, looks: np.ndarray) -> np.ndarray:
    """Labels at the first passing look per run; inf where it never passes."""
    hit = passes.any(axis=1)
    return np.where(hit, looks[passes.argmax(axis=1)], np.inf)


def wilson_fixed_sample_median(p: float, budget: float, n_max: int) -> int | None:
    """Smallest n where one Wilson check at n passes with probability >= 1/2."""
    for n in range(10, n_max + 1):
        k = np.arange(n + 1)
        ok = np.array([wilson_interval(int(s), n, 0.95)[1] <= budget for s in k[:int(budget * n) + 1]])
        if binom.pmf(k[:ok.size][ok], n, p).sum() >= 0.5:
            return n
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--first", type=int, default=200)
    ap.add_argument("--last", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    looks = np.arange(args.first, args.last + 1, args.every)
    t0 = time.perf_counter()

    at_budget = streams(rng, args.budget, args.runs, looks)
    wil = wilson_passes(at_budget, looks, args.budget)
    seq = sequence_passes(at_budget, looks, args.budget)
    false_cutover = {
        "wilson_every_look": float(wil.any(axis=1).mean()),
        "wilson_one_look_at_end": float(wil[:, -1].mean()),
        "sequence_every_look": float(seq.any(axis=1).mean()),
    }

    price = {}
    for frac in (0.5, 0.75, 0.1):
        p = frac * args.budget
        flips = streams(rng, p, args.runs, looks)
        stop = first_pass(sequence_passes(flips, looks, args.budget), looks)
        oracle = first_pass(oracle_passes(flips, looks, args.budget, p), looks)
        row = {"true_nfr": p, "sequence_median_labels": float(np.median(stop)),
               "oracle_sprt_median_labels": float(np.median(oracle)),
               "sequence_p90_labels": float(np.quantile(stop, 0.9)),
               "sequence_never_passed": float(np.isinf(stop).mean())}
        n_w = wilson_fixed_sample_median(p, args.budget, args.last)
        row["wilson_fixed_sample_median_labels"] = n_w
        row["ratio"] = None if n_w is None else row["sequence_median_labels"] / n_w
        row["oracle_ratio"] = None if n_w is None else row["oracle_sprt_median_labels"] / n_w
        price[f"{frac:g}x_budget"] = row

    result = {"runs": args.runs, "budget": args.budget, "looks": {
        "first": args.first, "last": args.last, "every": args.every, "count": int(looks.size)},
        "mixture": {"rho": MIXTURE_RHO, "kappa": MIXTURE_KAPPA}, "seed": args.seed,
        "false_cutover_at_budget": false_cutover, "labels_to_pass": price,
        "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
