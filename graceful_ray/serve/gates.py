"""Gates: may the candidate replace the primary? And, after it did, must it go?

Each rate is judged by the conservative end of its anytime-valid confidence
sequence (the report's ``sequence`` next to each rate;
:mod:`graceful_ray.metrics.sequential`), never by a point estimate and never
by the fixed-sample Wilson interval: the report is watched live and the cutover
retried as labels arrive, and a fixed-sample interval checked again and again
passes a candidate at the budget in about one run in five
(``benchmarks/results/gate_sequential.md``). With the sequence, looking after
every label and cutting over the first time the gates pass keeps each check's
error at ``(1 - confidence) / 2``.

**The label-free bound.** Every negative flip (baseline right, candidate wrong)
is a disagreement, so P(negative flip) <= P(disagree): the disagreement rate's
upper bound is an upper bound on the NFR that needs no label. ``max_nfr``
passes on it alone once ``min_compared`` pairs were compared, and then
``min_labelled`` is not waited for. (That the NFR over *labelled* pairs
estimates the same population rate assumes labels are not chosen by whether a
model was wrong; the label-free bound does not need that assumption.)

**Slices.** ``max_slice_nfr`` refuses a cutover when a class or a segment with
at least ``min_slice_labelled`` labelled pairs is *shown* to regress: its NFR
sequence's lower end exceeds the budget. With ``m`` slices judged, each uses
``alpha / m`` (Bonferroni), so a candidate fine on every slice is refused by
chance with probability at most ``alpha = (1 - confidence) / 2`` over all
slices and all looks together.

Every check says what it saw, what it needed and, when it fails, what to do;
the cutover route answers with exactly this list. :func:`evaluate` and
:func:`watch` are pure functions of a report summary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from graceful_ray.metrics.sequential import lower_bound
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, GateConfig


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    observed: float | None
    threshold: float
    detail: str


def evaluate(summary: dict[str, Any], gates: GateConfig) -> dict[str, Any]:
    """``{"passed": bool, "checks": [...], "failing": [names]}`` for a report summary."""
    checks: list[Check] = []
    pairs = summary["labelled_pairs"]
    nfr, dis = summary["nfr"], summary["disagreement"]
    label_free = dis["total"] >= max(gates.min_compared, 1) \
        and dis["sequence"]["high"] <= gates.max_nfr
    ok = pairs >= gates.min_labelled or label_free
    checks.append(Check(
        "min_labelled", ok, float(pairs), float(gates.min_labelled),
        f"{pairs} labelled pairs (both models answered, true label known); need "
        f">= {gates.min_labelled}" + (
            "" if pairs >= gates.min_labelled else
            " (waived: the label-free disagreement bound already meets max_nfr)" if label_free
            else ": send more feedback to /v1/feedback")))

    nfr_hi = nfr["sequence"]["high"]
    by_labels = pairs > 0 and nfr_hi <= gates.max_nfr
    observed = min(nfr_hi, dis["sequence"]["high"]) if label_free else nfr_hi
    checks.append(Check(
        "max_nfr", by_labels or label_free, observed, gates.max_nfr,
        f"NFR {_pct(nfr['value'])} with upper bound {_pct(nfr_hi)} "
        f"({nfr['count']}/{nfr['total']}); label-free bound (disagreement) "
        f"{_pct(dis['sequence']['high'])} ({dis['count']}/{dis['total']}); need either "
        f"<= {_pct(gates.max_nfr)}" + (", the label-free one after "
                                       f">= {gates.min_compared} compared pairs")))

    agr = summary["agreement"]
    low = agr["sequence"]["low"]
    ok = agr["total"] > 0 and low >= gates.min_agreement
    checks.append(Check(
        "min_agreement", ok, low, gates.min_agreement,
        f"agreement {_pct(agr['value'])} with lower bound {_pct(low)} "
        f"({agr['count']}/{agr['total']}); need lower bound >= {_pct(gates.min_agreement)}"))

    if gates.max_disagreement is not None:
        hi = dis["sequence"]["high"]
        ok = dis["total"] >= max(gates.min_compared, 1) and hi <= gates.max_disagreement
        checks.append(Check(
            "max_disagreement", ok, hi, gates.max_disagreement,
            f"disagreement {_pct(dis['value'])} with upper bound {_pct(hi)} "
            f"({dis['count']}/{dis['total']}); need upper bound <= "
            f"{_pct(gates.max_disagreement)} after >= {gates.min_compared} compared pairs"))

    lat_b = summary["models"][BASELINE]["latency_ms"]
    lat_c = summary["models"][CANDIDATE]["latency_ms"]
    enough = min(lat_b["n"], lat_c["n"]) >= max(gates.min_latency_samples, 1)
    ratio = summary["latency_p99_ratio"]
    ok = enough and ratio is not None and ratio <= gates.max_latency_ratio
    if not enough:
        detail = (f"latency samples: baseline {lat_b['n']}, candidate {lat_c['n']}; need "
                  f">= {gates.min_latency_samples} each")
    else:
        detail = (f"candidate p99 {lat_c['p99']:.2f} ms vs baseline p99 {lat_b['p99']:.2f} ms: "
                  f"ratio {ratio:.2f}; need <= {gates.max_latency_ratio:g}")
    checks.append(Check("max_latency_ratio", ok, ratio, gates.max_latency_ratio, detail))

    err = summary["models"][CANDIDATE]["shadow_errors"]["rate"]
    hi = err["sequence"]["high"]
    ok = err["total"] > 0 and hi <= gates.max_error_rate
    checks.append(Check(
        "max_error_rate", ok, hi, gates.max_error_rate,
        f"candidate shadow errors {err['count']}/{err['total']}, upper bound "
        f"{_pct(hi)}; need <= {_pct(gates.max_error_rate)}"))

    slices = slice_verdicts(summary, gates)
    if gates.max_slice_nfr is not None:
        bad = [s for s in slices["slices"] if s["regressed"]]
        checks.append(Check(
            "max_slice_nfr", not bad, max((s["nfr_low"] for s in slices["slices"]), default=None),
            gates.max_slice_nfr,
            f"{len(slices['slices'])} slices with >= {gates.min_slice_labelled} labelled pairs "
            f"judged, each at alpha {slices['alpha_per_slice']:.2g} (Bonferroni over "
            f"{len(slices['slices'])}); " + (
                "none shown above " + _pct(gates.max_slice_nfr) if not bad else
                "shown above " + _pct(gates.max_slice_nfr) + ": " + ", ".join(
                    f"{s['slice']} NFR {_pct(s['nfr'])} lower bound {_pct(s['nfr_low'])}"
                    for s in bad))))

    failing = [c.name for c in checks if not c.passed]
    return {"passed": not failing, "failing": failing, "checks": [asdict(c) for c in checks],
            "slices": slices, "config": gates.to_dict()}


def slice_verdicts(summary: dict[str, Any], gates: GateConfig) -> dict[str, Any]:
    """Every class and segment with enough labels, worst first, each with its NFR
    lower bound at the Bonferroni level ``alpha / m`` over the ``m`` judged."""
    budget = gates.max_nfr if gates.max_slice_nfr is None else gates.max_slice_nfr
    rows = [(f"class={k}", v) for k, v in summary.get("per_class", {}).items()] + \
           [(f"segment={k}", v) for k, v in summary.get("per_segment", {}).items()]
    judged = [(name, v) for name, v in rows if v["labelled"] >= max(gates.min_slice_labelled, 1)]
    alpha = (1.0 - gates.confidence) / 2.0 / max(len(judged), 1)
    out = []
    for name, v in judged:
        low = lower_bound(v["negative_flips"], v["labelled"], alpha)
        out.append({"slice": name, "labelled": v["labelled"], "negative_flips": v["negative_flips"],
                    "nfr": v["nfr"]["value"], "nfr_low": low, "regressed": low > budget})
    out.sort(key=lambda s: (s["nfr_low"], s["nfr"]), reverse=True)
    return {"budget": budget, "alpha_per_slice": alpha, "slices": out}


def watch(summary: dict[str, Any], gates: GateConfig) -> dict[str, Any]:
    """The watch after cutover: roll back when the records since the cutover show
    (the sequence's *lower* end, the same anytime-valid bound) that the new
    primary's NFR against the old exceeds ``max_nfr``, or (with
    ``max_slice_nfr``) that a class's or segment's does.

    The new primary's own failures are its callers' 5xx, which the router
    counts (``graceful_ray_shadow_*`` metrics) but the comparator never sees, so
    the watch judges flips only. ``summary`` is the post-cutover summary;
    the answer is ``{"rollback": bool, "reasons": [...]}``.
    """
    reasons = []
    nfr = summary["nfr"]
    if nfr["total"] > 0 and nfr["sequence"]["low"] > gates.max_nfr:
        reasons.append(f"NFR since the cutover {_pct(nfr['value'])} ({nfr['count']}/"
                       f"{nfr['total']}), lower bound {_pct(nfr['sequence']['low'])} > "
                       f"max_nfr {_pct(gates.max_nfr)}")
    if gates.max_slice_nfr is not None:
        for s in slice_verdicts(summary, gates)["slices"]:
            if s["regressed"]:
                reasons.append(f"{s['slice']} NFR since the cutover {_pct(s['nfr'])} "
                               f"({s['negative_flips']}/{s['labelled']}), lower bound "
                               f"{_pct(s['nfr_low'])} > {_pct(gates.max_slice_nfr)}")
    return {"rollback": bool(reasons), "reasons": reasons}


def explain(result: dict[str, Any]) -> str:
    """One line naming every failing gate, for the cutover refusal and logs."""
    if result["passed"]:
        return "all gates pass"
    return "; ".join(c["detail"] for c in result["checks"] if not c["passed"])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"
