"""Gates: may the candidate replace the primary?

Each gate is judged on the report's numbers with the conservative end of its
Wilson interval, so "0 flips in 20 samples" does not pass a 2% NFR budget: the
upper bound of that interval is 16%. Every check says what it saw, what it
needed and, when it fails, what to do; the cutover route answers with exactly
this list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from graceful_ray.serve.config import BASELINE, CANDIDATE, GateConfig


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
    checks.append(Check(
        "min_labelled", pairs >= gates.min_labelled, float(pairs), float(gates.min_labelled),
        f"{pairs} labelled pairs (both models answered, true label known); need "
        f">= {gates.min_labelled}" + ("" if pairs >= gates.min_labelled
                                      else ": send more feedback to /v1/feedback")))

    nfr = summary["nfr"]
    ok = pairs > 0 and nfr["high"] <= gates.max_nfr
    checks.append(Check(
        "max_nfr", ok, nfr["high"], gates.max_nfr,
        f"NFR {_pct(nfr['value'])} with upper bound {_pct(nfr['high'])} "
        f"({nfr['count']}/{nfr['total']}); need upper bound <= {_pct(gates.max_nfr)}"))

    agr = summary["agreement"]
    ok = agr["total"] > 0 and agr["low"] >= gates.min_agreement
    checks.append(Check(
        "min_agreement", ok, agr["low"], gates.min_agreement,
        f"agreement {_pct(agr['value'])} with lower bound {_pct(agr['low'])} "
        f"({agr['count']}/{agr['total']}); need lower bound >= {_pct(gates.min_agreement)}"))

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
    ok = err["total"] > 0 and err["high"] <= gates.max_error_rate
    checks.append(Check(
        "max_error_rate", ok, err["high"], gates.max_error_rate,
        f"candidate shadow errors {err['count']}/{err['total']}, upper bound "
        f"{_pct(err['high'])}; need <= {_pct(gates.max_error_rate)}"))

    failing = [c.name for c in checks if not c.passed]
    return {"passed": not failing, "failing": failing, "checks": [asdict(c) for c in checks],
            "config": gates.to_dict()}


def explain(result: dict[str, Any]) -> str:
    """One line naming every failing gate, for the cutover refusal and logs."""
    if result["passed"]:
        return "all gates pass"
    return "; ".join(c["detail"] for c in result["checks"] if not c["passed"])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"
