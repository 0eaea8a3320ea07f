"""The Pareto front of finished trials, and the table that shows it.

Pure functions over :class:`~graceful_ray.tune.trials.TrialRecord` lists.
A trial is on the front when no other *complete* trial dominates it (at least
as good on every objective and strictly better on one). Trials that did not
run to completion (stopped early, errored, still running) never enter the
front, whatever their metrics: their numbers are from an earlier epoch and
would make the trade-off look better (or worse) than any finished model. They
are still listed in the table, marked as such.

Exact duplicates (two trials with the same objective values) do not dominate
each other, so both stay on the front: neither is worse.
"""

from __future__ import annotations

from collections.abc import Sequence

from graceful_ray.tune.trials import TRADEOFF_OBJECTIVES, Objective, TrialRecord


def dominates(a: TrialRecord, b: TrialRecord, objectives: Sequence[Objective] = TRADEOFF_OBJECTIVES) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    strictly = False
    for o in objectives:
        va, vb = a.value(o.metric), b.value(o.metric)
        if o.better(vb, va):
            return False
        if o.better(va, vb):
            strictly = True
    return strictly


def candidates(records: Sequence[TrialRecord], objectives: Sequence[Objective] = TRADEOFF_OBJECTIVES
               ) -> list[TrialRecord]:
    """The trials eligible for the front: complete, with every objective a number."""
    metrics = [o.metric for o in objectives]
    return [r for r in records if r.complete and r.has(*metrics)]


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[Objective] = TRADEOFF_OBJECTIVES
                 ) -> list[TrialRecord]:
    """Non-dominated complete trials, sorted along the first objective (best first).

    O(n^2) in the number of trials, which is tens to hundreds here.
    """
    pool = candidates(records, objectives)
    front = [r for r in pool if not any(dominates(o, r, objectives) for o in pool if o is not r)]
    first = objectives[0]
    sign = -1.0 if first.mode == "max" else 1.0
    second = objectives[1] if len(objectives) > 1 else first
    sign2 = -1.0 if second.mode == "max" else 1.0
    return sorted(front, key=lambda r: (sign * r.value(first.metric), sign2 * r.value(second.metric), r.trial_id))


def format_table(records: Sequence[TrialRecord], front: Sequence[TrialRecord],
                 objectives: Sequence[Objective] = TRADEOFF_OBJECTIVES, *,
                 params: Sequence[str] | None = None, extra_metrics: Sequence[str] = (),
                 selected: str | None = None) -> str:
    """A Markdown table of every trial: front members first, then the rest; non-complete marked.

    ``selected`` (a trial id) is marked with ``*``.
    """
    on_front = {r.trial_id for r in front}
    names = list(params) if params is not None else sorted({k for r in records for k in r.params})
    cols = [o.metric for o in objectives] + [m for m in extra_metrics if m not in {o.metric for o in objectives}]
    header = ["trial", "status", "front"] + cols + names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rest = sorted((r for r in records if r.trial_id not in on_front),
                  key=lambda r: (r.status != "complete", r.trial_id))
    for r in list(front) + rest:
        mark = ("*" if r.trial_id == selected else "") + ("yes" if r.trial_id in on_front else "")
        status = r.status.replace("_", " ")
        row = [r.trial_id, status, mark or "-"] + [_fmt(r.metrics.get(c)) for c in cols] + \
              [_fmt(r.params.get(n)) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 10_000:
            return f"{v:,.0f}"
        if v.is_integer() and abs(v) > 1:
            return str(int(v))
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"
    return str(v)
