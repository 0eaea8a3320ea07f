"""An upgrade's evaluation as terminal tables: its retrieval scores, several
candidates side by side, a compatibility matrix over generations.

They read the JSON-ready dicts :mod:`graceful_ray.evaluate` returns and writes
(``report.json``, ``generations.json``), so anything holding such a result
(the evaluate command, the demo, a saved report) prints the same table without
loading a model. The flip table itself is :meth:`FlipReport.to_table`.
"""

from __future__ import annotations

from typing import Any


def retrieval_table(r: dict[str, Any]) -> str:
    """M(old, old), M(new, new) and, when the new model can query the old gallery, M(new, old)
    with the compatibility criterion and the update gain."""
    rows = [("M(old, old)", r["m_old_old"]), ("M(new, new)", r["m_new_new"])]
    if r.get("m_new_old"):
        rows.append(("M(new, old)", r["m_new_old"]))
    if r.get("m_ref_ref"):
        rows.append(("M(ref, ref)", r["m_ref_ref"]))
    lines = ["retrieval (leave-one-out)      top-1    top-5      mAP"]
    for name, m in rows:
        lines.append(f"  {name:<27} {m['top1']:7.4f}  {m['top5']:7.4f}  {m['map']:7.4f}")
    if r.get("m_new_old"):
        lines.append(f"  compatible (M(new,old) > M(old,old)): top-1 {r['compatible_top1']}, mAP {r['compatible_map']}")
    if "update_gain_top1" in r:
        lines.append(f"  update gain: top-1 {r['update_gain_top1']:.3f}, mAP {r['update_gain_map']:.3f}")
    if r.get("note"):
        lines.append("  " + r["note"])
    return "\n".join(lines)


def side_by_side(reports: dict[str, dict[str, Any]]) -> str:
    """Several upgrade reports of the same old model (``{label: evaluate_upgrade result}``) as
    columns: error rates, NFR with its upper bound, PFR, cross-model retrieval; ``-`` where one
    lacks a value (e.g. no M(new, old) across embedding dims)."""
    labels = list(reports)
    lines = [f"    {'':<22}" + "".join(f"{l:>16}" for l in labels)]

    def row(name: str, get) -> None:
        vals = []
        for label in labels:
            try:
                vals.append(get(reports[label]))
            except (KeyError, TypeError):
                vals.append("-")
        lines.append(f"    {name:<22}" + "".join(f"{v:>16}" for v in vals))

    def rate(key):
        return lambda r: f"{100 * r['flips']['metrics'][key]['value']:.2f}%"

    row("error rate old", rate("error_rate_old"))
    row("error rate new", rate("error_rate_new"))
    row("NFR", rate("nfr"))
    row("NFR 95% upper", lambda r: f"{100 * r['flips']['metrics']['nfr']['high']:.2f}%")
    row("PFR", rate("pfr"))
    row("M(new,old) top-1", lambda r: f"{r['retrieval']['m_new_old']['top1']:.4f}")
    row("M(old,old) top-1", lambda r: f"{r['retrieval']['m_old_old']['top1']:.4f}")
    row("compatible", lambda r: str(r["retrieval"]["compatible_top1"]))
    return "\n".join(lines)


def format_generations(result: dict[str, Any]) -> str:
    """The matrix ``M(query, gallery)`` of each metric with its AC and AM, then each model's space."""
    refs = result["models"]
    lines = []
    for metric in ("top1", "map"):
        if metric not in result:
            continue
        m = result[metric]
        lines.append(f"M(query, gallery) {metric}: AC = {m['ac']:.3f}, AM = {m['am']:.4f} "
                     "(rows: query model, columns: gallery model; AC/AM use the lower triangle)")
        width = max(max(len(r) for r in refs), 7) + 2
        lines.append(" " * width + "".join(f"{r:>{width}}" for r in refs))
        for ref, row in zip(refs, m["matrix"]):
            lines.append(f"{ref:<{width}}" + "".join(f"{v:>{width}.4f}" for v in row))
        lines.append("")
    lines.append("embedding spaces: " + ", ".join(f"{r} -> {s}" for r, s in result["spaces"].items()))
    return "\n".join(lines)
