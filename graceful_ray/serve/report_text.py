"""The shadow report as a few lines of text, for a terminal (the demo, `shadow replay`).

The HTTP report (``GET /v1/shadow/report``) and ``--out`` files stay JSON.
"""

from __future__ import annotations

from typing import Any


def format_shadow_report(report: dict[str, Any], sent: int | None = None) -> str:
    """The live comparison as a few lines: counts, agreement, flips with intervals, latency, gates."""
    def rate(d: dict[str, Any]) -> str:
        if not d.get("total"):
            return "n/a (0/0)"
        text = (f"{100 * d['value']:.2f}% [{100 * d['low']:.2f}%, {100 * d['high']:.2f}%] "
                f"({d['count']}/{d['total']})")
        seq = d.get("sequence")
        if seq:  # the gates' bound, beside the fixed-sample Wilson interval
            text += f", anytime-valid [{100 * seq['low']:.2f}%, {100 * seq['high']:.2f}%]"
        return text

    models = report["models"]
    lines = [f"    primary {report['primary']['ref']}, shadow {report['shadow']['ref']}",
             f"    requests recorded {report['requests']}" + (f" (sent {sent})" if sent is not None else "")
             + f", compared {report['compared']}, labelled {report['labelled']} "
             f"(pairs {report['labelled_pairs']})",
             f"    agreement          {rate(report['agreement'])}",
             f"    NFR                {rate(report['nfr'])}",
             f"    PFR                {rate(report['pfr'])}"]
    for role in ("baseline", "candidate"):
        m = models[role]
        lat = m.get("latency_ms") or {}
        p99 = f", p99 latency {lat['p99']:.1f} ms" if lat.get("p99") is not None else (
            "" if report.get("mode") == "replay" else ", p99 latency n/a")
        lines.append(f"    {role + ' accuracy':<19}{rate(m['accuracy'])}{p99}")
    verdict = "PASS" if report["gates"]["passed"] else "FAIL (" + ", ".join(report["gates"]["failing"]) + ")"
    lines.append(f"    gates: {verdict}")
    for c in report["gates"]["checks"]:
        lines.append(f"      [{'x' if c['passed'] else ' '}] {c['name']:<18} {c['detail']}")
    for name in report["gates"].get("not_judged", []):
        lines.append(f"      [-] {name}")
    return "\n".join(lines)
